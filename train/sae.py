"""Sparse autoencoders as pure functions of a parameter dict: TopK (default), BatchTopK, JumpReLU, ReLU+L1.

Parameters (float32 master weights; d = input width, n = latents):

    W_enc [d, n]   b_enc [n]   W_dec [n, d]   b_dec [d]   threshold [n] (jumprelu, batchtopk)

An SAE reads activations scaled by `SAEConfig.input_scale` (chosen from data so the mean squared norm of
scaled inputs is about `target`; see `input_scale_for`), subtracts `b_dec`, encodes, decodes, adds `b_dec`
and undoes the scale. Decoder rows are kept at unit norm in training (see `project_decoder_grad` and
`normalize_decoder`), so a latent's value is the length of its atom in the reconstruction.

    z = encode(params, cfg, x)            # TopK: (values [..., k], indices [..., k]); others: dense [..., n]
    x_hat = decode(params, cfg, z)        # [..., d], in the model's units
    z = encode_dense(params, cfg, x)      # always dense [..., n]

These inference functions expect replicated (unsharded) latents. Training runs `train_loss` inside
`jax.shard_map` with the latents split over a mesh axis (`Axes`); the TopK selection is then the exact
two-stage form in `jaxdit.train.sparse`.

BatchTopK trains with a batch-level selection and runs at inference as JumpReLU with `threshold` (the
running average of the smallest kept value, set by the trainer), as SAELens saves it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdit.train import cpu_kernels, sparse

ARCHS = ("topk", "batchtopk", "jumprelu", "relu")
SPARSE_ARCHS = ("topk", "batchtopk")  # trained through k-sparse gathers
COMPUTE_DTYPES = ("float32", "bfloat16")
ROW_BLOCK = 1024  # rows per block of the TopK selection on CPU (see _top_preactivations)

Params = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    """What defines an SAE's function (saved with it). Training-only settings live in `LossConfig`."""

    d_in: int
    n_latents: int
    arch: str = "topk"
    k: int = 64  # topk: active latents per token; batchtopk: on average over a batch
    batch_topk_cap: int = 4  # batchtopk: a token keeps at most cap * k latents (candidates per token)
    input_scale: float = 1.0  # x -> x * input_scale before encoding (a power of two, see input_scale_for)
    jumprelu_bandwidth: float = 0.001  # width of the rectangle kernel of the straight-through estimator
    compute_dtype: str = "float32"  # matmul operand dtype; parameters and accumulation stay float32
    position: str | None = None  # hook position the SAE reads, e.g. "single.10.img.resid_post"
    model: str | None = None  # model the activations came from

    def __post_init__(self):
        if self.d_in < 1 or self.n_latents < 1:
            raise ValueError(f"SAE widths must be positive, got d_in={self.d_in}, n_latents={self.n_latents}")
        if self.arch not in ARCHS:
            raise ValueError(f"unknown SAE architecture {self.arch!r}; expected one of {list(ARCHS)}")
        if self.arch in SPARSE_ARCHS and not 1 <= self.k <= self.n_latents:
            raise ValueError(f"k={self.k} must be between 1 and the SAE width n_latents={self.n_latents}")
        if self.batch_topk_cap < 1:
            raise ValueError(f"batch_topk_cap must be >= 1, got {self.batch_topk_cap}")
        if not (math.isfinite(self.input_scale) and self.input_scale > 0):
            raise ValueError(f"input_scale must be a positive finite number, got {self.input_scale}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype {self.compute_dtype!r}: expected one of {list(COMPUTE_DTYPES)}")

    def replace(self, **changes) -> "SAEConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"SAE config: unknown fields {unknown}")
        return cls(**d)

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Training objective: FVU + aux_alpha * AuxK (+ sparsity_coeff * L0 for jumprelu, * L1 for relu)."""

    aux_k: int = 256  # dead latents fitted to the residual per token (OpenAI's default)
    aux_alpha: float = 1 / 32  # 0 removes the AuxK branch from the program
    dead_tokens: int = 10_000_000  # a latent silent for this many tokens is dead
    sparsity_coeff: float = 0.0


@dataclasses.dataclass(frozen=True)
class Axes:
    """Mesh axis names when running inside `jax.shard_map`; the defaults mean one device."""

    latents: str | None = None  # axis the latent dimension is split over
    batch: tuple[str, ...] = ()  # axes the batch is split over (batch statistics are summed over them)


# --- parameters -----------------------------------------------------------------------------------

def init_params(cfg: SAEConfig, key: jax.Array, b_dec: jax.Array | None = None,
                threshold: float = 0.001) -> Params:
    """Unit-norm random decoder rows, encoder tied to the decoder (W_enc = W_dec^T), zero b_enc.

    b_dec [d]: the data's geometric median or mean (in scaled units), zeros if None. `threshold` is the
    JumpReLU initial threshold (GDM's 0.001); BatchTopK's inference threshold starts at 0.
    """
    w_dec = _unit_rows(jax.random.normal(key, (cfg.n_latents, cfg.d_in), jnp.float32))
    params = {
        "W_enc": w_dec.T,
        "b_enc": jnp.zeros((cfg.n_latents,), jnp.float32),
        "W_dec": w_dec,
        "b_dec": jnp.zeros((cfg.d_in,), jnp.float32) if b_dec is None else jnp.asarray(b_dec, jnp.float32),
    }
    if cfg.arch == "jumprelu":
        params["threshold"] = jnp.full((cfg.n_latents,), threshold, jnp.float32)
    elif cfg.arch == "batchtopk":
        params["threshold"] = jnp.zeros((cfg.n_latents,), jnp.float32)
    return params


def param_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    d, n = cfg.d_in, cfg.n_latents
    shapes = {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}
    if cfg.arch in ("jumprelu", "batchtopk"):
        shapes["threshold"] = (n,)
    return shapes


# Logical axes of each parameter (names of `jaxdit.sharding.RULES`): the latents are split, the input
# width is not (every latent shard reads every input feature).
PARAM_AXES = {"W_enc": ("sae_in", "latents"), "b_enc": ("latents",), "W_dec": ("latents", "sae_in"),
              "b_dec": ("sae_in",), "threshold": ("latents",)}


def param_axes(cfg: SAEConfig) -> dict[str, tuple[str, ...]]:
    """The logical axes of every parameter of `cfg`'s SAE, keyed like `param_shapes`."""
    return {name: PARAM_AXES[name] for name in param_shapes(cfg)}


def check_params(cfg: SAEConfig, params: Params, where: str = "SAE") -> None:
    """Raise naming the key and both shapes if `params` does not fit `cfg`."""
    want = param_shapes(cfg)
    missing, unexpected = sorted(set(want) - set(params)), sorted(set(params) - set(want))
    if missing or unexpected:
        raise ValueError(f"{where}: parameters do not match a {cfg.arch} SAE: missing {missing}, "
                         f"unexpected {unexpected}")
    for name, shape in want.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"{where}: {name} has shape {tuple(params[name].shape)}, expected {shape} "
                             f"(d_in={cfg.d_in}, n_latents={cfg.n_latents})")


