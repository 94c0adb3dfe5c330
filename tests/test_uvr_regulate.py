"""UVR restriction transformations against the reference's explicit index operations, and the
controller inside the compiled FLUX / Kontext sampling loops."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxdit import hooks as hk
from jaxdit.attention import joint_attention
from jaxdit.safety.uvr import localize as loc
from jaxdit.safety.uvr.regulate import (RegulateConfig, UVRController, context_restriction, noise_replacement,
                                        text_restriction)

N_TXT, GRID, N_CTX = 3, (2, 3), 6


def _qkv(seed=0, b=2, h=2, d=8):
    rng = np.random.default_rng(seed)
    t = N_TXT + 2 * GRID[0] * GRID[1]
    return [rng.standard_normal((b, t, h, d)).astype(np.float32) for _ in range(3)]


def _reference(q, k, v, core, ring, cfg):
    """The reference code path: explicit P, in-place scaling by index ranges, no renormalisation."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    n_gen = GRID[0] * GRID[1]
    ctx0 = N_TXT + n_gen
    for b in range(q.shape[0]):
        for j in np.flatnonzero(core[b]):
            p[b, :, :ctx0, ctx0 + j] *= cfg.core_scale
        for j in np.flatnonzero(ring[b]):
            p[b, :, :ctx0, ctx0 + j] *= cfg.ring_scale
    p[:, :, N_TXT:ctx0, :ctx0] *= cfg.amplify
    return np.einsum("bhqk,bkhd->bqhd", p, v), p


@pytest.mark.parametrize("backend", ["xla", "dot_product"])
def test_restriction_equals_reference_scaling(backend):
    q, k, v = _qkv()
    rng = np.random.default_rng(1)
    core = rng.random((2, N_CTX)) > 0.6
    ring = (rng.random((2, N_CTX)) > 0.5) & ~core
    cfg = RegulateConfig()
    layout = hk.TokenLayout(N_TXT, GRID[0] * GRID[1], N_CTX)
    mask = context_restriction(layout, jnp.asarray(core), jnp.asarray(ring), cfg)
    out = joint_attention(q, k, v, hk.combine_masks([(mask, jnp.bool_(True))]), backend)
    ref, _ = _reference(q, k, v, core, ring, cfg)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5 * np.abs(ref).max())
    off = context_restriction(layout, jnp.asarray(core), jnp.asarray(ring), cfg, active=False)
    plain = joint_attention(q, k, v, None, backend)
    np.testing.assert_allclose(np.asarray(joint_attention(q, k, v, hk.combine_masks([(off, jnp.bool_(True))]),
                                                          backend)), np.asarray(plain), atol=1e-6)


@pytest.mark.parametrize("backend", ["xla", "dot_product"])
def test_text_restriction_equals_explicit_scaling(backend):
    """Text-to-image: the weights of core / ring generated queries on the text keys scaled in place,
    nothing else touched, no renormalisation; images with empty masks unchanged."""
    n_gen = GRID[0] * GRID[1]
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((2, N_TXT + n_gen, 2, 8)).astype(np.float32) for _ in range(3))
    core = np.zeros((2, n_gen), bool)
    core[0, [1, 4]] = True
    ring = np.zeros_like(core)
    ring[0, [0, 2, 5]] = True
    cfg = RegulateConfig(core_scale=0.1, ring_scale=0.3)
    mask = text_restriction(hk.TokenLayout(N_TXT, n_gen, 0), jnp.asarray(core), jnp.asarray(ring), cfg)
    out = np.asarray(joint_attention(q, k, v, hk.combine_masks([(mask, jnp.bool_(True))]), backend))
    qq, kk, vv = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", qq, kk) / np.sqrt(8)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    for j in np.flatnonzero(core[0]):
        p[0, :, N_TXT + j, :N_TXT] *= 0.1
    for j in np.flatnonzero(ring[0]):
        p[0, :, N_TXT + j, :N_TXT] *= 0.3
    ref = np.einsum("bhqk,bkhd->bqhd", p, vv)
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max())
    assert np.abs(out[0] - np.asarray(joint_attention(q, k, v, None, backend))[0]).max() > 1e-3


