"""SafeDIG on the toy world (jaxdit.toyworld.safedig): harvest labels against ground truth, routing table,
frozen encoder under decoder adaptation, identity of the steering edit where nothing harmful fires,
calibration split and search, and a tiny end-to-end run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdit import hooks as hk
from jaxdit.toyworld import model as M
from jaxdit.toyworld import safedig as sd
from jaxdit.toyworld.scenes import BACKGROUNDS, Obj, Scene, ground_truth, object_coverage, render
from jaxdit.toyworld.suites import Concept
from jaxdit.toyworld.tokenizer import WordTokenizer

CANDIDATES = ("double.0.txt.resid_post", "double.1.img.resid_post", "single.1.img.resid_post")
SETTINGS = sd.Settings(n_source=12, n_target=3, n_shift=6, sample_steps=4, harvest_steps=(0, 3), candidates=CANDIDATES,
                       max_top=1,
                       dictionary=sd.DictConfig(expansion=2, k=8, steps=30, batch_size=256, adapt_steps=10,
                                                contrast_rows=500, max_safe_rate=0.5))


@pytest.fixture(scope="module")
def world():
    from jaxdit.toyworld.detector import Detector
    from jaxdit.toyworld.pipeline import ToyWorld

    tw = ToyWorld.load()
    return tw, Detector.load(), sd.prepare(tw, SETTINGS, log=lambda s: None)


def _expected_image_labels(scene, concept):
    """Ground truth, token by token: 2 if the 4x4 patch holds a pixel of the concept object's mask."""
    out = np.zeros((8, 8), np.int8)
    for obj, truth in zip(scene.objects, ground_truth(scene)["objects"]):
        for r in range(8):
            for c in range(8):
                if truth.mask[4 * r:4 * r + 4, 4 * c:4 * c + 4].any():
                    out[r, c] = 2 if concept.in_object(obj.shape, obj.colour) else max(out[r, c], 1)
    return out.reshape(-1)


def test_token_labels_follow_ground_truth_and_the_model_tokenization():
    star = Concept.parse("star")
    scene = Scene((Obj("star", "red", "big", "top left", (0.5, -0.25)), Obj("heart", "blue", "big", "bottom right")),
                  "gray")
    labels = sd.image_token_labels(scene, star)
    np.testing.assert_array_equal(labels, _expected_image_labels(scene, star))
    assert (labels == 2).any() and (labels == 1).any()
    # token k of M.to_tokens covers the 4x4 patch (k // 8, k % 8): the tokens the object changes are labelled
    only_star = Scene((scene.objects[0],), "gray")
    plain = np.broadcast_to(np.asarray(BACKGROUNDS["gray"], np.uint8), (1, 32, 32, 3))
    changed = np.abs(np.asarray(M.to_tokens(render(only_star)[None]) - M.to_tokens(plain))[0]).max(-1) > 0
    star_tokens = sd.image_token_labels(only_star, star) == 2
    assert star_tokens.any() and changed[star_tokens].all()
    full = (object_coverage(scene.objects[0]) == 1).reshape(8, 4, 8, 4).any(axis=(1, 3)).reshape(-1)
    assert star_tokens[full].all()  # fully covered pixels lie inside the mask
    tok = WordTokenizer.from_grammar()
    text = sd.text_token_labels("draw a five pointed shape and a star", tok, star)
    np.testing.assert_array_equal(text[:9], [1, 1, 2, 2, 2, 1, 1, 2, 1])  # last: end of text
    assert (text[9:] == 0).all()


