"""Joint attention with backend dispatch and group-structured attention masks.

Backends (`config.attention_backend`):
- "xla": explicit logits -> float32 softmax -> weights @ values. Materialises [B, H, T, T]; the
  reference path, exact for every mask, and what runs on CPU.
- "dot_product": `jax.nn.dot_product_attention` (XLA implementation); masks are applied in the
  group-structured form below, never as a dense [T x T] matrix.
- "cudnn": the same through cuDNN flash attention (NVIDIA GPUs, bf16/fp16).
- "auto": "cudnn" on a GPU with a half-precision compute dtype, otherwise "xla".

Group-structured masks on kernels that take no dense matrix: for each query group a, the key bias
row `bias[a, group(k)]` is a [B, H, 1, Tk] bias every kernel accepts, and the post-softmax scale is exact
by scaling the values: sum_k s[a, g(k)] p_qk v_k = sum_k p_qk (s[a, g(k)] v_k). One kernel call per query
group; each query keeps the result of its own group.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdit.layers import RMSNorm, apply_rope, dense

BACKENDS = ("auto", "xla", "dot_product", "cudnn")


def resolve_backend(backend: str, dtype) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} unknown; expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"


def _gather_group_matrix(mat: jax.Array, gq: jax.Array, gk: jax.Array) -> jax.Array:
    """[B|1, H|1, G, G] indexed by query groups [B|1, Tq] and key groups [B|1, Tk] -> [B, H|1, Tq, Tk]."""
    batch = max(mat.shape[0], gq.shape[0], gk.shape[0])
    mat = jnp.broadcast_to(mat, (batch, *mat.shape[1:]))
    gq = jnp.broadcast_to(gq, (batch, gq.shape[-1]))
    gk = jnp.broadcast_to(gk, (batch, gk.shape[-1]))
    rows = jax.vmap(lambda m, g: m[:, g, :])(mat, gq)  # [B, H, Tq, G]
    return jax.vmap(lambda r, g: r[:, :, g])(rows, gk)  # [B, H, Tq, Tk]


def attention_weights(q: jax.Array, k: jax.Array, mask=None, q_groups: jax.Array | None = None) -> jax.Array:
    """Float32 softmax weights [B, H, Tq, Tk] (after the mask's bias and scale).

    q: [B, Tq, H, D], k: [B, Tk, H, D]. `q_groups` are the query tokens' group ids when `q` is a
    subset of the sequence (e.g. the text queries); by default the mask's own ids are used.
    """
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is None:
        return jax.nn.softmax(logits, axis=-1)
    groups, bias, post = mask
    gq = groups if q_groups is None else q_groups
    if bias is not None:
        logits = logits + _gather_group_matrix(bias.astype(jnp.float32), gq, groups)
    weights = jax.nn.softmax(logits, axis=-1)
    if post is not None:
        weights = weights * _gather_group_matrix(post.astype(jnp.float32), gq, groups)
    return weights


def _xla_attention(q, k, v, mask):
    weights = attention_weights(q, k, mask)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)


def _kernel_attention(q, k, v, mask, implementation):
    def call(values, bias=None):
        return jax.nn.dot_product_attention(q, k, values, bias=bias, implementation=implementation)

    if mask is None:
        return call(v)
    groups, bias, post = mask
    num_groups = (bias if bias is not None else post).shape[-1]
    batch = q.shape[0]
    groups = jnp.broadcast_to(groups, (batch, groups.shape[-1]))
    out = jnp.zeros(q.shape, q.dtype)
    for a in range(num_groups):  # static, small
        key_bias = values = None
        if bias is not None:
            row = jnp.broadcast_to(bias[:, :, a, :], (batch, bias.shape[1], num_groups))
            key_bias = jax.vmap(lambda r, g: r[:, g])(row, groups)[:, :, None, :].astype(q.dtype)
        values = v
        if post is not None:
            row = jnp.broadcast_to(post[:, :, a, :], (batch, post.shape[1], num_groups))
            s = jax.vmap(lambda r, g: r[:, g])(row, groups)  # [B, H|1, Tk]
            values = (v.astype(jnp.float32) * jnp.swapaxes(s, 1, 2)[..., None]).astype(v.dtype)
        out_a = call(values, key_bias)
        out = jnp.where((groups == a)[:, :, None, None], out_a, out)
    return out


def joint_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask=None, backend: str = "xla") -> jax.Array:
    """Softmax(q k^T / sqrt(D)) v over the joint sequence, with an optional group mask.

    q, k, v: [B, T, H, D] (RoPE already applied). mask: (groups [B|1, T], bias, scale) from
    `hooks.combine_masks`, or None. Returns [B, T, H, D] in v's dtype.
    """
    if backend == "xla":
        out = _xla_attention(q, k, v, mask)
    elif backend == "dot_product":
        out = _kernel_attention(q, k, v, mask, "xla")
    elif backend == "cudnn":
        out = _kernel_attention(q, k, v, mask, "cudnn")
    else:
        raise ValueError(f"attention backend {backend!r} must be resolved first (resolve_backend)")
    return out.astype(v.dtype)


# --- the attention module shared by FLUX and SD3 ------------------------------------------------


class OutProjection(nn.Module):
    """diffusers' `to_out` ModuleList: index 0 is the Linear (index 1 is dropout)."""

    features: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        return dense(self.features, "0", self.dtype)(x)


class Attention(nn.Module):
    """Joint attention of diffusers' `FluxAttention` / `Attention` + `JointAttnProcessor2_0`.

    Parameter names follow diffusers: to_q/k/v, norm_q/k, add_q/k/v_proj, norm_added_q/k, to_out/0,
    to_add_out. Call with `txt` for two-stream attention (image and text projected separately, joined in
    `layout` order); with `txt=None`, `img` is already the joint sequence (single-stream / image-only).

    Returns (img_out, txt_out): projected outputs [B, T, D] when the module has output projections,
    otherwise the per-head output flattened to [B, T, H*Dh] as the first element.
    """

    heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32
    backend: str = "xla"
    qk_norm: bool = True
    context: bool = False  # has add_q/k/v_proj for a second stream
    out: bool = True  # has to_out
    context_out: bool = True  # has to_add_out
    eps: float = 1e-6

    def _heads(self, x, proj, norm):
        inner = self.heads * self.head_dim
        y = dense(inner, proj, self.dtype)(x).reshape(*x.shape[:-1], self.heads, self.head_dim)
        return RMSNorm(self.eps, name=norm)(y) if (norm and self.qk_norm) else y

    @nn.compact
    def __call__(self, img, txt, rope, hooks, layout):
        q = self._heads(img, "to_q", "norm_q")
        k = self._heads(img, "to_k", "norm_k")
        v = self._heads(img, "to_v", None)
        two_stream = txt is not None
        if two_stream:
            if not self.context:
                raise ValueError("Attention without context projections got a second stream")
            cq = self._heads(txt, "add_q_proj", "norm_added_q")
            ck = self._heads(txt, "add_k_proj", "norm_added_k")
            cv = self._heads(txt, "add_v_proj", None)
            join = (lambda a, b: jnp.concatenate([b, a], 1)) if layout.text_first else (
                lambda a, b: jnp.concatenate([a, b], 1))
            q, k, v = join(q, cq), join(k, ck), join(v, cv)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)

        mask = hooks.attention_mask() if hooks is not None else None
        out = joint_attention(q, k, v, mask, self.backend)
        if hooks is not None and hooks.wants("joint", "attn_probs_txt_to_img"):
            q_groups = None if mask is None else mask[0][:, layout.txt_slice]
            weights = attention_weights(q[:, layout.txt_slice], k, mask, q_groups)
            hooks.record("joint", "attn_probs_txt_to_img", weights[..., layout.img_slice])
        if hooks is not None and hooks.wants("joint", "attn_img_sources"):
            q_groups = None if mask is None else mask[0][:, layout.img_slice]
            weights = attention_weights(q[:, layout.img_slice], k, mask, q_groups).mean(axis=1)  # [B, T_img, T]
            ctx = slice(layout.total - layout.n_ctx, layout.total) if layout.text_first else slice(layout.n_img,
                                                                                                   layout.n_img + layout.n_ctx)
            to_ctx = weights[..., ctx].sum(-1, keepdims=True)
            hooks.record("joint", "attn_img_sources", jnp.concatenate([weights[..., layout.txt_slice], to_ctx], -1))

        out_img, out_txt = out[:, layout.img_slice], out[:, layout.txt_slice]
        if hooks is not None:
            out_img = hooks.site("img", "attn_heads", out_img)
            out_txt = hooks.site("txt", "attn_heads", out_txt)
        flat = lambda x: x.reshape(*x.shape[:2], -1)  # noqa: E731
        if not two_stream:
            joined = (out_txt, out_img) if layout.text_first else (out_img, out_txt)
            out = flat(jnp.concatenate(joined, 1)) if hooks is not None and hooks.active else flat(out)
            return (OutProjection(img.shape[-1], self.dtype, name="to_out")(out) if self.out else out), None
        img_o = OutProjection(img.shape[-1], self.dtype, name="to_out")(flat(out_img))
        txt_o = dense(txt.shape[-1], "to_add_out", self.dtype)(flat(out_txt)) if self.context_out else None
        return img_o, txt_o


class _GeluProj(nn.Module):
    features: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        return nn.gelu(dense(self.features, "proj", self.dtype)(x), approximate=True)


class _FFNet(nn.Module):
    hidden: int
    features: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, on_act):
        h = on_act(_GeluProj(self.hidden, self.dtype, name="0")(x))
        return dense(self.features, "2", self.dtype)(h)


class FeedForward(nn.Module):
    """diffusers `FeedForward(activation_fn="gelu-approximate")`: net.0.proj -> tanh-GELU -> net.2."""

    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, on_act=lambda h: h):
        return _FFNet(self.hidden, x.shape[-1], self.dtype, name="net")(x, on_act)
