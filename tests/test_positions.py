"""`jaxdit positions`: every hook position with its shape, against the shapes the architecture implies, and
each printed position accepted by a real capture."""

import json

import jax
import numpy as np
import pytest

from jaxdit import flux, hooks as hk
from jaxdit.configs import get_config
from jaxdit.positions import hook_positions


def _expected_flux(cfg, n_img, n_txt, batch):
    """The shapes of docs (jaxdit.hooks): [B, T, D], [B, T, H, Dh], [B, T, 4D], attention sites."""
    d, h, dh = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
    out = {}
    for stack in ("double", "single"):
        for stream, t in (("img", n_img), ("txt", n_txt)):
            for site in flux.POSITIONS[stack][stream]:
                out[f"{stack}.*.{stream}.{site}"] = {"attn_heads": (batch, t, h, dh), "mlp_act": (batch, t, 4 * d)
                                                     }.get(site, (batch, t, d))
        out[f"{stack}.*.joint.attn_probs_txt_to_img"] = (batch, h, n_txt, n_img)
        out[f"{stack}.*.joint.attn_img_sources"] = (batch, n_img, n_txt + 1)
    out["embed.0.txt.pooled"] = (batch, cfg.pooled_projection_dim)  # the one site outside the blocks
    return out


def test_flux_shapes_with_context_tokens():
    cfg = get_config("tiny-flux")
    rows = hook_positions(cfg, height=48, width=80, text_tokens=7, context=True, batch=2)
    n_img = 2 * (48 // 16) * (80 // 16)  # generated + context tokens
    assert {r.pattern: r.shape for r in rows} == _expected_flux(cfg, n_img, 7, 2)
    assert all(r.dtype == "float32" and len(r.layers) == r.total for r in rows)


def test_every_printed_position_is_captured_with_that_shape():
    cfg = get_config("tiny-sd3.5-large")
    rows = hook_positions(cfg, height=32, width=32, text_tokens=5)
    from jaxdit import sd3

    params = sd3.init_params(cfg, jax.random.key(0))
    x = np.zeros((1, cfg.in_channels, 4, 4), np.float32)
    enc = np.zeros((1, 5, cfg.joint_attention_dim), np.float32)
    pooled = np.zeros((1, cfg.pooled_projection_dim), np.float32)
    names = [r.pattern for r in rows]
    _, caps = sd3.forward(params, cfg, x, enc, pooled, np.ones((1,), np.float32), hooks=hk.Hooks(capture=tuple(names)))
    for r in rows:
        for layer in r.layers:
            name = r.pattern.replace(".*.", f".{layer}.") if ".*." in r.pattern else r.pattern
            assert caps[name].shape == r.shape, name
    assert any(len(r.layers) < r.total for r in rows)  # the last block has no text output: its sites are absent


def test_cli_on_a_pipeline_folder_and_bad_sizes(tmp_path, capsys):
    from pipeline_twins import flux_pipeline_folder

    from jaxdit.cli import main

    flux_pipeline_folder(tmp_path / "dev", guidance=True, seed=1)
    assert main(["positions", "--model", str(tmp_path / "dev"), "--size", "64x32", "--text-tokens", "6",
                 "--json"]) == 0
    rows = {r["position"]: r for r in json.loads(capsys.readouterr().out)}
    resid = rows["double.*.img.resid_pre"]["shape"]
    assert resid[:2] == [1, (64 // 16) * (32 // 16)] and rows["single.*.txt.resid_post"]["shape"][1] == 6
    assert main(["positions", "--preset", "tiny-flux", "--size", "40"]) == 2
    assert main(["positions", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "multiples of 16" in err[0] and str(tmp_path) in err[1]
    with pytest.raises(ValueError, match="only for FLUX"):
        hook_positions(get_config("tiny-sd3"), 32, 32, 4, context=True)
