"""Toy world: renderer, grammar, edits, tokenizer ground truth, and the safety metrics (no model needed)."""

import numpy as np
import pytest

from jaxdit.safety import evaluate as ev
from jaxdit.toyworld.captions import canonical_caption, caption
from jaxdit.toyworld.edits import KINDS, make_edit, random_edit
from jaxdit.toyworld.scenes import (BACKGROUNDS, COLOURS, SHAPES, Obj, Scene, ground_truth, object_coverage,
                                    random_scene, render)
from jaxdit.toyworld.suites import SUITES, Concept, build_suites
from jaxdit.toyworld.tokenizer import WordTokenizer


def test_render_ground_truth_is_exact():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = random_scene(rng)
        img, gt = render(scene), ground_truth(scene)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert len(gt["objects"]) == len(scene.objects) and 1 <= len(scene.objects) <= 3
        assert len({o.shape for o in scene.objects}) == len(scene.objects)
        union = np.zeros((32, 32), int)
        for obj, truth in zip(scene.objects, gt["objects"]):
            y0, x0, y1, x1 = truth.box
            assert truth.mask.any() and not truth.mask[:y0].any() and not truth.mask[y1:].any()
            assert not truth.mask[:, :x0].any() and not truth.mask[:, x1:].any()
            assert (gt["shape_map"][truth.mask] == 1 + SHAPES.index(obj.shape)).all()
            # fully covered pixels have exactly the object's colour, and they lie inside the mask
            full = object_coverage(obj) == 1
            assert full.any() and (img[full] == COLOURS[obj.colour]).all() and truth.mask[full].all()
            union += truth.mask
        assert union.max() <= 1  # objects never overlap
        empty = sum(object_coverage(o) for o in scene.objects) == 0
        assert (img[empty] == BACKGROUNDS[scene.background]).all()


def test_every_shape_renders_distinctly():
    masks = [ground_truth(Scene((Obj(s, "red", "big", "top left"),)))["objects"][0].mask for s in SHAPES]
    for i in range(len(SHAPES)):
        for j in range(i + 1, len(SHAPES)):
            assert (masks[i] != masks[j]).sum() >= 6, (SHAPES[i], SHAPES[j])
    with pytest.raises(ValueError, match="same cell"):
        Scene((Obj("star", "red", cell="top right"), Obj("heart", "blue", cell="top right")))


def test_captions_name_the_scene_and_tokenize():
    scene = Scene((Obj("star", "red", "big", "top left"), Obj("heart", "blue", "big", "bottom right")), "gray")
    assert canonical_caption(scene) == ("a big red star at the top left and a big blue heart at the bottom right "
                                        "on a gray background")
    tok = WordTokenizer.from_grammar()
    rng = np.random.default_rng(1)
    for _ in range(200):
        s = random_scene(rng)
        text, requested = caption(s, rng)
        assert not tok.unknown_words(text), text
        assert [r["shape"] for r in requested] == [o.shape for o in s.objects]
        ids, mask = tok([text])
        assert ids[0, mask[0].sum() - 1] == 1  # ends with </s>


def test_tokenizer_roundtrip(tmp_path):
    tok = WordTokenizer.from_grammar()
    tok.save(tmp_path / "vocab.json")
    again = WordTokenizer.load(tmp_path / "vocab.json")
    assert again.vocab == tok.vocab and again.max_length == tok.max_length
    ids, _ = tok(["a red star, and a zebra"])
    assert 2 in ids[0]  # unknown word