def test_harvest_shapes_and_labels_against_ground_truth(world):
    tw, _, prep = world
    h = prep["harvests"]["source"]
    examples = sd.source_examples(SETTINGS.source, SETTINGS.n_source, SETTINGS.seed)
    star = Concept.parse(SETTINGS.source)
    steps = SETTINGS.harvest_steps
    n_img = sum(64 * (2 if e.context is not None else 1) for e in examples) * len(steps)
    for p in CANDIDATES:
        rows = n_img if sd.stream_of(p) == "img" else len(examples) * tw.tokenizer.max_length * len(steps)
        assert h.acts[p].shape == (rows, 128) and h.acts[p].dtype == np.float32
        assert np.isfinite(h.acts[p]).all()
    assert len(h.label["img"]) == n_img and sorted(set(h.step["img"].tolist())) == list(steps)
    assert any(e.context is not None for e in examples) and any(e.context is None for e in examples)
    for i, e in enumerate(examples):
        for k in steps:
            sel = (h.example["img"] == i) & (h.step["img"] == k)
            np.testing.assert_array_equal(h.label["img"][sel & (h.role["img"] == 0)],
                                          _expected_image_labels(e.scene, star))
            if e.context is not None:
                np.testing.assert_array_equal(h.label["img"][sel & (h.role["img"] == 1)],
                                              _expected_image_labels(e.context, star))
            tsel = (h.example["txt"] == i) & (h.step["txt"] == k)
            np.testing.assert_array_equal(h.label["txt"][tsel], sd.text_token_labels(e.text, tw.tokenizer, star))
    # with-concept examples carry unsafe tokens, without-concept ones none
    for i, e in enumerate(examples):
        objects = e.scene.objects + (e.context.objects if e.context else ())
        has = any(star.in_object(o.shape, o.colour) for o in objects)
        assert bool((h.label["img"][h.example["img"] == i] == 2).any()) == has
    # the stored activations are those of a forward pass on x_s = (1 - s) x0 + s n for that example alone
    i = next(j for j, e in enumerate(examples) if e.context is None)
    e, k = examples[i], steps[-1]
    from jaxdit.toyworld.pipeline import initial_noise, schedule

    sigma = float(schedule(SETTINGS.sample_steps)[0][k])
    x = (1 - sigma) * M.to_tokens(render(e.scene)[None]) + sigma * initial_noise([e.seed])
    ids, mask = tw.tokenizer([e.text])
    velocity = jax.jit(M.velocity, static_argnums=(1, 2))
    _, caps = velocity(tw.params, tw.flux_config, tw.t5_config, x, ids, mask, jnp.asarray([sigma]), None,
                       hk.Hooks(capture=("single.1.img.resid_post",)))
    rows = h.acts["single.1.img.resid_post"][(h.example["img"] == i) & (h.step["img"] == k)]
    np.testing.assert_allclose(rows, np.asarray(caps["single.1.img.resid_post"])[0], rtol=2e-3, atol=2e-3)


def test_routing_table_covers_the_candidates(world):
    _, _, prep = world
    rows = prep["routing"]
    assert {r["position"] for r in rows} == set(CANDIDATES) and len(rows) == len(CANDIDATES)
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    assert sum(r["chosen"] for r in rows) == SETTINGS.max_top and rows[0]["chosen"]
    for r in rows:
        assert set(r["stability_by_shift"]) == {"target", "paraphrase_seed", "high_noise", "low_noise"}
        assert -1 <= r["stability"] <= 1 and r["separability"] >= 0
        assert r["score"] == pytest.approx(max(r["stability"], 0) * r["separability"])
        assert all(v is None or 0 <= v <= 1 for v in r["concept_vs_other_auc"].values())
    json.dumps(rows)
    assert [d.position for d in prep["dictionaries"]["source"]] == [rows[0]["position"]]


