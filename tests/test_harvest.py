"""Harvesting activations from tiny FLUX / SD3 trajectories into stores, then train, export, import."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdit import flux, hooks as hk
from jaxdit.configs import get_config
from jaxdit.sampling import FLUX_DEV_SCHEDULER, SD3_SCHEDULER, euler_sample, flow_match_schedule, flux_schedule
from jaxdit.train import harvest as hv
from jaxdit.train.interop import load_sae
from jaxdit.train.store import ActivationStore

POSITIONS = ("single.1.img.resid_post", "double.0.txt.attn_heads")


@pytest.fixture(scope="module")
def tiny_flux():
    cfg = get_config("tiny-flux")
    return cfg, jax.jit(flux.init_params, static_argnums=0)(cfg, jax.random.key(0))


def _conditioning(batches, batch=2, n_txt=5, dim=24, pooled=12, seed=0):
    rng = np.random.default_rng(seed)
    return [{"encoder_hidden_states": jnp.asarray(rng.normal(size=(batch, n_txt, dim)), jnp.float32),
             "pooled_projections": jnp.asarray(rng.normal(size=(batch, pooled)), jnp.float32)} for _ in range(batches)]


def _capture(model, latents, step, timesteps, cond, positions):
    """The captures of one direct model call at `step` (jitted: eager Flax is slow)."""
    run = jax.jit(lambda x, c: model.apply(x, jnp.float32(timesteps[step]), jnp.int32(step),
                                           hk.Hooks(capture=positions, step=step), c)[1])
    return {k: np.asarray(v) for k, v in run(latents, cond).items()}


def test_flux_harvest_matches_the_trajectory_and_resumes(tmp_path, tiny_flux):
    cfg, params = tiny_flux
    model = hv.flux_model(params, cfg, name="tiny-flux", height=64, width=48)
    sigmas, timesteps = flux_schedule(FLUX_DEV_SCHEDULER, 4, model.latent_shape[0])
    conds = _conditioning(3)
    prompts = [f"prompt {i}" for i in range(6)]
    stores = hv.harvest(model, conds, POSITIONS, [2, 0], sigmas=sigmas, timesteps=timesteps, out=tmp_path, seed=7,
                        prompts=prompts, progress=False)
    img, txt = stores["single.1.img.resid_post"], stores["double.0.txt.attn_heads"]
    assert (img.d, img.count, txt.d, txt.count) == (32, 3 * 2 * 2 * 12, 32, 3 * 2 * 2 * 5)
    manifest = json.loads((tmp_path / "single.1.img.resid_post" / "manifest.json").read_text())
    assert manifest["model"] == "tiny-flux" and manifest["steps"] == [0, 2] and manifest["prompts"] == 6
    assert manifest["timesteps"] == pytest.approx([float(timesteps[0]), float(timesteps[2])])
    assert manifest["chunks"][1]["prompt_texts"] == ["prompt 2", "prompt 3"]
    assert manifest["chunks"][1]["prompt_range"] == [2, 4] and manifest["chunks"][1]["tokens"] == 12

    # batch 1 against a direct run: noise from (seed, batch), two Euler steps, then the captures
    noise = jax.random.normal(jax.random.fold_in(jax.random.key(7), 1), (2, *model.latent_shape))
    denoise = lambda x, t, i: model.apply(x, t, i, None, conds[1])[0]  # noqa: E731
    after_two = jax.jit(lambda x: euler_sample(denoise, x, sigmas[:3], timesteps[:2]))(noise)
    first, third = (_capture(model, x, s, timesteps, conds[1], POSITIONS) for x, s in ((noise, 0), (after_two, 2)))
    rows = img.read(1).reshape(2, 2, 12, 32)  # [step, prompt, token, width]
    np.testing.assert_allclose(rows[0], first[POSITIONS[0]], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rows[1], third[POSITIONS[0]], rtol=1e-4, atol=1e-4)
    heads = txt.read(1).reshape(2, 2, 5, 32)
    np.testing.assert_allclose(heads[1], third[POSITIONS[1]].reshape(2, 5, 32), rtol=1e-4, atol=1e-4)

    # a crash after the image store took batch 2 but before the text store did
    path = tmp_path / "double.0.txt.attn_heads" / "manifest.json"
    m = json.loads(path.read_text())
    lost = txt.read(2)
    m["chunks"], m["count"] = m["chunks"][:2], m["count"] - m["chunks"][2]["rows"]
    path.write_text(json.dumps(m))
    again = hv.harvest(model, conds, POSITIONS, [0, 2], sigmas=sigmas, timesteps=timesteps, out=tmp_path, seed=7,
                       progress=False)
    assert again["single.1.img.resid_post"].count == img.count
    assert [c["batch"] for c in again["double.0.txt.attn_heads"].chunks] == [0, 1, 2]
    np.testing.assert_allclose(again["double.0.txt.attn_heads"].read(2), lost, rtol=1e-6, atol=1e-6)


def test_harvest_errors(tmp_path, tiny_flux):
    cfg, params = tiny_flux
    model = hv.flux_model(params, cfg, name="tiny-flux", height=32, width=32)
    sigmas, timesteps = flux_schedule(FLUX_DEV_SCHEDULER, 3, 4)
    run = dict(sigmas=sigmas, timesteps=timesteps, out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="not a per-token activation"):
        hv.harvest(model, _conditioning(1), ["single.0.joint.attn_probs_txt_to_img"], [0], **run)
    with pytest.raises(ValueError, match=r"must be step indices in \[0, 3\)"):
        hv.harvest(model, _conditioning(1), POSITIONS, [3], **run)
    with pytest.raises(ValueError, match="layer 9 out of range"):
        hv.harvest(model, _conditioning(1), ["single.9.img.resid_post"], [0], **run)
    with pytest.raises(ValueError, match="multiples of 16"):
        hv.flux_model(params, cfg, name="x", height=40, width=32)


def test_sd3_harvest(tmp_path):
    from jaxdit import sd3

    cfg = get_config("tiny-sd3")
    params = jax.jit(sd3.init_params, static_argnums=0)(cfg, jax.random.key(0))
    model = hv.sd3_model(params, cfg, name="tiny-sd3", height=32, width=32)
    sigmas, timesteps = flow_match_schedule(SD3_SCHEDULER, 3)
    conds = _conditioning(1, n_txt=4, dim=cfg.joint_attention_dim, pooled=cfg.pooled_projection_dim)
    stores = hv.harvest(model, conds, ["joint.*.img.resid_post", "joint.0.txt.mlp_out"], [1], sigmas=sigmas,
                        timesteps=timesteps, out=tmp_path, progress=False)
    assert sorted(stores) == ["joint.0.img.resid_post", "joint.0.txt.mlp_out", "joint.1.img.resid_post"]
    store = stores["joint.1.img.resid_post"]
    assert store.d == cfg.inner_dim and store.count == 2 * (32 // 8 // cfg.patch_size) ** 2
    assert stores["joint.0.txt.mlp_out"].count == 2 * 4


def test_harvest_train_export_import_round_trip(tmp_path, tiny_flux):
    """The whole path through the CLI: harvest -> store -> train on a mesh -> export -> import, exact."""
    from test_sae_cli import run_cli

    cfg, params = tiny_flux
    model = hv.flux_model(params, cfg, name="tiny-flux", height=64, width=64)
    sigmas, timesteps = flux_schedule(FLUX_DEV_SCHEDULER, 4, model.latent_shape[0])
    hv.harvest(model, _conditioning(4, batch=4), ["single.2.img.resid_post"], [0, 3], sigmas=sigmas,
               timesteps=timesteps, out=tmp_path / "acts", progress=False)
    store = tmp_path / "acts" / "single.2.img.resid_post"
    assert ActivationStore.open(store).count == 4 * 4 * 2 * 16
    assert run_cli(["sae", "train", "--data", str(store), "--out", str(tmp_path / "run"), "--k", "4",
                    "--expansion", "2", "--steps", "20", "--batch-size", "32", "--warmup", "2", "--mesh", "2,1,2",
                    "--aux-k", "8", "--log-every", "10", "--checkpoint-every", "10", "--no-progress"]) == 0
    cfg_sae, params_sae = load_sae(tmp_path / "run")
    assert cfg_sae.position == "single.2.img.resid_post" and cfg_sae.model == "tiny-flux"
    assert (cfg_sae.d_in, cfg_sae.n_latents) == (32, 64) and cfg_sae.input_scale != 1.0
    for fmt in ("saelens", "sparsify"):
        assert run_cli(["sae", "export", "--format", fmt, str(tmp_path / "run"), str(tmp_path / fmt)]) == 0
        assert run_cli(["sae", "import", "--format", fmt, str(tmp_path / fmt), str(tmp_path / f"{fmt}-back")]) == 0
        cfg_back, params_back = load_sae(tmp_path / f"{fmt}-back")
        assert cfg_back == cfg_sae
        for key in params_sae:
            np.testing.assert_array_equal(params_back[key], params_sae[key], err_msg=f"{fmt} {key}")


def test_harvest_cli_from_a_checkpoint(tmp_path, tiny_flux):
    from test_sae_cli import run_cli

    from jaxdit.convert.checkpoint import save_checkpoint
    from jaxdit.train.interop import write_safetensors

    cfg, params = tiny_flux
    save_checkpoint(tmp_path / "ckpt", cfg, params)
    cond = _conditioning(1, batch=3)[0]
    write_safetensors(tmp_path / "emb.safetensors", {k: np.asarray(v) for k, v in cond.items()})
    (tmp_path / "prompts.json").write_text(json.dumps(["a", "b", "c"]))
    argv = ["sae", "harvest", "--model", str(tmp_path / "ckpt"), "--conditioning", str(tmp_path / "emb.safetensors"),
            "--prompts", str(tmp_path / "prompts.json"), "--positions", "double.1.img.resid_post", "--steps", "1",
            "--num-steps", "2", "--height", "32", "--width", "32", "--batch-size", "2", "--out", str(tmp_path / "acts")]
    assert run_cli(argv) == 0
    store = ActivationStore.open(tmp_path / "acts" / "double.1.img.resid_post")
    assert store.count == 3 * 4 and [c["prompt_texts"] for c in store.chunks] == [["a", "b"], ["c"]]
    assert store.manifest["model"] == "ckpt"
    (tmp_path / "prompts.json").write_text(json.dumps(["a"]))
    assert run_cli(argv[:-1] + [str(tmp_path / "acts2")]) == 2


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_harvest_cli_from_a_pipeline_folder_and_prompts(tmp_path, family):
    """`jaxdit sae harvest --model PIPELINE --prompts FILE`: prompts encoded by the folder's own encoders,
    activations equal to a capture of the same trajectory through the pipeline's transformer."""
    from pipeline_twins import flux_pipeline_folder, sd3_pipeline_folder
    from test_sae_cli import run_cli

    folder = tmp_path / "pipe"
    (flux_pipeline_folder if family == "flux" else sd3_pipeline_folder)(folder, seed=41)
    (tmp_path / "prompts.txt").write_text("a red star\n\ntwo dogs in the snow\na cat\n")
    position = "double.0.img.resid_post" if family == "flux" else "joint.0.txt.resid_post"
    argv = ["sae", "harvest", "--model", str(folder), "--prompts", str(tmp_path / "prompts.txt"), "--positions",
            position, "--steps", "0", "1", "--num-steps", "2", "--height", "32", "--width", "32", "--batch-size", "2",
            "--out", str(tmp_path / "acts")]
    assert run_cli(argv) == 0
    store = ActivationStore.open(tmp_path / "acts" / position)
    assert [c["prompt_texts"] for c in store.chunks] == [["a red star", "two dogs in the snow"], ["a cat"]]
    assert store.count > 0 and store.manifest["steps"] == [0, 1]
    assert run_cli(argv[:2] + ["--model", str(folder), "--positions", position, "--steps", "0",
                               "--out", str(tmp_path / "x")]) == 2