def test_t2i_regulation_is_validated():
    with pytest.raises(ValueError, match="RegulateConfig.t2i='mask'"):
        RegulateConfig(t2i="mask")
    assert RegulateConfig.reference().t2i == "noise"


def test_renormalised_variant_is_a_different_method():
    """bias = log(scale) gives softmax(l + log s) V = (reference output) / r, r = sum_k s_k p_k."""
    q, k, v = _qkv(2)
    core = np.zeros((2, N_CTX), bool)
    core[:, :2] = True
    ring = np.zeros_like(core)
    layout = hk.TokenLayout(N_TXT, GRID[0] * GRID[1], N_CTX)
    cfg = RegulateConfig(renormalise=True)
    mask = context_restriction(layout, jnp.asarray(core), jnp.asarray(ring), cfg)
    assert mask.scale is None and mask.bias is not None
    out = np.asarray(joint_attention(q, k, v, hk.combine_masks([(mask, jnp.bool_(True))]), "xla"), np.float64)
    ref, p = _reference(q, k, v, core, ring, RegulateConfig())
    r = p.sum(-1).transpose(0, 2, 1)[..., None]  # [B, T, H, 1]
    np.testing.assert_allclose(out, ref / r, atol=1e-5 * np.abs(ref).max())
    assert np.abs(out - ref).max() > 1e-3


def test_noise_replacement_rows():
    rng = np.random.default_rng(3)
    layout = hk.TokenLayout(N_TXT, 4, 2)
    x = jnp.asarray(rng.standard_normal((2, 6, 2, 4)).astype(np.float32))
    mask = jnp.asarray([[True, False, False, True], [False, False, False, False]])
    (edit, _) = noise_replacement(mask, RegulateConfig())
    ctx = hk.HookContext(layer=jnp.int32(0), step=jnp.int32(0), key=jax.random.key(0), stack="double",
                         stream="img", site="attn_heads", layout=layout)
    out = np.asarray(edit.fn(edit.params, x, ctx))
    x = np.asarray(x)
    changed = np.any(out != x, axis=(2, 3))
    np.testing.assert_array_equal(changed, [[True, False, False, True, False, False], [False] * 6])
    noise = np.asarray(jax.random.normal(jax.random.key(0), (2, 4, 2, 4)))
    np.testing.assert_allclose(out[0, 0], 0.001 * x[0, 0] + 0.999 * noise[0, 0], atol=1e-6)
    inactive = noise_replacement(mask, RegulateConfig(), active=False)[0]
    np.testing.assert_array_equal(np.asarray(inactive.fn(inactive.params, jnp.asarray(x), ctx)), x)


@pytest.fixture(scope="module")
def tiny_pipes(tmp_path_factory):
    from jaxdit.pipeline import FluxKontextPipeline, FluxPipeline
    from pipeline_twins import flux_pipeline_folder

    root = tmp_path_factory.mktemp("uvr")
    flux_pipeline_folder(root / "dev", guidance=True, seed=11)
    flux_pipeline_folder(root / "kontext", guidance=True, seed=12, kontext=True)
    return FluxPipeline.from_pretrained(root / "dev"), FluxKontextPipeline.from_pretrained(root / "kontext")


def _sampler(tiny_pipes, mode):
    """controller -> final latents of a 4-step tiny FLUX (t2i) or Kontext (edit) run, fixed seed."""
    from PIL import Image

    dev, kontext = tiny_pipes
    kw = dict(num_inference_steps=4, max_sequence_length=8, output_type="latent", progress=False, seed=1)
    if mode == "t2i":
        return lambda c: dev("a red star", height=32, width=32, controller=c, **kw)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    return lambda c: kontext(image, "make it blue", height=32, width=32, max_area=32 * 32, auto_resize=False,
                             controller=c, **kw)


def _controller(mode, threshold, heads=2, dh=16, t2i="noise"):
    anchors = jnp.ones((heads, 3, dh))
    cfg = loc.LocalizeConfig(threshold=threshold, min_area=1, keep_mode="mass_ratio", mass_ratio=1.0)
    # single-stream block 1 of the tiny model stands for FLUX's block 10
    # window_t 0: every step of the 4-step test schedule is in the start-up window
    regulate = RegulateConfig(localize_at="single.1.img.attn_heads", window_t=0.0, t2i=t2i)
    return UVRController(anchors, jax.random.key(0), mode, cfg, regulate)


