"""Joint attention with backend dispatch and group-structured attention masks.

Backends (`config.attention_backend`):
- "xla": explicit logits -> float32 softmax -> weights @ values. Materialises [B, H, T, T]; the
  reference path, exact for every mask, and what runs on CPU.
- "dot_product": `jax.nn.dot_product_attention` (XLA implementation); masks are applied in the
  group-structured form below, never as a dense [T x T] matrix.
- "cudnn": the same through cuDNN flash attention (NVIDIA GPUs, bf16/fp16).
- "splash": the Pallas TPU splash-attention kernel; off a TPU it runs in Pallas interpret mode (the same
  kernel code, executed by XLA), which is how it is tested on CPU.
- "auto": "splash" on a TPU, "cudnn" on a GPU with a half-precision compute dtype, otherwise "xla".

Group-structured masks on kernels that take no dense matrix: for each query group a, the key bias
row `bias[a, group(k)]` is a [B, H, 1, Tk] bias every kernel accepts, and the post-softmax scale is exact
by scaling the values: sum_k s[a, g(k)] p_qk v_k = sum_k p_qk (s[a, g(k)] v_k). One kernel call per query
group; each query keeps the result of its own group.

Splash takes no additive bias, only boolean masks and segment ids. A group bias is exact there through
one call per *key* group b, restricted to b's keys by segment ids, returning its output o_b and
log-sum-exp lse_b: for a query of group a, softmax(l + bias) with the scale s applied after it is
sum_b s[a, b] exp(x_b) o_b / sum_b exp(x_b) with x_b = lse_b + bias[a, b] (a -inf bias drops the group).
No mask needs the dense path; only attention-probability captures do (`Attention`, at the capturing
layers only).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from jaxdit.layers import RMSNorm, apply_rope, dense
from jaxdit.sharding import MESH_AXES, mesh_spec

BACKENDS = ("auto", "xla", "dot_product", "cudnn", "splash")


def resolve_backend(backend: str, dtype) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} unknown; expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    platform = jax.default_backend()
    if platform == "tpu":
        return "splash"
    return "cudnn" if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"


def _gather_group_matrix(mat: jax.Array, gq: jax.Array, gk: jax.Array) -> jax.Array:
    """[B|1, H|1, G, G] indexed by query groups [B|1, Tq] and key groups [B|1, Tk] -> [B, H|1, Tq, Tk]."""
    batch = max(mat.shape[0], gq.shape[0], gk.shape[0])
    mat = jnp.broadcast_to(mat, (batch, *mat.shape[1:]))
    gq = jnp.broadcast_to(gq, (batch, gq.shape[-1]))
    gk = jnp.broadcast_to(gk, (batch, gk.shape[-1]))
    rows = jax.vmap(lambda m, g: m[:, g, :])(mat, gq)  # [B, H, Tq, G]
    return jax.vmap(lambda r, g: r[:, :, g])(rows, gk)  # [B, H, Tq, Tk]


def _per_token(vec: jax.Array, groups: jax.Array) -> jax.Array:
    """A [B|1, H|1, G] vector over groups read at every token's group [B, T] -> [B, H|1, T]."""
    vec = jnp.broadcast_to(vec, (groups.shape[0], *vec.shape[1:]))
    return jax.vmap(lambda r, g: r[:, g])(vec, groups)


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


def _num_groups(mask) -> int:
    _, bias, post = mask
    return (bias if bias is not None else post).shape[-1]


def _per_query_group(attend, v: jax.Array, mask) -> jax.Array:
    """A group mask through a kernel that takes at most a per-key bias: one call per query group.

    attend(values [B, Tk, H, D], key_bias [B, H|1, Tk] or None) -> [B, Tq, H, D] is the kernel; query
    group a calls it with the bias row bias[a, g(k)] and the values scaled by post[a, g(k)].
    """
    groups, bias, post = mask
    groups = jnp.broadcast_to(groups, (v.shape[0], groups.shape[-1]))
    out = None
    for a in range(_num_groups(mask)):  # static, small
        key_bias = None if bias is None else _per_token(bias[:, :, a, :], groups)
        values = v
        if post is not None:
            s = _per_token(post[:, :, a, :], groups)  # [B, H|1, Tk]
            values = (v.astype(jnp.float32) * jnp.swapaxes(s, 1, 2)[..., None]).astype(v.dtype)
        out_a = attend(values, key_bias)
        out = jnp.where((groups == a)[:, :, None, None], out_a, 0 if out is None else out)
    return out