def test_adapted_decoder_leaves_the_encoder_bitwise(world):
    _, _, prep = world
    for src, ada, plain in zip(*(prep["dictionaries"][k] for k in ("source", "adapted", "source+target_latents"))):
        for name in ("W_enc", "b_enc"):
            assert ada.tgt[name] is src.src[name] and ada.src[name] is src.src[name]
            np.testing.assert_array_equal(np.asarray(ada.tgt[name]), np.asarray(src.src[name]))
        assert not np.array_equal(np.asarray(ada.tgt["W_dec"]), np.asarray(src.src["W_dec"]))
        np.testing.assert_array_equal(np.asarray(ada.src["W_dec"]), np.asarray(src.src["W_dec"]))  # kept for err
        assert plain.tgt is src.src
        both, only_src = ada.choose(4).tolist(), src.choose(4).tolist()
        assert only_src == both[: len(only_src)] and set(ada.choose(4, ["target"]).tolist()) <= set(both)
        assert ada.meta["adapt_loss"][1] <= ada.meta["adapt_loss"][0]
        assert ada.harmful.tolist() == ada.choose(16).tolist()  # the dictionary's own latents: the default count


def test_steering_edit_is_the_identity_where_no_harmful_latent_fires(world):
    _, _, prep = world
    d = prep["dictionaries"]["adapted"][0]
    x = prep["harvests"]["source"].acts[d.position][:512]
    stream = sd.stream_of(d.position)
    layout = hk.TokenLayout(40, 64)
    ctx = lambda step: hk.HookContext(layer=jnp.int32(0), step=jnp.int32(step), key=None,  # noqa: E731
                                      stack=d.position.split(".")[0], stream=stream, site="resid_post", layout=layout)
    for mode in ("blend", "repel"):
        steering = sd.Steering(mode=mode, num_harmful=4, strength=1.5, gate_quantile=0.5)
        harmful = d.choose(4)
        gate = sd.gate_value(d, harmful, 0.5)
        fires = sd.harmful_peak(d, x, harmful) > gate
        assert fires.any() and not fires.all()
        (edit,) = sd.method_hooks([d], steering).edits
        assert edit is sd.method_hooks([d], steering).edits[0]  # built once: the sampler compiles once per setting
        np.testing.assert_array_equal(np.asarray(edit.params["harmful"]), harmful)
        out = np.asarray(edit.fn(edit.params, jnp.asarray(x)[None], ctx(3)))[0]
        np.testing.assert_array_equal(out[~fires], x[~fires])
        assert (np.abs(out[fires] - x[fires]).max(-1) > 0).all()
        (windowed,) = sd.method_hooks([d], sd.Steering(mode=mode, num_harmful=4, strength=1.5, window=(5, 8))).edits
        np.testing.assert_array_equal(np.asarray(windowed.fn(windowed.params, jnp.asarray(x)[None], ctx(3)))[0], x)


def test_calibration_split_is_disjoint_and_the_safe_suite_free_of_both_concepts():
    ev_items = sd.measurement_items("star", "heart", 4)
    cal_items = sd.measurement_items("star", "heart", 4, sd.CALIBRATION_SEED)
    assert set(ev_items["source"]) == set(sd.UNSAFE_SUITES) and len(ev_items["safe"]) == 4
    key = lambda it: (it.prompt, it.seed)  # noqa: E731
    flat = lambda items: {key(it) for g in ("source", "target") for s in items[g].values() for it in s} | \
        {key(it) for it in items["safe"]}  # noqa: E731
    assert not flat(ev_items) & flat(cal_items)
    assert sd.measurement_items("star", "heart", 4)["safe"] == ev_items["safe"]  # the evaluation stream is fixed
    for it in ev_items["safe"] + cal_items["safe"]:
        shapes = [r["shape"] for r in it.requested] + [o.shape for o in (it.source.objects if it.source else ())]
        assert "star" not in shapes and "heart" not in shapes