@pytest.mark.parametrize("mode,t2i", [("t2i", "noise"), ("t2i", "restrict"), ("t2i", "restrict+noise"),
                                      ("edit", "noise")])
def test_controller_in_the_sampling_loop(tiny_pipes, mode, t2i):
    run = _sampler(tiny_pipes, mode)
    plain = np.asarray(run(None))
    never = np.asarray(run(_controller(mode, threshold=1e9, t2i=t2i)))  # nothing localized: no restriction
    always = np.asarray(run(_controller(mode, threshold=-1e9, t2i=t2i)))  # every patch unsafe
    np.testing.assert_allclose(never, plain, atol=1e-5)  # empty masks: no restriction, no amplification
    assert np.abs(always - plain).max() > 1e-2 and np.abs(always - never).max() > 1e-2
    np.testing.assert_array_equal(np.asarray(run(_controller(mode, threshold=-1e9, t2i=t2i))), always)


@pytest.mark.parametrize("mode", ["t2i", "edit"])
def test_reference_setting_in_the_sampling_loop(tiny_pipes, mode):
    """The reference-exact setting runs in the same compiled loops. With nothing localized, text-to-image is
    unchanged and editing differs by the first step's x1.05 alone (switched off: unchanged)."""
    run = _sampler(tiny_pipes, mode)
    make = lambda thr, **reg: UVRController.reference(  # noqa: E731
        jnp.ones((2, 3, 16)), jax.random.key(0), mode, localize=dict(threshold=thr, min_area=1),
        localize_at="single.1.img.attn_heads", window_t=0.0, **reg)
    plain = np.asarray(run(None))
    never = np.asarray(run(make(1e9)))
    if mode == "t2i":
        np.testing.assert_allclose(never, plain, atol=1e-5)
        assert np.abs(np.asarray(run(make(-1e9))) - plain).max() > 1e-2
    else:
        assert np.abs(never - plain).max() > 1e-4
        np.testing.assert_allclose(np.asarray(run(make(1e9, amplify_first_step=False))), plain, atol=1e-5)


def test_anchor_collection_from_kontext_edits_at_reference_timing(tiny_pipes):
    """Kontext anchors: the reference collects at every step (text-to-image: only at timestep 104)."""
    from PIL import Image

    from jaxdit.safety.uvr import anchors as anc

    _, kontext = tiny_pipes
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    bank, meta = anc.collect(kontext, ["make the cat blue"], "cat", images=[image], timing="reference",
                             position="single.1.img.attn_heads", height=32, width=32, num_inference_steps=3,
                             num_anchors=2, max_sequence_length=24, max_area=32 * 32, auto_resize=False)
    cfg = kontext.transformer_config
    assert bank.shape == (cfg.num_attention_heads, 2, cfg.attention_head_dim) and np.isfinite(bank).all()
    assert meta["steps"] == [0, 1, 2] and meta["editing"] and meta["timing"] == "reference"


def test_controller_in_sd3_sampling(tmp_path):
    """The same controller on SD3.5 (stack "joint", image-first tokens, CFG batch)."""
    from jaxdit.pipeline import SD3Pipeline
    from pipeline_twins import sd3_pipeline_folder

    sd3_pipeline_folder(tmp_path / "sd3", seed=13, with_t5=False)
    pipe = SD3Pipeline.from_pretrained(tmp_path / "sd3")
    kw = dict(height=32, width=32, num_inference_steps=3, max_sequence_length=6, output_type="latent",
              progress=False, seed=2)
    regulate = RegulateConfig(localize_at="joint.0.img.attn_heads", window_t=0.0)
    make = lambda thr: UVRController(jnp.ones((2, 3, 16)), jax.random.key(0), "t2i",  # noqa: E731
                                     loc.LocalizeConfig(threshold=thr, min_area=1, mass_ratio=1.0), regulate)
    plain = np.asarray(pipe("a red star", **kw))
    np.testing.assert_allclose(np.asarray(pipe("a red star", controller=make(1e9), **kw)), plain, atol=1e-5)
    assert np.abs(np.asarray(pipe("a red star", controller=make(-1e9), **kw)) - plain).max() > 1e-2