def test_edits_produce_exact_targets():
    src = Scene((Obj("circle", "red", "big", "top left"), Obj("star", "blue", "big", "bottom left")), "black")
    rng = np.random.default_rng(0)
    circle = src.objects[0]
    e = make_edit(src, "remove", rng, obj=circle)
    assert [o.shape for o in e.target.objects] == ["star"]
    e = make_edit(src, "recolour", rng, obj=circle, new_colour="green")
    assert e.target.find("circle").colour == "green" and e.target.find("star") == src.find("star")
    e = make_edit(src, "move", rng, obj=circle, new_cell="bottom right")
    assert e.target.find("circle").cell == "bottom right"
    e = make_edit(src, "replace", rng, obj=circle, new_shape="square")
    assert e.target.find("square").colour == "red" and e.target.find("circle") is None
    assert "square" in e.instruction or "box" in e.instruction
    e = make_edit(src, "background", rng, new_background="gray")
    assert e.target.background == "gray" and e.target.objects == src.objects
    e = make_edit(src, "add", rng, obj=Obj("heart", "yellow", "big", "top right"))
    assert e.target.find("heart") is not None and len(e.target.objects) == 3
    # untouched objects keep their pixels
    img_s, img_t = render(src), render(e.target)
    star = ground_truth(src)["objects"][1].mask
    assert (img_s[star] == img_t[star]).all()
    tok = WordTokenizer.from_grammar()
    seen = set()
    for _ in range(300):
        e = random_edit(rng)
        seen.add(e.kind)
        assert not tok.unknown_words(e.instruction), e.instruction
    assert seen == set(KINDS)


@pytest.mark.parametrize("name", ["star", "red"])
def test_suites(name):
    concept = Concept.parse(name)
    suites = build_suites(concept, n=12)
    assert tuple(suites) == SUITES
    tok = WordTokenizer.from_grammar()
    for suite, items in suites.items():
        for it in items:
            assert not tok.unknown_words(it.prompt), it.prompt
            if suite in ("explicit", "paraphrased", "obfuscated", "mixed"):
                assert any(concept.in_object(r["shape"], r["colour"] or "") or
                           (concept.kind == "shape" and r["shape"] == name) for r in it.requested)
            if suite == "benign_edits":
                assert any(concept.in_object(o.shape, o.colour) for o in it.source.objects)
            if suite == "safe":
                assert not any(concept.in_object(r["shape"], r["colour"] or "") for r in it.requested)
    if concept.kind == "shape":
        assert all(name not in it.prompt for it in suites["obfuscated"])
    # deterministic
    assert build_suites(concept, n=12) == suites
    with pytest.raises(ValueError, match="unknown concept"):
        Concept.parse("zebra")


def test_metrics():
    r = ev.erase_rates([1, 1, 1, 0], [0, 1, 0, 0])
    assert r["erase_rate_aggregate"] == pytest.approx(2 / 3) and r["erase_rate_per_sample"] == pytest.approx(2 / 3)
    assert ev.erase_rates([0, 0], [1, 0])["erase_rate_aggregate"] is None
    with pytest.raises(ValueError, match="matched"):
        ev.erase_rates([1], [1, 0])
    assert ev.requested_found([{"shape": "star", "colour": "red"}],
                              [{"shape": "star", "colour": None}, {"shape": "heart", "colour": "red"}]) == (1, 2)
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[1] = 255
    assert ev.pixel_distance(a, b).tolist() == [0.0, 1.0]
    recs = [{"suite": "s", "index": i, "seed": i, "unsafe_base": u, "unsafe_method": m, "requested_base": (1, 1),
             "requested_method": (0, 1), "pixel_distance": 0.1} for i, (u, m) in enumerate([(1, 0), (1, 1)])]
    s = ev.summarize(recs)["s"]
    assert s["presence_base"] == 1.0 and s["presence_method"] == 0.5 and s["erase_rate_aggregate"] == 0.5
    assert s["accuracy_base"] == 1.0 and s["accuracy_method"] == 0.0
    table = ev.format_table({"s": s})
    assert "erase_rate_aggregate" in table and "0.500" in table


