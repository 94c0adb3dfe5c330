"""The splash backend (Pallas TPU kernel, interpret mode on CPU) against the xla reference path.

Shapes are the smallest that still exercise the kernel's structure: sequences that are not a multiple of
the block (padding masked by segment ids) and span several 128-token blocks, batch 2, Kontext context
tokens, heads sharded over the `tensor` axis of the 8-device test mesh.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxdit import flux, hooks as hk, sd3, sharding
from jaxdit.attention import joint_attention, resolve_backend, splash_block_size
from jaxdit.configs import get_config
from jaxdit.safety.uvr.regulate import RegulateConfig, context_restriction
from sd3_twins import sd3_inputs
from twins import flux_inputs, rel_err

TOL = 1e-5


def _qkv_mask(seed=0, b=2, t=300, h=4, d=16, groups=3):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((b, t, h, d)).astype(np.float32) for _ in range(3))
    ids = rng.integers(0, groups - 1, (b, t)).astype(np.int32)
    ids[0, :7] = groups - 1  # the last group is absent from the second sequence
    bias = rng.normal(0, 2, (b, h, groups, groups)).astype(np.float32)
    bias[:, :, 0, 1] = -np.inf  # a blocked (query group, key group) pair
    scale = rng.uniform(0.1, 1.5, (1, h, groups, groups)).astype(np.float32)
    return q, k, v, ids, bias, scale


def _splash(*args):
    return jax.jit(lambda *a: joint_attention(*a, backend="splash"))(*args)


@pytest.mark.parametrize("parts", ["none", "scale", "bias+scale"])
def test_kernel_equals_xla_with_every_mask_form(parts):
    q, k, v, ids, bias, scale = _qkv_mask()
    mask = None if parts == "none" else (ids, bias if "bias" in parts else None, scale if "scale" in parts else None)
    ref = joint_attention(q, k, v, mask, "xla")
    assert rel_err(_splash(q, k, v, mask), ref) <= TOL


def test_block_sizes_and_padding():
    assert splash_block_size(4096 + 512) == 512  # FLUX 1024^2: 9 blocks, no padding
    assert splash_block_size(8192 + 512) == 512  # Kontext 1024^2: 17 blocks, no padding
    assert splash_block_size(4096 + 333) == 512  # SD3 1024^2: padded to 4608
    assert splash_block_size(300) == 128  # the tests: 3 blocks, 84 padded tokens
    assert splash_block_size(100) == 128


def test_backend_names(monkeypatch):
    assert resolve_backend("splash", jnp.float32) == "splash"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert resolve_backend("auto", jnp.bfloat16) == "splash"
    assert resolve_backend("auto", jnp.float32) == "splash"
    with pytest.raises(ValueError, match="unknown; expected one of"):
        resolve_backend("flash", jnp.float32)


# --- whole models on the 8-device mesh ---------------------------------------------------------------

MESH = dict(data=2, fsdp=1, tensor=4)  # batch 2 over data, 4 heads over tensor


def _random_params(abstract, seed):
    """Random parameters for an abstract tree, drawn on the host: much faster than compiling `init`."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if str(getattr(path[-1], "key", "")) == "scale":  # norm scales around 1
            return (1 + 0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        std = leaf.shape[-2] ** -0.5 if len(leaf.shape) >= 2 else 0.1
        return (std * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _on_mesh(forward, params, axes, *args):
    """forward(params, *args) jitted under the test mesh with parameters sharded by their logical `axes`
    under jaxdit's rules; the attention must have gone through shard_map."""
    mesh = sharding.make_mesh(**MESH)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(params, sharding.param_shardings(params, mesh, axes))
        traced = jax.jit(forward).trace(sharded, *args)
        assert "shard_map" in str(traced.jaxpr)
        return traced.lower().compile()(sharded, *args)


@pytest.fixture(scope="module")
def kontext():
    """A 4-head tiny FLUX with Kontext tokens: 12 text + 12x12 generated + 12x12 context = 300 tokens."""
    cfg = get_config("tiny-flux", num_attention_heads=4)
    params = _random_params(flux.abstract_params(cfg), 0)
    inputs, n_ctx = flux_inputs(cfg, 2, 12, 12, 12, seed=1, n_ctx_grid=(12, 12))
    layout = hk.TokenLayout(12, 144, n_ctx)
    return cfg, params, inputs, layout


def _every_flux_hook(layout, heads):
    """A bias over (text, generated, context labels 0/1/2) on the double blocks, UVR's editing restriction
    (post-softmax, not renormalised) on the single blocks, attention-probability captures at one layer of
    each stack, per-head captures, and an edit adding PRNG noise."""
    rng = np.random.default_rng(2)
    labels = jnp.asarray(rng.integers(0, 3, (2, layout.n_ctx)))
    groups = hk.token_groups(layout, ctx_labels=labels, num_ctx_labels=3)
    bias = hk.AttentionMask(groups, bias=jnp.asarray(rng.normal(0, 1.5, (2, heads, 5, 5)), jnp.float32),
                            layers="double.*")
    core = jnp.asarray(rng.random((2, layout.n_ctx)) > 0.7)
    ring = jnp.asarray(rng.random((2, layout.n_ctx)) > 0.6) & ~core
    uvr = context_restriction(layout, core, ring, RegulateConfig(blocks="single.*"))
    assert uvr.bias is None and uvr.scale is not None
    return hk.Hooks(capture=("double.0.joint.attn_probs_txt_to_img", "single.1.joint.attn_img_sources",
                             "single.*.img.attn_heads"),
                    edits=(hk.Edit("single.0.img.attn_heads",
                                   lambda p, x, ctx: x + 0.1 * jax.random.normal(ctx.key, x.shape)),),
                    attention=(bias, uvr), rng=jax.random.key(3))


def _equal_runs(forward_for, params, axes, hooks):
    """The splash forward on the mesh equals the xla forward on one device, output and captures."""
    ref, ref_caps = jax.jit(forward_for("xla"))(params, hooks)
    out, caps = _on_mesh(forward_for("splash"), params, axes, hooks)
    assert rel_err(out, ref) <= TOL
    assert caps.keys() == ref_caps.keys()
    for name in ref_caps:
        assert rel_err(caps[name], ref_caps[name]) <= TOL, name
    return ref


def test_flux_kontext_forward_equals_xla(kontext):
    cfg, params, inputs, layout = kontext

    def forward_for(backend):
        c = cfg.replace(attention_backend=backend)
        return lambda p, h: flux.forward(p, c, **inputs, hooks=h, num_context_tokens=layout.n_ctx)

    axes = flux.logical_axes(cfg)
    plain = _equal_runs(forward_for, params, axes, None)
    hooked = _equal_runs(forward_for, params, axes, _every_flux_hook(layout, cfg.num_attention_heads))
    assert rel_err(hooked, plain) > 1e-3  # the hooks did something


def test_sd35_forward_equals_xla():
    """SD3.5-Medium style (MMDiT-X dual attention): 16x16 patches + 12 text tokens = 268, with a bias and a
    scale at block 1, captures and an edit. Block 0 runs the kernel with the mask switched off, and its
    image self-attention `attn2` (hookless, 256 tokens: one block, no padding) without a mask."""
    cfg = get_config("tiny-sd3.5-medium", num_layers=2, num_attention_heads=4, caption_projection_dim=64,
                     pos_embed_max_size=16)
    params = _random_params(sd3.abstract_params(cfg), 4)
    inputs = sd3_inputs(cfg, 2, 32, 32, 12, seed=5)
    layout = hk.TokenLayout(12, 256, text_first=False)
    rng = np.random.default_rng(6)
    labels = jnp.asarray(rng.integers(0, 2, (2, 256)))
    groups = hk.token_groups(layout, img_labels=labels, num_img_labels=2)  # text, two image groups
    mask = hk.AttentionMask(groups, jnp.asarray(rng.normal(0, 1.5, (1, 4, 3, 3)), jnp.float32),
                            jnp.asarray(rng.uniform(0.3, 1.2, (2, 1, 3, 3)), jnp.float32), layers="joint.1")
    hooks = hk.Hooks(capture=("joint.1.joint.attn_probs_txt_to_img", "joint.*.img.attn_heads"), attention=(mask,),
                     edits=(hk.Edit("joint.0.txt.attn_out", lambda p, x, ctx: x * 0.5),))

    def run(backend):
        c = cfg.replace(attention_backend=backend)
        return lambda p, h: sd3.forward(p, c, **inputs, hooks=h)

    _equal_runs(run, params, sd3.logical_axes(cfg), hooks)


def test_benchmark_runs_at_tiny_size(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "attention_backends.py"
    spec = importlib.util.spec_from_file_location("attention_backends", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--backends", "flash", "--out", str(out)])
    assert bench.main(["--tiny", "--steps", "2", "--repeats", "1", "--backends", "splash", "--mesh", "1,1,2",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["uvr_tokens"] == 8 + 2 * 16 and result["mesh"] == {"data": 1, "fsdp": 1, "tensor": 2}
    (run,) = result["runs"]
    assert run["backend"] == "splash" and "error" not in run
    assert run["forward_s"] > 0 and run["uvr_sample_s"] > 0