def _unit_rows(w: jax.Array) -> jax.Array:
    return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)


def normalize_decoder(params: Params) -> Params:
    """Rescale every decoder row to unit norm (after each optimiser step).

    Row by row: `optax.projections.projection_l2_sphere` would rescale the whole tree by one norm.
    """
    return {**params, "W_dec": _unit_rows(params["W_dec"])}


def project_decoder_grad(grads: Params, params: Params) -> Params:
    """Remove from each decoder row's gradient its component along the (unit) row, so the step moves
    the row along the sphere and the renormalisation after it only corrects second-order drift."""
    w, g = params["W_dec"], grads["W_dec"]
    return {**grads, "W_dec": g - jnp.sum(g * w, axis=-1, keepdims=True) * w}


# --- data-dependent initialisation -------------------------------------------------------------------

def input_scale_for(mean_sq_norm: float, target: float = 1.0) -> float:
    """The power of two s closest (in log) to making E|s x|^2 = target.

    A power of two, so folding the scale into exported weights and unfolding it on import are exact in
    floating point; the mean squared norm of scaled inputs is then within a factor 2 of `target`.
    """
    if not (math.isfinite(mean_sq_norm) and mean_sq_norm > 0):
        raise ValueError(f"cannot normalise inputs: mean squared norm of the sample is {mean_sq_norm}")
    return float(2.0 ** round(0.5 * math.log2(target / mean_sq_norm)))