def _per_key_group(attend_within, mask, batch: int) -> jax.Array:
    """A group mask, bias included, from one kernel call per key group (see the module notes).

    attend_within(keys [B, Tk] bool) -> (out [B, Tq, H, D], lse [B, H, Tq]) attends to those keys only.
    The per-group results are folded in with a running log-sum-exp: no stack of G outputs is kept.
    """
    groups, bias, post = mask
    groups = jnp.broadcast_to(groups, (batch, groups.shape[-1]))

    def per_query(mat, b):  # column b of a group matrix at every query's group -> [B, Tq, H|1, 1]
        return jnp.swapaxes(_per_token(mat[:, :, :, b].astype(jnp.float32), groups), 1, 2)[..., None]

    acc = den = top = None
    for b in range(_num_groups(mask)):  # static, small
        keys = groups == b
        out_b, lse_b = attend_within(keys)
        x = jnp.swapaxes(lse_b, 1, 2)[..., None]  # [B, Tq, H, 1]
        if bias is not None:
            x = x + per_query(bias, b)
        # A group absent from a sequence has no keys; the kernel's lse is then finite, so drop it here.
        x = jnp.where(jnp.any(keys, -1)[:, None, None, None], x, -jnp.inf)
        if top is None:
            acc, den, top = jnp.zeros(out_b.shape, jnp.float32), jnp.zeros(x.shape), jnp.full(x.shape, -jnp.inf)
        new_top = jnp.maximum(top, x)
        safe = jnp.where(jnp.isfinite(new_top), new_top, 0.0)  # all groups so far at -inf: weights 0
        keep, w = jnp.exp(top - safe), jnp.exp(x - safe)
        weighted = w if post is None else w * per_query(post, b)  # the scale acts after the softmax
        acc = acc * keep + weighted * out_b.astype(jnp.float32)
        den, top = den * keep + w, new_top
    return acc / den


def _kernel_attention(q, k, v, mask, implementation):
    def attend(values, key_bias=None):
        bias = None if key_bias is None else key_bias[:, :, None, :].astype(q.dtype)
        return jax.nn.dot_product_attention(q, k, values, bias=bias, implementation=implementation)

    return attend(v) if mask is None else _per_query_group(attend, v, mask)


# --- splash attention (TPU; Pallas interpret mode elsewhere) -------------------------------------

SPLASH_BLOCKS = (512, 256, 128)  # kv blocks must be multiples of the TPU's 128 lanes


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def splash_block_size(seq_len: int) -> int:
    """The largest of SPLASH_BLOCKS whose padded length is within 1/8 of the 128-padded length.

    FLUX's 4096 + 512 and Kontext's 8192 + 512 tokens are multiples of 512 (no padding); SD3's 4096 + 333
    pads to 4608 with 512-blocks rather than to 4480 with 128-blocks, fewer and larger tiles.
    """
    least = _round_up(seq_len, 128)
    return next(b for b in SPLASH_BLOCKS if _round_up(seq_len, b) <= least + least // 8)


def _splash_kernel(heads: int, seq_len: int, block: int, residuals: bool, interpret: bool):
    """A splash MHA kernel for [heads, seq_len, D] inputs; segment ids carry every mask we need.

    Built at each trace: its block tables become arrays of the traced program (splash caches the mask
    analysis itself)."""
    full = splash.MultiHeadMask([splash.FullMask((seq_len, seq_len))] * heads)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, use_fused_bwd_kernel=True)
    return splash.make_splash_mha(full, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  save_residuals=residuals, interpret=interpret)


def _splash_local(q, k, v, mask, interpret: bool):
    """Splash attention on this device's heads. q, k, v: [B, T, H, D] -> [B, T, H, D]."""
    batch, seq, heads, dim = q.shape
    block = splash_block_size(seq)
    padded = _round_up(seq, block)

    def to_kernel(x):  # [B, T, H, D] -> [B, H, padded, D]
        return jnp.swapaxes(jnp.pad(x, ((0, 0), (0, padded - seq), (0, 0), (0, 0))), 1, 2)

    # splash computes q . k unscaled
    qs, ks = to_kernel((q.astype(jnp.float32) * dim ** -0.5).astype(q.dtype)), to_kernel(k)

    def attend(values, keys=None, residuals=False):
        """Attention to `keys` [B, T] bool (None: all); the padding is never attended to."""
        segments = None
        if keys is not None or padded > seq:
            keys = jnp.ones((batch, seq), bool) if keys is None else jnp.broadcast_to(keys, (batch, seq))
            kv = jnp.pad(jnp.where(keys, 0, 1), ((0, 0), (0, padded - seq)), constant_values=1)
            segments = splash.SegmentIds(jnp.zeros((batch, padded), jnp.int32), kv.astype(jnp.int32))
        kernel = _splash_kernel(heads, padded, block, residuals, interpret)
        result = jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=s))(qs, ks, to_kernel(values), segments)
        if not residuals:
            return jnp.swapaxes(result, 1, 2)[:, :seq]
        out, (lse,) = result
        return jnp.swapaxes(out, 1, 2)[:, :seq], lse[..., :seq]

    if mask is None:
        return attend(v)
    if mask[1] is None:  # scale only: the values are scaled per query group, as on every kernel
        return _per_query_group(lambda values, _: attend(values), v, mask)
    return _per_key_group(lambda keys: attend(v, keys, residuals=True), mask, batch)