def test_cli_errors_are_one_line(tmp_path, capsys):
    from jaxdit.cli import main

    assert main(["toyworld", "demo", "--weights", str(tmp_path / "missing")]) == 2
    assert main(["toyworld", "train"]) == 2
    assert main(["toyworld", "train", "--detector"]) == 2
    assert main(["toyworld", "train", "--run", str(tmp_path / "r1"), "--mix", "nope"]) == 2
    assert main(["toyworld", "train", "--run", str(tmp_path / "r2"), "--init-from", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("jaxdit toyworld ") and ": error: " in line for line in err)
    assert "--mix 'nope'" in err[3] and str(tmp_path / "none") in err[4]
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()  # refused before any work


def test_pooled_off_keeps_the_pooled_projection_exactly_zero(tmp_path):
    """`train --pooled off`: the pooled-text projection starts at zero and stays exactly zero through
    AdamW steps (its gradient dropped), everything else trains, and the record says how to reproduce it."""
    import jax

    from jaxdit.toyworld import model as M, train as T
    from jaxdit.toyworld.pipeline import ToyWorld

    info = T.train(tmp_path / "r", seed=4, steps=2, t2i_batch=2, edit_batch=2, pooled="off",
                   export=str(tmp_path / "w"), progress=False)
    assert info["hyper"]["pooled"] == "off" and "--pooled off" in info["reproduce"]
    tw = ToyWorld.load(tmp_path / "w")
    kernel = tw.params
    for k in T.POOLED_KERNEL:
        kernel = kernel[k]
    assert kernel.size and not np.asarray(kernel).any()
    start = T.initial_params(M.ToyConfig(tw.flux_config, tw.t5_config), 4, pooled="off")
    assert any((np.asarray(a) != np.asarray(b)).any() for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(tw.params)))
    with pytest.raises(ValueError, match="--pooled 'maybe'"):
        T.train(tmp_path / "r2", steps=1, pooled="maybe", progress=False)
    assert not (tmp_path / "r2").exists()


def test_pooled_fade_scales_the_pooled_projection_to_zero_and_exports_it_zero(tmp_path):
    """`train --pooled fade --fade-steps N --init-from DIR`: the model runs with the pooled-text kernel scaled
    by 1 - step / N (the loss of the first step equals that of the unfaded weights), and the exported weights
    hold it at exactly zero; without --init-from or with N outside (0, steps] it refuses before any work."""
    import jax

    from jaxdit.toyworld import model as M, train as T
    from jaxdit.toyworld.data import training_batch
    from jaxdit.toyworld.pipeline import ToyWorld

    assert [float(T.pooled_scale(s, 4)) for s in (0, 1, 2, 4, 9)] == [1.0, 0.75, 0.5, 0.0, 0.0]
    for bad in (dict(fade_steps=2), dict(fade_steps=0, init_from="toyworld/weights"),
                dict(fade_steps=3, init_from="toyworld/weights")):
        with pytest.raises(ValueError, match="--pooled fade needs --init-from"):
            T.train(tmp_path / "bad", steps=2, pooled="fade", progress=False, **bad)
    assert not (tmp_path / "bad").exists()
    info = T.train(tmp_path / "r", seed=4, steps=2, t2i_batch=2, edit_batch=2, pooled="fade", fade_steps=2,
                   init_from="toyworld/weights", export=str(tmp_path / "w"), progress=False)
    assert info["hyper"]["fade_steps"] == 2 and "--pooled fade --fade-steps 2" in info["reproduce"]
    kernel = ToyWorld.load(tmp_path / "w").params
    for k in T.POOLED_KERNEL:
        kernel = kernel[k]
    assert kernel.size and not np.asarray(kernel).any()
    start = ToyWorld.load()
    cfg = M.ToyConfig(start.flux_config, start.t5_config)
    batch = training_batch(4, 0, 2, 2, start.tokenizer)
    key = jax.random.fold_in(jax.random.key(5), 0)
    k1 = jax.random.split(key)[0]
    t = batch["t2i"]
    unfaded = T.flow_loss(start.params, cfg, t["image"], t["ids"], t["mask"], k1, weight=t["weight"])
    assert info["first_steps"][0]["loss_t2i"] == pytest.approx(float(unfaded), rel=1e-5)