@functools.partial(jax.jit, static_argnames="iters")
def geometric_median(x: jax.Array, iters: int = 100) -> jax.Array:
    """Weiszfeld iterations for the point minimising the sum of distances to the rows of x [N, d].

    Starts from the mean; weights 1 / max(distance, eps) so a row sitting on the estimate cannot
    divide by zero. Jitted over a (possibly batch-sharded) global array, so the reductions span hosts.
    """
    x = x.astype(jnp.float32)

    def step(_, y):
        w = 1.0 / jnp.maximum(jnp.linalg.norm(x - y, axis=-1), 1e-8)
        return jnp.sum(w[:, None] * x, axis=0) / jnp.sum(w)

    return lax.fori_loop(0, iters, step, jnp.mean(x, axis=0))


# --- JumpReLU straight-through estimators (rectangle kernel, Rajamanoharan et al. 2024) ----------------

def _rectangle(u: jax.Array) -> jax.Array:
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(pre: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """relu(pre) where pre > threshold, else 0. The threshold gets a pseudo-gradient through a
    rectangle kernel of width `bandwidth`; the input the ordinary gradient of the kept values."""
    return jnp.where(pre > threshold, jax.nn.relu(pre), 0.0)


def _jumprelu_fwd(pre, threshold, bandwidth):
    return jumprelu(pre, threshold, bandwidth), (pre, threshold)


def _jumprelu_bwd(bandwidth, res, g):
    pre, threshold = res
    d_pre = jnp.where((pre > threshold) & (pre > 0), g, 0.0)
    d_th = -(threshold / bandwidth) * _rectangle((pre - threshold) / bandwidth) * g
    return d_pre, _sum_to(d_th, threshold.shape)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def heaviside(pre: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """1[pre > threshold] (the L0 count); only the threshold gets a (rectangle-kernel) gradient."""
    return (pre > threshold).astype(pre.dtype)


def _heaviside_fwd(pre, threshold, bandwidth):
    return heaviside(pre, threshold, bandwidth), (pre, threshold)


def _heaviside_bwd(bandwidth, res, g):
    pre, threshold = res
    d_th = -(1.0 / bandwidth) * _rectangle((pre - threshold) / bandwidth) * g
    return jnp.zeros_like(pre), _sum_to(d_th, threshold.shape)


heaviside.defvjp(_heaviside_fwd, _heaviside_bwd)


def _sum_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jnp.sum(x, axis=tuple(range(x.ndim - len(shape)))).reshape(shape)


# --- inference ------------------------------------------------------------------------------------

def _flat(x: jax.Array, width: int, what: str) -> jax.Array:
    if x.shape[-1] != width:
        raise ValueError(f"{what} has width {x.shape[-1]}, this SAE expects {width}")
    return x.reshape(-1, width)


def _preactivations(params: Params, cfg: SAEConfig, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B, d] (model units) -> (scaled input [B, d], scaled input - b_dec, pre-activations [B, n_local]),
    all float32."""
    xn = x.astype(jnp.float32) * cfg.input_scale
    xc = xn - params["b_dec"]
    pre = jnp.dot(xc.astype(cfg.dtype), params["W_enc"].astype(cfg.dtype), preferred_element_type=jnp.float32)
    return xn, xc, pre + params["b_enc"]


def encode(params: Params, cfg: SAEConfig, x: jax.Array):
    """x [..., d] -> TopK: (values [..., k], indices [..., k] int32); other architectures: dense [..., n]."""
    lead = x.shape[:-1]
    _, _, pre = _preactivations(params, cfg, _flat(x, cfg.d_in, "input"))
    if cfg.arch == "topk":
        values, index = cpu_kernels.top_k(pre, cfg.k)
        return jax.nn.relu(values).reshape(*lead, cfg.k), index.reshape(*lead, cfg.k)
    if cfg.arch == "relu":
        z = jax.nn.relu(pre)
    else:  # jumprelu, and batchtopk at inference
        z = jnp.where(pre > params["threshold"], jax.nn.relu(pre), 0.0)
    return z.reshape(*lead, cfg.n_latents)


def encode_dense(params: Params, cfg: SAEConfig, x: jax.Array) -> jax.Array:
    """x [..., d] -> latents [..., n] for any architecture."""
    z = encode(params, cfg, x)
    if not isinstance(z, tuple):
        return z
    values, index = z
    flat_v, flat_i = values.reshape(-1, cfg.k), index.reshape(-1, cfg.k)
    dense = jnp.zeros((flat_v.shape[0], cfg.n_latents), values.dtype)
    dense = dense.at[jnp.arange(flat_v.shape[0])[:, None], flat_i].set(flat_v)
    return dense.reshape(*values.shape[:-1], cfg.n_latents)


def decode(params: Params, cfg: SAEConfig, z) -> jax.Array:
    """(values [..., k], indices [..., k]) or dense latents [..., n] -> reconstruction [..., d] (model units)."""
    if isinstance(z, tuple):
        values, index = z
        lead = values.shape[:-1]
        kk = values.shape[-1]
        out = sparse.gather_decode(values.reshape(-1, kk), index.reshape(-1, kk), params["W_dec"], dtype=cfg.dtype)
    else:
        lead = z.shape[:-1]
        out = sparse.dense_decode(_flat(z, cfg.n_latents, "latents"), params["W_dec"], dtype=cfg.dtype)
    return ((out + params["b_dec"]) / cfg.input_scale).reshape(*lead, cfg.d_in)


def reconstruct(params: Params, cfg: SAEConfig, x: jax.Array) -> jax.Array:
    return decode(params, cfg, encode(params, cfg, x))


# --- training ---------------------------------------------------------------------------------------

def _psum(x: jax.Array, axes) -> jax.Array:
    return lax.psum(x, axes) if axes else x


def _vary(x: jax.Array, axes: Axes) -> jax.Array:
    """Mark a batch-replicated parameter as varying over the batch axes before a custom_vjp, whose
    backward returns per-shard gradients; the transpose of this cast sums them over the batch."""
    return lax.pcast(x, axes.batch, to="varying") if axes.batch else x


def train_loss(params: Params, cfg: SAEConfig, loss_cfg: LossConfig, x: jax.Array, since_fired: jax.Array,
               axes: Axes, global_batch: int,
               auxk_width: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training objective on this device's batch x [B_local, d] (model units).

    Inside shard_map params hold this device's latent block; `since_fired` [n_local] int32 counts tokens
    since each latent last fired. Returns (loss, aux) with aux holding replicated scalar metrics, `fired`
    [n_local] (tokens on which each latent was active, summed over the batch) and, for batchtopk, the
    batch's threshold (smallest kept value).

    TopK / BatchTopK: the dense pre-activations are computed once, without gradient; the selected
    values are taken from them and differentiated k-sparsely (`sparse.select_encode`, `gather_decode`),
    or densely where that is faster (`sparse.sparse_pays`). Gradients are not the dense [B, n] ones.

    AuxK (aux_alpha > 0) runs only while some latent is dead, at the narrowest of `auxk_widths` holding
    the dead latents, chosen inside the program; `auxk_width` instead fixes the width (one of
    `auxk_widths`, for a caller that knows the dead count), and 0 leaves AuxK out (its metric reads 0).
    """
    dt = cfg.dtype
    n_local = params["b_enc"].shape[-1]
    aux: dict[str, jax.Array] = {}

    if cfg.arch in SPARSE_ARCHS:
        xn = x.astype(jnp.float32) * cfg.input_scale
        width = cfg.k if cfg.arch == "topk" else min(cfg.batch_topk_cap * cfg.k, cfg.n_latents)
        weights = {name: _vary(params[name], axes) for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
        selected, index = _top_preactivations(weights, cfg, xn, width, axes)
        values = _encode_selected(weights, selected, index, xn, axes, dt)
        active = selected > 0  # the selection is the same on every latent shard
        if cfg.arch == "batchtopk":
            threshold = _batch_threshold(jax.nn.relu(selected), cfg.k * global_batch, axes)
            active = active & (selected >= threshold)
            values = jnp.where(active, values, 0.0)
            aux["batch_threshold"] = threshold
        x_hat = _decode_selected(weights, values, index, axes, dt) + params["b_dec"]
        fired = sparse.scatter_counts(index, active.astype(jnp.int32), n_local, axes.latents)
        l0 = jnp.sum(active, dtype=jnp.float32)
    else:
        xn, _, pre = _preactivations(params, cfg, x)
        if cfg.arch == "jumprelu":
            th = _vary(params["threshold"], axes)
            z = jumprelu(pre, th, cfg.jumprelu_bandwidth)
            penalty = jnp.sum(heaviside(pre, th, cfg.jumprelu_bandwidth))
        else:
            z = jax.nn.relu(pre)
            penalty = jnp.sum(z)  # L1; decoder rows are unit norm, so no norm weighting is needed
        x_hat = sparse.dense_decode(z, params["W_dec"], axes.latents, dt) + params["b_dec"]
        active = z > 0
        fired = jnp.sum(active, axis=0, dtype=jnp.int32)
        l0 = _psum(jnp.sum(active, dtype=jnp.float32), axes.latents)
        aux["sparsity"] = _psum(_psum(penalty, axes.latents), axes.batch) / global_batch

    err = xn - x_hat
    sse = _psum(jnp.sum(err * err), axes.batch)
    mean = _psum(jnp.sum(xn, axis=0), axes.batch) / global_batch
    total_var = jnp.maximum(_psum(jnp.sum((xn - mean) ** 2), axes.batch), jnp.finfo(jnp.float32).tiny)
    fvu = sse / total_var
    loss = fvu

    dead = since_fired >= loss_cfg.dead_tokens
    num_dead = _psum(jnp.sum(dead, dtype=jnp.int32), axes.latents)
    if cfg.arch in SPARSE_ARCHS and loss_cfg.aux_alpha > 0:
        aux_k = min(loss_cfg.aux_k, cfg.n_latents)
        if auxk_width == 0:
            aux_loss = jnp.zeros((), jnp.float32)
        else:
            if auxk_width is None:
                aux_loss = _auxk(weights, cfg, xn, dead, num_dead, err, aux_k, axes)
            else:
                aux_loss = _auxk_fit(auxk_width, cfg, axes)(weights, xn, dead, err)
            aux_loss = aux_loss * jnp.minimum(num_dead / aux_k, 1.0) / total_var
            loss = loss + loss_cfg.aux_alpha * aux_loss
        aux["aux_loss"] = aux_loss
    if "sparsity" in aux:
        loss = loss + loss_cfg.sparsity_coeff * aux["sparsity"]

    aux.update(
        fvu=fvu,
        mse=sse / (global_batch * cfg.d_in),
        l0=_psum(l0, axes.batch) / global_batch,
        dead_fraction=num_dead / cfg.n_latents,
        fired=_psum(fired, axes.batch),
    )
    return loss, aux


def _top_preactivations(weights: Params, cfg: SAEConfig, xn: jax.Array, width: int, axes: Axes,
                        keep: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The top `width` pre-activations of each row of xn [B, d] (scaled inputs) over the latents (only
    those where `keep` [n_local] is true), without gradient -> (values [B, width], global indices).

    On CPU by blocks of `ROW_BLOCK` rows, so the [B, n] pre-activations never exist whole: fresh memory
    costs a page fault per 4 KiB there and a block stays in cache for its top k (steps 3-8% faster at
    d 256-768 than with the whole batch at once).
    """
    w_enc, b_enc, b_dec = (lax.stop_gradient(weights[k]) for k in ("W_enc", "b_enc", "b_dec"))

    def select(rows):
        pre = jnp.dot((rows - b_dec).astype(cfg.dtype), w_enc.astype(cfg.dtype),
                      preferred_element_type=jnp.float32) + b_enc
        if keep is not None:
            pre = jnp.where(keep, pre, -jnp.inf)
        return sparse.topk(pre, width, axes.latents)

    rows = xn.shape[0]
    if jax.default_backend() != "cpu" or rows % ROW_BLOCK or rows <= ROW_BLOCK:
        return select(xn)
    values, index = lax.map(select, xn.reshape(rows // ROW_BLOCK, ROW_BLOCK, xn.shape[1]))
    return values.reshape(rows, width), index.reshape(rows, width)


def _encode_selected(weights: Params, selected, index, xn, axes: Axes, dt) -> jax.Array:
    """relu of the selected pre-activations [B, k], differentiable in the encoder (see train_loss)."""
    dense = not sparse.sparse_pays(weights["W_enc"].shape[1], index.shape[1])
    return jax.nn.relu(sparse.select_encode(selected, xn, weights["b_dec"], weights["W_enc"], weights["b_enc"],
                                            index, axes.latents, dense, dt))


def _decode_selected(weights: Params, values, index, axes: Axes, dt) -> jax.Array:
    dense = not sparse.sparse_pays(weights["W_dec"].shape[0], index.shape[1])
    return sparse.gather_decode(values, index, weights["W_dec"], axes.latents, dt, dense)


def auxk_widths(aux_k: int) -> tuple[int, ...]:
    """The AuxK widths compiled for `aux_k`: aux_k, aux_k / 4, ... down to about 16, ascending."""
    widths = [aux_k]
    while widths[-1] > 16:
        widths.append(widths[-1] // 4)
    return tuple(reversed(widths))


def _auxk(weights: Params, cfg: SAEConfig, xn, dead, num_dead, err, aux_k: int, axes: Axes) -> jax.Array:
    """Sum of squared errors of the top-aux_k dead latents fitted to the (fixed) residual (Gao et al. 2024).

    Runs only when some latent is dead (a `lax.switch` on the dead count, which is the same on every
    device; 0 otherwise), at the narrowest of `auxk_widths(aux_k)` that holds every dead latent: the top
    aux_k of the dead pre-activations are the dead latents in order, then -inf entries that contribute
    exact zeros, so the narrower selection gives the same loss and gradients (up to the rounding of dense
    products, whose compiled form may differ).
    """
    widths = auxk_widths(aux_k)

    def nothing_dead(*_):
        return jnp.zeros((), jnp.float32)

    branches = [nothing_dead, *(_auxk_fit(w, cfg, axes) for w in widths)]
    return lax.switch(_auxk_branch(num_dead, widths), branches, weights, xn, dead, err)


def _auxk_fit(width: int, cfg: SAEConfig, axes: Axes):
    """AuxK's sum of squared errors at a fixed width. The dead latents' pre-activations are recomputed
    (one more [B, d] x [d, n] product while latents are dead) rather than kept from the main selection,
    which on CPU never holds them whole, and nothing of size [B, n] passes into `_auxk`'s switch."""
    def fit(weights, xn, dead, err):
        selected, index = _top_preactivations(weights, cfg, xn, width, axes, keep=dead)
        values = _encode_selected(weights, selected, index, xn, axes, cfg.dtype)
        values = jnp.where(jnp.isfinite(selected), values, 0.0)  # fewer dead latents than width: drop live ones
        e_hat = _decode_selected(weights, values, index, axes, cfg.dtype)
        return _psum(jnp.sum((e_hat - lax.stop_gradient(err)) ** 2), axes.batch)
    return fit


def _auxk_branch(num_dead: jax.Array, widths: tuple[int, ...]) -> jax.Array:
    """0 while no latent is dead, else 1 + the position of the narrowest width holding every dead latent."""
    return jnp.where(num_dead > 0, 1 + jnp.sum(num_dead > jnp.asarray(widths[:-1], jnp.int32)), 0)


def _batch_threshold(candidates: jax.Array, keep: int, axes: Axes) -> jax.Array:
    """The keep-th largest of all candidate values of the global batch (all tokens, all shards)."""
    flat = candidates.reshape(1, -1)
    if axes.batch:
        flat = sparse.gather_replicated(flat, axes.batch)
    flat = flat.reshape(-1)
    keep = min(keep, flat.shape[0])
    return cpu_kernels.top_k(flat, keep)[0][keep - 1]


def update_since_fired(since_fired: jax.Array, fired: jax.Array, tokens: int) -> jax.Array:
    """Tokens since each latent last fired, saturating so int32 never overflows."""
    return jnp.where(fired > 0, 0, jnp.minimum(since_fired, np.iinfo(np.int32).max - tokens) + tokens)