def _splash_attention(q, k, v, mask):
    """Splash attention, sharded over heads (and batch) with shard_map when a jaxdit mesh is active."""
    local = functools.partial(_splash_local, interpret=jax.default_backend() != "tpu")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names) or set(mesh.manual_axes) & set(MESH_AXES):
        return local(q, k, v, mask)  # no jaxdit mesh, or already inside a shard_map over it
    present = tuple(m is not None for m in mask) if mask is not None else None
    arrays = [m for m in mask if m is not None] if mask is not None else []
    names = {2: ("batch", None), 4: ("batch", "heads", None, None)}  # group ids, group matrices
    qkv_spec = mesh_spec(("batch", None, "heads", None), q.shape, mesh)
    specs = (qkv_spec,) * 3 + tuple(mesh_spec(names[a.ndim], a.shape, mesh) for a in arrays)

    def body(q, k, v, *parts):
        parts = iter(parts)
        return local(q, k, v, None if present is None else tuple(next(parts) if p else None for p in present))

    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=qkv_spec, check_vma=False)(q, k, v, *arrays)


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
    elif backend == "splash":
        out = _splash_attention(q, k, v, mask)
    else:
        raise ValueError(f"attention backend {backend!r} must be resolved first (resolve_backend)")
    return out.astype(v.dtype)


# --- the attention module shared by FLUX and SD3 ------------------------------------------------


class OutProjection(nn.Module):
    """diffusers' `to_out` ModuleList: index 0 is the Linear (index 1 is dropout); row-parallel."""

    features: int
    dtype: jnp.dtype
    axes: tuple | None = ("heads", "embed")  # None: no logical axes (the VAE, never sharded)

    @nn.compact
    def __call__(self, x):
        return dense(self.features, "0", self.dtype, axes=self.axes)(x)


def _record_probabilities(hooks, site: str, probabilities) -> None:
    """Capture attention probabilities, computed on the dense path (no kernel returns them) and only at the
    layers that capture them: the other layers of the stack's scan skip it under `lax.cond`."""
    layers = hooks.capture_slots.get(f"joint.{site}")
    if layers is None:  # every layer captures
        hooks.record("joint", site, probabilities())
        return
    shape = jax.eval_shape(probabilities)
    hit = jnp.any(jnp.asarray(layers, jnp.int32) == hooks.layer)
    hooks.record("joint", site, jax.lax.cond(hit, probabilities, lambda: jnp.zeros(shape.shape, shape.dtype)))


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
        y = dense(inner, proj, self.dtype, axes=("embed", "heads"))(x)  # column-parallel
        y = y.reshape(*x.shape[:-1], self.heads, self.head_dim)
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
            def txt_to_img():
                q_groups = None if mask is None else mask[0][:, layout.txt_slice]
                return attention_weights(q[:, layout.txt_slice], k, mask, q_groups)[..., layout.img_slice]
            _record_probabilities(hooks, "attn_probs_txt_to_img", txt_to_img)
        if hooks is not None and hooks.wants("joint", "attn_img_sources"):
            def img_sources():
                q_groups = None if mask is None else mask[0][:, layout.img_slice]
                weights = attention_weights(q[:, layout.img_slice], k, mask, q_groups).mean(axis=1)  # [B, T_img, T]
                ctx = slice(layout.total - layout.n_ctx, layout.total) if layout.text_first else slice(
                    layout.n_img, layout.n_img + layout.n_ctx)
                to_ctx = weights[..., ctx].sum(-1, keepdims=True)
                return jnp.concatenate([weights[..., layout.txt_slice], to_ctx], -1)
            _record_probabilities(hooks, "attn_img_sources", img_sources)

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
        txt_o = None
        if self.context_out:  # row-parallel, as to_out
            txt_o = dense(txt.shape[-1], "to_add_out", self.dtype, axes=("heads", "embed"))(flat(out_txt))
        return img_o, txt_o


class _GeluProj(nn.Module):
    features: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        return nn.gelu(dense(self.features, "proj", self.dtype, axes=("embed", "mlp"))(x), approximate=True)


class _FFNet(nn.Module):
    hidden: int
    features: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, on_act):
        h = on_act(_GeluProj(self.hidden, self.dtype, name="0")(x))
        return dense(self.features, "2", self.dtype, axes=("mlp", "embed"))(h)


class FeedForward(nn.Module):
    """diffusers `FeedForward(activation_fn="gelu-approximate")`: net.0.proj -> tanh-GELU -> net.2."""

    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, on_act=lambda h: h):
        return _FFNet(self.hidden, x.shape[-1], self.dtype, name="net")(x, on_act)
