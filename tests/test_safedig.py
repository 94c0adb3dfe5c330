"""SafeDIG core: routing on planted data, harmful latents, frozen-encoder adaptation, Blend and Repel."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxdit import flux, hooks as hk
from jaxdit.configs import get_config
from jaxdit.safety.safedig import core
from jaxdit.train import sae as sae_lib

D = 16


def _planted(rng, direction, n=200, scale=3.0):
    safe = rng.standard_normal((n, D))
    unsafe = rng.standard_normal((n, D)) + scale * direction
    return unsafe, safe


def test_routing_picks_the_stable_position():
    rng = np.random.default_rng(0)
    v = np.eye(D)[0]
    stable = {"source": _planted(rng, v), "shifts": [_planted(rng, v) for _ in range(3)]}
    moving = {"source": _planted(rng, v), "shifts": [_planted(rng, np.eye(D)[i]) for i in (3, 5, 7)]}
    weak = {"source": _planted(rng, v, scale=0.3), "shifts": [_planted(rng, v, scale=0.3) for _ in range(3)]}
    rows = core.route({"double.3.img.resid_post": moving, "single.10.img.resid_post": stable,
                       "double.0.txt.resid_post": weak}, top=1)
    assert rows[0]["position"] == "single.10.img.resid_post" and rows[0]["chosen"]
    assert not rows[1]["chosen"] and rows[0]["stability"] > 0.9
    by = {r["position"]: r for r in rows}
    assert by["double.3.img.resid_post"]["stability"] < 0.3
    assert by["double.0.txt.resid_post"]["separability"] < by["single.10.img.resid_post"]["separability"]


def _sae(rng, n=32, planted=None):
    cfg = sae_lib.SAEConfig(d_in=D, n_latents=n, arch="topk", k=4)
    params = sae_lib.init_params(cfg, jax.random.key(int(rng.integers(1 << 30))))
    if planted is not None:  # latent 3 reads and writes the unsafe direction
        params["W_dec"] = params["W_dec"].at[3].set(jnp.asarray(planted, jnp.float32))
        params["W_enc"] = params["W_enc"].at[:, 3].set(jnp.asarray(planted, jnp.float32) * 2)
    return cfg, params


def test_harmful_latents_by_contrast():
    rng = np.random.default_rng(1)
    v = np.eye(D)[2]
    cfg, params = _sae(rng, planted=v)
    unsafe, safe = _planted(rng, v, scale=4.0)
    found = core.harmful_latents(params, cfg, jnp.asarray(unsafe, jnp.float32), jnp.asarray(safe, jnp.float32), 3)
    assert 3 in found.tolist()


def test_decoder_adaptation_keeps_the_encoder_bitwise():
    rng = np.random.default_rng(2)
    cfg, params = _sae(rng)
    target = jnp.asarray(rng.standard_normal((512, D)) + 2.0, jnp.float32)
    before = sae_lib.reconstruct(params, cfg, target)
    adapted, losses = core.adapt_decoder(params, cfg, target, core.AdaptConfig(steps=150, batch_size=128, lr=1e-2))
    for name in ("W_enc", "b_enc"):
        assert adapted[name] is params[name]
        np.testing.assert_array_equal(np.asarray(adapted[name]), np.asarray(params[name]))
    assert not np.array_equal(np.asarray(adapted["W_dec"]), np.asarray(params["W_dec"]))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(adapted["W_dec"]), axis=-1), 1.0, atol=1e-5)
    err = lambda p: float(jnp.mean((sae_lib.reconstruct(p, cfg, target) - target) ** 2))  # noqa: E731
    assert err(adapted) < 0.5 * float(jnp.mean((before - target) ** 2)) and losses[-1] < losses[0]
    with pytest.raises(ValueError, match=r"\[N, 16\]"):
        core.adapt_decoder(params, cfg, target[:, :4])


@pytest.mark.parametrize("mode", ["blend", "repel"])
def test_blend_and_repel(mode):
    rng = np.random.default_rng(3)
    v = np.eye(D)[5]
    cfg, src = _sae(rng, planted=v)
    tgt = {**src, "W_dec": sae_lib.normalize_decoder({"W_dec": src["W_dec"] + 0.1})["W_dec"]}
    harmful = jnp.asarray([3])
    x = jnp.asarray(rng.standard_normal((2, 10, D)), jnp.float32)
    x = x.at[0, :4].add(jnp.asarray(5 * v, jnp.float32))  # harmful latent fires on these tokens
    z = sae_lib.encode_dense(src, cfg, x.reshape(-1, D))
    fires = np.asarray(z[:, 3] > 0)
    assert fires[:4].all() and not fires.all()
    out = core.steer(x, src, tgt, cfg, harmful, core.SteerConfig(mode=mode, strength=0.7))
    flat_x, flat_o = np.asarray(x).reshape(-1, D), np.asarray(out).reshape(-1, D)
    np.testing.assert_array_equal(flat_o[~fires], flat_x[~fires])  # identity where nothing harmful fires
    zn, xs = np.asarray(z), flat_x[fires]
    if mode == "repel":
        ref = xs - 0.7 * zn[fires][:, [3]] @ np.asarray(tgt["W_dec"])[[3]]
    else:
        dec = lambda p, zz: zz @ np.asarray(p["W_dec"]) + np.asarray(p["b_dec"])  # noqa: E731
        err = xs - dec(src, zn[fires])
        z_safe = zn[fires].copy()
        z_safe[:, 3] = 0
        ref = 0.3 * xs + 0.7 * (dec(tgt, z_safe) + err)
    np.testing.assert_allclose(flat_o[fires], ref, rtol=1e-5, atol=1e-5)
    after = np.asarray(sae_lib.encode_dense(src, cfg, out.reshape(-1, D)))[:, 3]
    assert after[fires].mean() < zn[fires, 3].mean()
    window = core.steer(x, src, tgt, cfg, harmful, core.SteerConfig(mode=mode, steps=(2, 5)), step=jnp.int32(7))
    np.testing.assert_array_equal(np.asarray(window), np.asarray(x))


def test_steering_edit_in_flux_and_composition_with_uvr():
    cfg_model = get_config("tiny-flux")
    params = flux.init_params(cfg_model, jax.random.key(0))
    rng = np.random.default_rng(4)
    inputs = dict(hidden_states=rng.standard_normal((1, 12, 16)).astype(np.float32),
                  encoder_hidden_states=rng.standard_normal((1, 5, 24)).astype(np.float32),
                  pooled_projections=rng.standard_normal((1, 12)).astype(np.float32),
                  timestep=np.array([0.9], np.float32), img_ids=flux.image_ids(3, 4), txt_ids=flux.text_ids(5),
                  guidance=np.array([3.5], np.float32))
    plain, _ = flux.forward(params, cfg_model, **inputs)
    sae_cfg = sae_lib.SAEConfig(d_in=cfg_model.inner_dim, n_latents=64, k=8)
    sae_params = sae_lib.init_params(sae_cfg, jax.random.key(1))
    quiet = core.steering_edit("single.1.img.resid_post", sae_params, sae_params, sae_cfg, [0, 1],
                               core.SteerConfig(gate=1e9))
    out, _ = flux.forward(params, cfg_model, **inputs, hooks=hk.Hooks(edits=(quiet,)))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
    loud = core.steering_edit("single.1.img.resid_post", sae_params, sae_params, sae_cfg, list(range(64)),
                              core.SteerConfig(mode="repel", gate=-1e9))
    from jaxdit.safety.uvr.regulate import RegulateConfig, noise_replacement

    uvr = hk.Hooks(edits=noise_replacement(jnp.ones((1, 12), bool), RegulateConfig()), rng=jax.random.key(0))
    both = hk.merge(hk.Hooks(edits=(loud,)), uvr)
    out, _ = flux.forward(params, cfg_model, **inputs, hooks=both)
    assert len(both.edits) == 3 and np.abs(np.asarray(out) - np.asarray(plain)).max() > 1e-3


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_cli_route_train_adapt_generate_on_tiny_folders(tmp_path, family, capsys):
    """End to end on a tiny pipeline folder: harvest source/target unsafe and safe prompts, route,
    train the dictionary, adapt its decoder (encoder bitwise frozen), generate with Blend and Repel."""
    import json

    from PIL import Image

    from jaxdit.cli import main
    from jaxdit.safety.safedig.cli import load_dictionary
    from pipeline_twins import flux_pipeline_folder, sd3_pipeline_folder

    folder = tmp_path / "pipe"
    (flux_pipeline_folder if family == "flux" else sd3_pipeline_folder)(folder, seed=51)
    positions = (["double.0.img.resid_post", "single.1.img.resid_post"] if family == "flux"
                 else ["joint.0.img.resid_post", "joint.1.img.resid_post"])
    prompts = {"src_unsafe": "a red star\na red star in the snow\n", "src_safe": "a blue ring\ntwo dogs\n",
               "tgt_unsafe": "a cat on a red chair\na red cat\n", "tgt_safe": "a blue sky\na dog\n"}
    for name, text in prompts.items():
        (tmp_path / f"{name}.txt").write_text(text)
        assert main(["sae", "harvest", "--model", str(folder), "--prompts", str(tmp_path / f"{name}.txt"),
                     "--positions", *positions, "--steps", "0", "--num-steps", "2", "--height", "32", "--width",
                     "32", "--out", str(tmp_path / name)]) == 0
    r = lambda n: str(tmp_path / n)  # noqa: E731
    assert main(["safedig", "route", "--source-unsafe", r("src_unsafe"), "--source-safe", r("src_safe"),
                 "--shift-unsafe", r("tgt_unsafe"), "--shift-safe", r("tgt_safe"), "--top", "1",
                 "--out", r("routing.json")]) == 0
    table = json.loads((tmp_path / "routing.json").read_text())["positions"]
    with Image.open(tmp_path / "routing.png") as im:
        assert im.format == "PNG" and im.size[1] > 40
    assert {row["position"] for row in table} == set(positions) and sum(row["chosen"] for row in table) == 1
    chosen = next(row["position"] for row in table if row["chosen"])
    assert main(["safedig", "train", "--unsafe", r("src_unsafe"), "--safe", r("src_safe"), "--position", chosen,
                 "--k", "4", "--expansion", "2", "--steps", "20", "--batch-size", "64", "--num-harmful", "4",
                 "--no-progress", "--out", r("dict")]) == 0
    assert main(["safedig", "adapt", "--dictionary", r("dict"), "--target", r("tgt_unsafe"), "--steps", "20",
                 "--out", r("adapted")]) == 0
    _, src, _, _, _ = load_dictionary(tmp_path / "dict")
    _, src_a, tgt_a, harmful, meta = load_dictionary(tmp_path / "adapted")
    assert meta["adapted"] and len(harmful) > 0
    for k in ("W_enc", "b_enc"):
        np.testing.assert_array_equal(tgt_a[k], src[k])
    np.testing.assert_array_equal(src_a["W_dec"], src["W_dec"])
    assert not np.array_equal(tgt_a["W_dec"], src["W_dec"])
    for mode in ("blend", "repel"):
        out = tmp_path / f"{mode}.png"
        assert main(["safedig", "generate", "--model", str(folder), "--dictionary", r("adapted"), "--mode", mode,
                     "--prompt", "a red star", "--steps", "2", "--size", "32", "--out", str(out)]) == 0
        with Image.open(out) as im:
            assert im.size == (32, 32)
    (tmp_path / "eval.csv").write_text("prompt,evaluation_seed\na red star,3\n")
    assert main(["safety", "eval", "--model", str(folder), "--prompts", r("eval.csv"), "--method", "safedig",
                 "--dictionary", r("adapted"), "--mode", "repel", "--steps", "2", "--size", "32",
                 "--out", r("eval")]) == 0
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["method"] == "safedig"
    assert main(["safedig", "adapt", "--dictionary", r("src_safe"), "--target", r("tgt_unsafe"),
                 "--out", r("x")]) == 2
    assert "src_safe" in capsys.readouterr().err
