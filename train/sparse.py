"""Latent-sharded sparse operations: exact two-stage TopK and k-sparse products through the weights.

Every function takes `axis`: the mesh axis the latent dimension is split over when called inside
`jax.shard_map` (each device then holds `n_local` consecutive latents, device i the block starting at
i * n_local), or None on one device / with replicated latents. Indices are always *global* latent indices,
so callers never see the sharding. Inside `shard_map`, weights passed to `select_encode` / `gather_decode`
must already vary over the batch axes (`lax.pcast(w, batch_axes, to="varying")`): their backward passes
return this device's share of the weight gradients, and the transpose of that cast sums the shares.

Why not `lax.top_k` on the sharded latents: XLA's TopK is wrong when the reduced axis is sharded
(jax-ml/jax#19271) and `approx_max_k` refuses it, and gathering the [B, n] latents to one device is what
latent sharding exists to avoid. The two-stage form moves only k candidates per token and shard.

How the k-sparse products are written. Every product loops over the k selection slots, each slot reading
one row per token through a [B] index vector: on CPU XLA turns that into a tight row copy fused with the
multiply-add, while a gather with [B, k] indices (or the materialised [B, k, d] block) runs about 25x
slower and costs B * k * d floats of memory; scatters accumulate into one buffer inside the loop, in place.
Only for small blocks (B * k * d up to `SMALL_BLOCK`, e.g. d 48) is the one-op gather faster: there the
cost is the number of ops, not the bytes. The dense alternative (`dense=True`) writes the k values of each
token into a [B, n_local] matrix and multiplies: more arithmetic, but matmul-speed arithmetic, which wins
when n_local / k is small (`sparse_pays`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxdit.train import cpu_kernels

# Slots per step of the gather-and-accumulate loop: enough to keep the row reads in flight, few enough
# that k = 256 (AuxK, BatchTopK candidates) compiles quickly. The loops that reduce rows or scatter them
# run one slot per step: unrolled, each slot gets its own buffer (measured 2x slower on CPU).
_UNROLL = 8

# n_local / k from which the k-sparse backward is faster than the dense one (see `sparse_pays`).
SPARSE_MIN_RATIO = 8
# B * k * d up to which the k-sparse products gather their [B, k, d] rows in one op instead of by slot.
SMALL_BLOCK = 1 << 21


def sparse_pays(n_local: int, k: int) -> bool:
    """Whether the k-sparse (gather / scatter) backward beats the dense one for k of n_local latents.

    The dense backward does n_local / k times the arithmetic of the sparse one, at matmul speed; the
    sparse one reads and writes whole weight rows per selected latent. Measured on CPU with the kernels of
    `cpu_kernels` (`benchmarks/sae_throughput.py --crossover`, d 48-768, benchmarks/RESULTS.md): dense
    1.1-1.3x faster at n / k = 4, sparse 1.05x at 8 and 1.1-4.8x from 16 on. (With XLA's own one-thread
    loops, before the kernels, the crossover was at 32.)
    """
    return n_local >= SPARSE_MIN_RATIO * k


def _sharded(axis) -> bool:
    return axis is not None and lax.axis_size(axis) > 1


def topk(x: jax.Array, k: int, axis: str | None = None) -> tuple[jax.Array, jax.Array]:
    """The k largest entries of each row of x [B, n_local] -> (values [B, k], global indices [B, k] int32).

    Equal to `lax.top_k` on the unsharded [B, n] array, ties included: `lax.top_k` puts the lower index
    first among equal values, each shard's candidates keep that order, and the gathered candidates are
    laid out shard by shard, i.e. in increasing global index among equal values, so the second `top_k`
    breaks ties the same way. Any entry of the global top k is in its own shard's top k, so no
    candidate is missed. On a latent axis of size 1 there is no second stage.
    """
    if axis is None:
        return cpu_kernels.top_k(x, k)
    if not _sharded(axis):  # one shard: its top k is the answer, typed replicated over the axis
        values, index = cpu_kernels.top_k(x, k)
        return gather_replicated(values, axis), gather_replicated(index, axis)
    n_local = x.shape[-1]
    values, index = cpu_kernels.top_k(x, min(k, n_local))
    index = index + lax.axis_index(axis).astype(jnp.int32) * n_local
    values, index = gather_replicated(values, axis), gather_replicated(index, axis)  # [B, shards * k]
    values, pos = cpu_kernels.top_k(values, k)
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
    """Global latent indices -> (indices into this shard's block, clipped to it; mask of those it owns).

    The mask is None when this shard owns every latent (no axis, or an axis of size 1)."""
    if not _sharded(axis):
        return index, None
    local = index - lax.axis_index(axis).astype(jnp.int32) * n_local
    mine = (local >= 0) & (local < n_local)
    # Indices this shard does not own point at row 0 (cheap, cached) with weight 0.
    return jnp.where(mine, local, 0), mine


def _vary(x: jax.Array, axis: str | None) -> jax.Array:
    return lax.pcast(x, axis, to="varying") if axis is not None else x


def _own(x: jax.Array, mine: jax.Array | None, axis: str | None) -> jax.Array:
    """x [B, k] with the entries of latents other shards own zeroed, typed as varying over `axis`."""
    return jnp.where(mine, x, jnp.zeros((), x.dtype)) if mine is not None else _vary(x, axis)


# --- slot loops: k one-row-per-token reads or writes ------------------------------------------------------

def _slot_loop(k: int, body, init, unroll: int = 1):
    # Slot 0 outside the loop: the carry then has the type of the body's result (inside shard_map it
    # varies over every axis the operands do, which a zero initial value does not).
    return lax.fori_loop(1, k, body, body(0, init), unroll=max(min(k - 1, unroll), 1))


def _small(index: jax.Array, table: jax.Array) -> bool:
    """Whether the [B, k, d] block of rows is small enough to gather in one op (fewer, larger ops win)."""
    return index.size * table.shape[1] <= SMALL_BLOCK


def _rows(table: jax.Array, index: jax.Array) -> jax.Array:
    return table.at[index].get(mode="promise_in_bounds").astype(jnp.float32)  # [B, k, d]


def _weighted_rows(table: jax.Array, index: jax.Array, weight: jax.Array, dtype) -> jax.Array:
    """sum_j weight[b, j] * table[index[b, j]] -> [B, d] float32 (table [m, d] read in `dtype`)."""
    table = jnp.asarray(table, dtype)
    return cpu_kernels.weighted_rows(table, index, weight.astype(jnp.float32), _weighted_rows_xla)


def _weighted_rows_xla(table: jax.Array, index: jax.Array, weight: jax.Array) -> jax.Array:
    if _small(index, table):
        return jnp.einsum("bk,bkd->bd", weight, _rows(table, index))
    index_t, weight_t = index.T, weight.T  # [k, B]: slot j is a contiguous row

    def body(j, acc):
        rows = table.at[index_t[j]].get(mode="promise_in_bounds").astype(jnp.float32)
        return acc + weight_t[j][:, None] * rows

    return _slot_loop(index.shape[1], body, jnp.zeros((index.shape[0], table.shape[1]), jnp.float32), _UNROLL)


def _row_products(table: jax.Array, index: jax.Array, src: jax.Array, dtype) -> jax.Array:
    """src[b] . table[index[b, j]] -> [B, k] float32."""
    table, src = jnp.asarray(table, dtype), jnp.asarray(src, dtype).astype(jnp.float32)
    return cpu_kernels.row_products(table, index, src, _row_products_xla)


def _row_products_xla(table: jax.Array, index: jax.Array, src: jax.Array) -> jax.Array:
    if _small(index, table):
        return jnp.einsum("bd,bkd->bk", src, _rows(table, index))
    index_t = index.T

    def body(j, out):
        rows = table.at[index_t[j]].get(mode="promise_in_bounds").astype(jnp.float32)
        return out.at[j].set(jnp.sum(src * rows, axis=-1))

    return _slot_loop(index.shape[1], body, jnp.zeros(index_t.shape, jnp.float32)).T


def _scatter_rows(index: jax.Array, weight: jax.Array, src: jax.Array, m: int, dtype,
                  transposed: bool = False) -> jax.Array:
    """Row index[b, j] of a [m, d] zero matrix accumulates weight[b, j] * src[b] -> [m, d] float32, or its
    transpose [d, m] (the encoder's weight layout).

    XLA's transpose of the [m, d] result would be fused into each consumer (clipping, both Adam moments),
    which then read it with stride d: the CPU kernel writes the transpose itself."""
    src = jnp.asarray(src, dtype).astype(jnp.float32)
    return cpu_kernels.scatter_rows(index, weight.astype(jnp.float32), src, m,
                                    functools.partial(_scatter_rows_xla, m=m), transposed)


def _scatter_rows_xla(index: jax.Array, weight: jax.Array, src: jax.Array, m: int) -> jax.Array:
    if _small(index, src):
        updates = weight[:, :, None] * src[:, None, :]
        return jnp.zeros((m, src.shape[1]), jnp.float32).at[index.reshape(-1)].add(
            updates.reshape(-1, src.shape[1]), mode="promise_in_bounds")
    index_t, weight_t = index.T, weight.T

    def body(j, acc):
        return acc.at[index_t[j]].add(weight_t[j][:, None] * src, mode="promise_in_bounds")

    return _slot_loop(index.shape[1], body, jnp.zeros((m, src.shape[1]), jnp.float32))


def _densify(index: jax.Array, weight: jax.Array, m: int) -> jax.Array:
    """[B, k] weights at [B, k] indices -> [B, m] (added, so masked entries at index 0 with weight 0 are harmless)."""
    rows = jnp.arange(index.shape[0])[:, None]
    return jnp.zeros((index.shape[0], m), jnp.float32).at[rows, index].add(weight.astype(jnp.float32),
                                                                            mode="promise_in_bounds")


def _dot(a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    return jnp.dot(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


# --- encoder: the selected pre-activations with a k-sparse gradient ------------------------------------------

def select_encode(selected: jax.Array, xn: jax.Array, b_dec: jax.Array, w_enc: jax.Array, b_enc: jax.Array,
                  index: jax.Array, axis: str | None = None, dense: bool = False, dtype=jnp.float32) -> jax.Array:
    """The pre-activations of the selected latents, `selected` [B, k], differentiable in the encoder.

    `selected` are the values a top-k picked (at global `index` [B, k]) from the dense pre-activations
    (xn - b_dec) @ W_enc + b_enc, so the forward pass recomputes nothing. The backward pass is that of
    values[b, j] = (xn[b] - b_dec) . W_enc[:, index[b, j]] + b_enc[index[b, j]] with respect to xn [B, d],
    b_dec [d], W_enc [d, n_local] and b_enc [n_local], and none to `selected`: k columns of W_enc per token
    (`dense=False`, what sparsify's fused encoder does by hand) or the dense [B, n_local] products
    (`dense=True`). b_dec's gradient is -W_enc @ (b_enc's gradient), a [d, n_local] product instead of the
    [B, k, d] one; the gradient to xn is only computed when something asks for it.
    """
    return _select_encode(selected, _vary(xn, axis), _vary(b_dec, axis), w_enc, b_enc, index, axis, dense,
                          jnp.dtype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _select_encode(selected, xn, b_dec, w_enc, b_enc, index, axis, dense, dtype):
    return selected


def _select_encode_fwd(selected, xn, b_dec, w_enc, b_enc, index, axis, dense, dtype):
    return selected, (xn, b_dec, w_enc, index)


def _select_encode_bwd(axis, dense, dtype, res, g):
    xn, b_dec, w_enc, index = res
    n_local = w_enc.shape[1]
    local, mine = localise(index, n_local, axis)
    g = _own(g, mine, axis)
    xc = xn - b_dec
    if dense:
        gd = _densify(local, g, n_local)  # [B, n_local]
        d_w = _dot(xc.T, gd, dtype)
        d_b = jnp.sum(gd, axis=0)
        d_xn = _dot(gd, w_enc.T, dtype)
    else:
        d_w = _scatter_rows(local, g, xc, n_local, dtype, transposed=True)
        d_b = jnp.zeros((n_local,), jnp.float32).at[local.reshape(-1)].add(g.reshape(-1), mode="promise_in_bounds")
        d_xn = _weighted_rows(w_enc.T, local, g, dtype)
    d_b_dec = -_dot(w_enc, d_b, dtype)
    return None, d_xn, d_b_dec.astype(b_dec.dtype), d_w, d_b, None


_select_encode.defvjp(_select_encode_fwd, _select_encode_bwd)


# --- decoder ------------------------------------------------------------------------------------------------

def gather_decode(values: jax.Array, index: jax.Array, w_dec: jax.Array, axis: str | None = None,
                  dtype=jnp.float32, dense: bool = False) -> jax.Array:
    """sum_j values[b, j] * W_dec[index[b, j]] -> [B, d] (no bias): k decoder rows read per token.

    Sharded: each shard adds the rows it owns and the partial reconstructions are summed over `axis`
    (one [B, d] all-reduce; the decoder is never gathered). The backward pass is k-sparse as well (rows
    index[b, j] of the W_dec gradient, k row products for the values), or dense with `dense=True`.
    """
    local, mine = localise(index, w_dec.shape[0], axis)
    out = _decode(_own(values, mine, axis), local, w_dec, dense, jnp.dtype(dtype))
    return out if axis is None else lax.psum(out, axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _decode(values, local, w_dec, dense, dtype):
    return _weighted_rows(w_dec, local, values, dtype)


def _decode_fwd(values, local, w_dec, dense, dtype):
    return _decode(values, local, w_dec, dense, dtype), (values, local, w_dec)


def _decode_bwd(dense, dtype, res, g):
    values, local, w_dec = res
    if dense:
        d_w = _dot(_densify(local, values, w_dec.shape[0]).T, g, dtype)
        d_values = jnp.take_along_axis(_dot(g, w_dec.T, dtype), local, axis=1)
    else:
        g = jnp.asarray(g, dtype).astype(jnp.float32)
        d_w, d_values = cpu_kernels.scatter_rows_dot(local, values.astype(jnp.float32), g, jnp.asarray(w_dec, dtype),
                                                     functools.partial(_decode_bwd_xla, dtype=dtype))
    return d_values.astype(values.dtype), None, d_w


def _decode_bwd_xla(local, values, g, w_dec, dtype):
    return _scatter_rows(local, values, g, w_dec.shape[0], dtype), _row_products(w_dec, local, g, dtype)


_decode.defvjp(_decode_fwd, _decode_bwd)


def dense_decode(z: jax.Array, w_dec: jax.Array, axis: str | None = None, dtype=jnp.float32) -> jax.Array:
    """z [B, n_local] @ W_dec [n_local, d] -> [B, d], summed over latent shards (dense architectures)."""
    out = _dot(z, w_dec, dtype)
    return out if axis is None else lax.psum(out, axis)


def scatter_counts(index: jax.Array, weight: jax.Array, n_local: int, axis: str | None = None) -> jax.Array:
    """sum over tokens of `weight` at each selected latent -> [n_local] for this shard's block."""
    local, mine = localise(index, n_local, axis)
    if mine is not None:
        weight = jnp.where(mine, weight, 0)
    return jnp.zeros((n_local,), weight.dtype).at[local.reshape(-1)].add(weight.reshape(-1), mode="promise_in_bounds")
