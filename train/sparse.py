"""Latent-sharded sparse operations: exact two-stage TopK and k-sparse gathers through the weights.

Every function takes `axis`: the mesh axis the latent dimension is split over when called inside
`jax.shard_map` (each device then holds `n_local` consecutive latents, device i the block starting at
i * n_local), or None on one device / with replicated latents. Indices are always *global* latent indices,
so callers never see the sharding.

Why not `lax.top_k` on the sharded latents: XLA's TopK is wrong when the reduced axis is sharded
(jax-ml/jax#19271) and `approx_max_k` refuses it, and gathering the [B, n] latents to one device is what
latent sharding exists to avoid. The two-stage form moves only k candidates per token and shard.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def topk(x: jax.Array, k: int, axis: str | None = None) -> tuple[jax.Array, jax.Array]:
    """The k largest entries of each row of x [B, n_local] -> (values [B, k], global indices [B, k] int32).

    Equal to `lax.top_k` on the unsharded [B, n] array, ties included: `lax.top_k` puts the lower index
    first among equal values, each shard's candidates keep that order, and the gathered candidates are
    laid out shard by shard, i.e. in increasing global index among equal values, so the second `top_k`
    breaks ties the same way. Any entry of the global top k is in its own shard's top k, so no
    candidate is missed.
    """
    if axis is None:
        return lax.top_k(x, k)
    n_local = x.shape[-1]
    values, index = lax.top_k(x, min(k, n_local))
    index = index + lax.axis_index(axis).astype(jnp.int32) * n_local
    values, index = gather_replicated(values, axis), gather_replicated(index, axis)  # [B, shards * k]
    values, pos = lax.top_k(values, k)
    return values, jnp.take_along_axis(index, pos, axis=1)


def gather_replicated(x: jax.Array, axis) -> jax.Array:
    """[B, m] per shard -> [B, shards * m], shard-major, identical (and typed replicated) on every shard.

    A psum of each shard's block placed in its own slot, rather than `all_gather`, whose result the
    shard_map type system counts as varying over `axis`. Floats travel as their integer bit patterns, so
    the sum with the other slots' zeros is exact bit for bit (-0.0 stays -0.0, which `lax.top_k` orders
    below +0.0; -inf and NaN survive). `axis` is an axis name or a tuple of them.
    """
    bits = jnp.dtype(f"int{8 * x.dtype.itemsize}") if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
    mine = jnp.arange(lax.axis_size(axis)) == lax.axis_index(axis)
    slots = jnp.where(mine[None, :, None], lax.bitcast_convert_type(x, bits)[:, None, :], jnp.zeros((), bits))
    return lax.bitcast_convert_type(lax.psum(slots, axis), x.dtype).reshape(x.shape[0], -1)


def localise(index: jax.Array, n_local: int, axis: str | None) -> tuple[jax.Array, jax.Array | None]:
    """Global latent indices -> (indices into this shard's block, clipped to it; mask of those it owns)."""
    if axis is None:
        return index, None
    local = index - lax.axis_index(axis).astype(jnp.int32) * n_local
    mine = (local >= 0) & (local < n_local)
    # Indices this shard does not own point at row 0 (cheap, cached) and are masked out by the caller.
    return jnp.where(mine, local, 0), mine


def _sum_shards(partial: jax.Array, mine: jax.Array | None, axis: str | None) -> jax.Array:
    """Each shard contributes the entries it owns; exact zeros elsewhere keep the sum exact."""
    if axis is None:
        return partial
    return lax.psum(jnp.where(mine, partial, 0), axis)


def gather_encode(xc: jax.Array, w_enc: jax.Array, b_enc: jax.Array, index: jax.Array, axis: str | None = None,
                  dtype=jnp.float32) -> jax.Array:
    """Pre-activations of the selected latents only: xc [B, d] . W_enc[:, index] + b_enc[index] -> [B, k].

    Differentiating this (rather than the dense [B, n] pre-activations) makes the encoder backward
    k-sparse: autodiff of the gather is a scatter-add into k columns of W_enc per token, and the input
    gradient a k-term sum, with no dense [B, n] x [n, d] matmul (what sparsify's fused encoder does by hand).
    Written as multiply + reduce in float32 so XLA can fuse the row gather into the reduction instead of
    materialising [B, k, d]; `dtype` is the dtype the weights are read in (bfloat16 halves the traffic).
    """
    return _gather_encode(xc, w_enc, b_enc, index, axis, jnp.dtype(dtype))


# jax.checkpoint: the backward pass gathers the k rows again instead of keeping the gathered [B, k, d]
# rows as residuals (6 GiB at d=3072, k=64, B=8192 in float32).
@functools.partial(jax.checkpoint, static_argnums=(4, 5))
def _gather_encode(xc, w_enc, b_enc, index, axis, dtype):
    local, mine = localise(index, w_enc.shape[1], axis)
    # Gather rows of a materialised W_enc^T: left to itself XLA fuses the transpose into the gather, which
    # then reads each of the B * k columns with stride n (measured 2.5x slower on CPU; uncoalesced on GPU).
    rows = lax.optimization_barrier(w_enc.astype(dtype).T)
    cols = rows[local].astype(jnp.float32)  # [B, k, d]
    values = jnp.sum(xc.astype(dtype).astype(jnp.float32)[:, None, :] * cols, axis=-1) + b_enc[local]
    return _sum_shards(values, mine, axis)


def gather_decode(values: jax.Array, index: jax.Array, w_dec: jax.Array, axis: str | None = None,
                  dtype=jnp.float32) -> jax.Array:
    """sum_j values[b, j] * W_dec[index[b, j]] -> [B, d] (no bias): k decoder rows gathered per token.

    Sharded: each shard adds the rows it owns and the partial reconstructions are summed over `axis`
    (one [B, d] all-reduce; the decoder is never gathered).
    """
    return _gather_decode(values, index, w_dec, axis, jnp.dtype(dtype))


@functools.partial(jax.checkpoint, static_argnums=(3, 4))
def _gather_decode(values, index, w_dec, axis, dtype):
    local, mine = localise(index, w_dec.shape[0], axis)
    if mine is not None:
        values = jnp.where(mine, values, 0)
    rows = w_dec.astype(dtype)[local].astype(jnp.float32)  # [B, k, d]
    out = jnp.sum(values.astype(jnp.float32)[:, :, None] * rows, axis=1)
    return out if axis is None else lax.psum(out, axis)


def dense_decode(z: jax.Array, w_dec: jax.Array, axis: str | None = None, dtype=jnp.float32) -> jax.Array:
    """z [B, n_local] @ W_dec [n_local, d] -> [B, d], summed over latent shards (dense architectures)."""
    out = jnp.dot(z.astype(dtype), w_dec.astype(dtype), preferred_element_type=jnp.float32)
    return out if axis is None else lax.psum(out, axis)


def scatter_counts(index: jax.Array, weight: jax.Array, n_local: int, axis: str | None = None) -> jax.Array:
    """sum over tokens of `weight` at each selected latent -> [n_local] for this shard's block."""
    local, mine = localise(index, n_local, axis)
    if mine is not None:
        weight = jnp.where(mine, weight, 0)
    return jnp.zeros((n_local,), weight.dtype).at[local.reshape(-1)].add(weight.reshape(-1))
