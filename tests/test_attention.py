"""Joint attention and group-structured masks against a direct dense computation in numpy."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxdit import hooks as hk
from jaxdit.attention import joint_attention, resolve_backend
from jaxdit.layers import apply_rope, rope_table, timestep_sinusoid


def _dense_reference(q, k, v, groups, bias, scale):
    """Explicit softmax matrix, then bias before and un-renormalised scale after, in float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    b, h, t = logits.shape[0], logits.shape[1], logits.shape[2]
    g = np.broadcast_to(groups, (b, t))
    full = lambda m: np.stack([np.broadcast_to(m, (b, h) + m.shape[2:])[i][:, g[i]][:, :, g[i]]  # noqa: E731
                               for i in range(b)])
    if bias is not None:
        logits = logits + full(np.asarray(bias, np.float64))
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    if scale is not None:
        w = w * full(np.asarray(scale, np.float64))
    return np.einsum("bhqk,bkhd->bqhd", w, v)


def _inputs(seed=0, b=2, t=11, h=3, d=8, groups=4):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((b, t, h, d)).astype(np.float32) for _ in range(3))
    ids = rng.integers(0, groups, (b, t)).astype(np.int32)
    bias = rng.normal(0, 2, (b, h, groups, groups)).astype(np.float32)
    scale = rng.uniform(0.1, 1.5, (1, h, groups, groups)).astype(np.float32)
    return q, k, v, ids, bias, scale


@pytest.mark.parametrize("backend", ["xla", "dot_product"])
@pytest.mark.parametrize("use_bias,use_scale", [(True, False), (False, True), (True, True)])
def test_group_mask_matches_dense_reference(backend, use_bias, use_scale):
    q, k, v, ids, bias, scale = _inputs()
    bias, scale = (bias if use_bias else None), (scale if use_scale else None)
    ref = _dense_reference(q, k, v, ids, bias, scale)
    out = jax.jit(lambda *a: joint_attention(*a, backend=backend))(q, k, v, (ids, bias, scale))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("backend", ["xla", "dot_product"])
def test_no_mask_and_neutral_mask_are_plain_attention(backend):
    q, k, v, ids, bias, scale = _inputs(1)
    ref = _dense_reference(q, k, v, ids, None, None)
    plain = joint_attention(q, k, v, None, backend)
    neutral = joint_attention(q, k, v, (ids, np.zeros_like(bias), np.ones_like(scale)), backend)
    np.testing.assert_allclose(np.asarray(plain), ref, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(np.asarray(neutral), np.asarray(plain), atol=1e-6)


def test_combined_masks_equal_sequential_dense_application():
    q, k, v, ids1, bias1, scale1 = _inputs(2, groups=3)
    ids2 = np.random.default_rng(3).integers(0, 2, ids1.shape).astype(np.int32)
    bias2 = np.random.default_rng(4).normal(0, 1, (1, 1, 2, 2)).astype(np.float32)
    m1 = hk.AttentionMask(ids1, bias1, scale1)
    m2 = hk.AttentionMask(ids2, bias2, None)
    groups, bias, scale = hk.combine_masks([(m1, jnp.bool_(True)), (m2, jnp.bool_(True))])
    out = joint_attention(q, k, v, (groups, bias, scale), "dot_product")
    # Dense reference: both biases added, the one scale applied.
    qd, kd, vd = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", qd, kd) / np.sqrt(q.shape[-1])
    for i in range(q.shape[0]):
        logits[i] += bias1[i][:, ids1[i]][:, :, ids1[i]] + bias2[0][:, ids2[i]][:, :, ids2[i]]
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    for i in range(q.shape[0]):
        w[i] *= scale1[0][:, ids1[i]][:, :, ids1[i]]
    ref = np.einsum("bhqk,bkhd->bqhd", w, vd)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5 * np.abs(ref).max())
    # A mask switched off for this layer is neutral.
    off = hk.combine_masks([(m1, jnp.bool_(False))])
    np.testing.assert_allclose(np.asarray(joint_attention(q, k, v, off, "xla")),
                               np.asarray(joint_attention(q, k, v, None, "xla")), atol=1e-6)


def test_token_groups_layout():
    layout = hk.TokenLayout(n_txt=2, n_img=3, n_ctx=2)
    g = hk.token_groups(layout, img_labels=jnp.array([[0, 1, 0]]), ctx_labels=jnp.array([[2, 0]]),
                        num_img_labels=2, num_ctx_labels=3)
    np.testing.assert_array_equal(np.asarray(g), [[0, 0, 1, 2, 1, 5, 3]])
    sd3 = hk.TokenLayout(n_txt=2, n_img=3, text_first=False)
    np.testing.assert_array_equal(np.asarray(hk.token_groups(sd3)), [[1, 1, 1, 0, 0]])


def test_backend_resolution():
    assert resolve_backend("auto", jnp.float32) == "xla"  # CPU
    with pytest.raises(ValueError, match="unknown"):
        resolve_backend("flash9", jnp.float32)


def test_sinusoid_and_rope_match_diffusers():
    import torch
    from diffusers.models.embeddings import apply_rotary_emb, get_timestep_embedding
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    t = np.random.default_rng(0).uniform(0, 1000, (64,)).astype(np.float32)
    ref = get_timestep_embedding(torch.from_numpy(t), 256, flip_sin_to_cos=True, downscale_freq_shift=0).numpy()
    # Our frequencies are correctly rounded; torch's float32 exp is an ulp off on 2 of 128, which at
    # t ~ 1000 moves those entries by up to 3e-5.
    ours = np.asarray(timestep_sinusoid(jnp.asarray(t)))
    np.testing.assert_allclose(ours, ref, atol=4e-5)
    assert np.mean(np.abs(ours - ref) < 1e-6) > 0.99

    ids = np.stack([np.zeros(300), np.arange(300) % 128, np.arange(300) // 3], 1).astype(np.float32)
    cos, sin = FluxPosEmbed(10000, [16, 56, 56])(torch.from_numpy(ids))
    cj, sj = rope_table(jnp.asarray(ids), (16, 56, 56), 10000)
    np.testing.assert_allclose(np.asarray(cj), cos.numpy(), atol=5e-7)  # table built in float64 by diffusers
    np.testing.assert_allclose(np.asarray(sj), sin.numpy(), atol=5e-7)
    x = np.random.default_rng(1).standard_normal((2, 300, 4, 128)).astype(np.float32)
    ref = apply_rotary_emb(torch.from_numpy(x), (cos, sin), sequence_dim=1).numpy()
    np.testing.assert_allclose(np.asarray(apply_rope(jnp.asarray(x), cj, sj)), ref, atol=5e-6)