def test_a_continued_phase_starts_from_the_given_weights_and_chains_the_records(tmp_path):
    """`train --init-from DIR --mix binding`: starts at DIR's weights (not a random initialisation), uses the
    other mix's batches, records DIR's training record as its base, and the curves chain in time and steps."""
    import jax

    from jaxdit.toyworld import data as D, model as M, train as T
    from jaxdit.toyworld.pipeline import ToyWorld

    kw = dict(seed=5, steps=2, t2i_batch=2, edit_batch=2, progress=False)
    first = T.train(tmp_path / "a", export=str(tmp_path / "wa"), **kw)
    cfg = M.ToyConfig(M.FLUX_CONFIG, M.t5_config(len(ToyWorld.load(tmp_path / "wa").tokenizer)))
    start = T.initial_params(cfg, 5, tmp_path / "wa")
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(ToyWorld.load(tmp_path / "wa").params)):
        assert (np.asarray(a) == np.asarray(b)).all()
    assert any((np.asarray(a) != np.asarray(b)).any()
               for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(M.init_params(cfg, jax.random.key(5)))))
    second = T.train(tmp_path / "b", mix="binding", init_from=str(tmp_path / "wa"), export=str(tmp_path / "wb"), **kw)
    assert second["hyper"]["mix"] == "binding" and second["base"]["first_steps"] == first["first_steps"]
    assert "--mix binding --init-from" in ToyWorld.load(tmp_path / "wb").info["reproduce"]
    assert second["first_steps"][0]["loss"] != first["first_steps"][0]["loss"]
    with pytest.raises(ValueError, match="other settings"):
        T.train(tmp_path / "b", init_from=str(tmp_path / "wa"), **kw)  # the run's mix was binding
    # the mixes draw different scenes from the same seed, and "binding" more objects on average
    tok = ToyWorld.load(tmp_path / "wa").tokenizer
    u, b = D.training_batch(0, 0, 64, 1, tok), D.training_batch(0, 0, 64, 1, tok, "binding")
    assert (u["t2i"]["weight"] > 1).mean() < (b["t2i"]["weight"] > 1).mean()
    points = T.chained_curve({"step": 4, "train_seconds": 2.0, "curve": [{"step": 4, "train_seconds": 2.0}],
                              "base": {"step": 10, "train_seconds": 5.0, "curve": [{"step": 10, "train_seconds": 5.0}]}})
    assert [(p["step"], p["train_seconds"], p["phase"]) for p in points] == [(10, 5.0, 0), (14, 7.0, 1)]


def test_training_resumes_from_a_relative_run_folder_exactly(tmp_path, monkeypatch):
    """An interrupted `toyworld train --run RUN` (RUN relative, as documented) resumes to the state of an
    uninterrupted run, bit for bit."""
    import jax
    import orbax.checkpoint as ocp

    from jaxdit.toyworld import train as T

    monkeypatch.chdir(tmp_path)
    kw = dict(seed=3, steps=3, t2i_batch=2, edit_batch=2, checkpoint_every=1, progress=False)
    T.train("whole", **kw)
    real_step = T.compiled_step

    def interrupted(*args):  # the same (compiled) step function, killed after two steps
        step, calls = real_step(*args), []

        def run(*a):
            if len(calls) == 2:
                raise KeyboardInterrupt
            calls.append(1)
            return step(*a)
        return run

    monkeypatch.setattr(T, "compiled_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        T.train("parts", **kw)
    monkeypatch.setattr(T, "compiled_step", real_step)
    assert T._latest_state(tmp_path / "parts")[0] == 2
    T.train("parts", **kw)
    with pytest.raises(ValueError, match="other settings"):
        T.train("parts", **{**kw, "steps": 5})

    def state(run):
        return ocp.StandardCheckpointer().restore(tmp_path / run / "state_3" / "state")

    for a, b in zip(jax.tree.leaves(state("whole")), jax.tree.leaves(state("parts"))):
        assert (np.asarray(a) == np.asarray(b)).all()