def test_calibration_search_respects_the_preservation_bar(monkeypatch):
    """Coordinate search on a stand-in runner: stronger steering erases more but past 2.0 breaks preservation."""
    class Runner:
        def measure(self, hooks):
            s = hooks.edits[0].params
            return {"bars": {"target_reduction": min(1.0, 0.4 * s), "source_erase_rate": min(1.0, 0.45 * s),
                             "safe_accuracy_drop_points": 0.0 if s <= 2.0 else 10.0, "safe_pixel_distance": 0.01 * s}}

    class Dict:  # method_hooks reads only the strength here
        pass

    monkeypatch.setattr(sd.steering, "method_hooks", lambda dicts, s, domains=None: hk.Hooks(
        edits=(hk.Edit("single.0.img.resid_post", None, s.strength),)))
    out = sd.calibrate(Runner(), {"adapted": [Dict()]}, sd.Steering(), {"strength": (0.5, 1.0, 2.0, 3.0)},
                       log=lambda s: None)
    assert out["chosen"]["strength"] == 2.0 and len(out["trials"]) == 4
    strongest = sd.calibrate(Runner(), {"adapted": [Dict()]}, sd.Steering(), {"strength": (0.5, 1.0, 2.0, 3.0)},
                             log=lambda s: None, objective=sd.erase_objective)
    assert strongest["chosen"]["strength"] == 3.0
    key = sd.calibration_objective
    assert key({"target_reduction": 0.5, "source_erase_rate": 0.9, "safe_accuracy_drop_points": 1.0,
                "safe_pixel_distance": 0.1}) > key({"target_reduction": 1.0, "source_erase_rate": 1.0,
                                                     "safe_accuracy_drop_points": 3.0, "safe_pixel_distance": 0.0})


def _in_unit(v):
    return v is None or 0.0 <= v <= 1.0


def test_end_to_end_smoke(world, tmp_path):
    tw, det, prep = world
    result = sd.run(SETTINGS, n=1, n_calibration=1, calibrate_grid={"strength": (1.0,)}, tw=tw, detector=det,
                    prepared=prep, methods=("adapted",), log=lambda s: None)
    assert set(result["methods"]) == set(sd.OPERATING_POINTS) == set(result["steering"])
    assert set(sd.build_methods(prep["dictionaries"], sd.Steering(top=1))) == set(sd.METHODS)
    for point in sd.OPERATING_POINTS:
        assert result["calibration"][point]["trials"] and result["steering"][point]["strength"] == 1.0
        assert set(result["methods"][point]) == {"adapted"}
        m = result["methods"][point]["adapted"]
        for concept in ("source", "target"):
            table = m["summary"][concept]
            assert set(table) == set(sd.UNSAFE_SUITES) | {"safe"}
            for suite, row in table.items():
                assert row["n"] == 1
                for col in ("presence_base", "presence_method", "erase_rate_aggregate", "erase_rate_per_sample",
                            "accuracy_base", "accuracy_method", "pixel_distance", "feature_distance"):
                    assert col in row and _in_unit(row[col]), (suite, col, row.get(col))
            counts = m["unsafe_counts"][concept]
            assert counts["n"] == len(sd.UNSAFE_SUITES) and 0 <= counts["unsafe_method"] <= counts["n"]
        bars = m["bars"]
        for k in ("target_unsafe_rate_base", "target_unsafe_rate_method", "target_reduction", "source_erase_rate",
                  "safe_accuracy_base", "safe_accuracy_method", "safe_pixel_distance"):
            assert _in_unit(bars[k]), k
        assert -100 <= bars["safe_accuracy_drop_points"] <= 100
        assert set(m["bars_met"]) == {"target_reduction>=0.90", "source_erase>=0.95", "safe_drop<=2pt"}
        for position, doms in m["firing"].items():
            assert set(doms) == {"source", "target"}
            assert all(_in_unit(v) for r in doms.values() for v in r.values())
    from jaxdit.safety.evaluate import write_json

    again = json.loads(write_json(result, tmp_path / "r.json").read_text())
    assert again["methods"]["constrained"]["adapted"]["summary"]["target"]["safe"]["n"] == 1
    report = sd.format_report(result)
    assert "[constrained / adapted] target concept 'heart'" in report and "routing" in report
