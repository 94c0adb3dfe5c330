"""Small pure building blocks shared by every model family.

Numerics that must stay float32 whatever the compute dtype (timestep sinusoids, RoPE tables, norm
statistics) are computed in float32 here and only the results are cast.

Every parameter declares its logical axes where it is created (names of `jaxdit.sharding.RULES`):
`dense(..., axes=(input, output))` and `declare` boxes on the other initialisers. `init` then returns
boxed parameters; the models' `init_params` unbox them and `logical_axes(config)` reads the boxes.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = jnp.dtype


def declare(init, axes: tuple):
    """`init` with its parameter's logical axes declared (one RULES name or None per dimension)."""
    return nn.with_logical_partitioning(init, axes)


def dense(features: int, name: str, dtype, use_bias: bool = True, *, axes: tuple[str | None, str | None] | None
          ) -> nn.Dense:
    """A Linear layer; parameters keep their own (checkpoint) dtype, compute runs in `dtype`.

    axes: logical axes (input, output) of the kernel [in, out]: ("embed", "heads" | "mlp") for a
    column-parallel layer, ("heads" | "mlp", "embed") for a row-parallel one. The bias takes the output
    axis, except the model width: a [D] bias stays whole (FSDP splits the matrices; a split vector would
    only add a gather to every layer). None declares nothing (the VAE, which is never sharded).
    """
    if axes is None:
        return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)
    bias_axes = (None if axes[1] == "embed" else axes[1],)
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
                    kernel_init=declare(nn.linear.default_kernel_init, axes),
                    bias_init=declare(nn.initializers.zeros_init(), bias_axes))


def gelu_tanh(x: jax.Array) -> jax.Array:
    return nn.gelu(x, approximate=True)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters; statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis with a learnable `scale` (torch `nn.RMSNorm` / diffusers `RMSNorm`)."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", declare(nn.initializers.ones, ("norm",)), (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """AdaLN modulation `(1 + scale) * x + shift` with per-sample shift/scale `[B, D]`."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def timestep_sinusoid(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """[cos, sin] sinusoidal embedding of `t` ([B] -> [B, dim]) in float32.

    Equals diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)` and BFL
    `timestep_embedding` (after the x1000 each applies outside this function).
    """
    half = dim // 2
    # Host constant: float32 exponents as the references form them, exp correctly rounded. XLA's and
    # torch's float32 exp differ by an ulp on some entries, which at t ~ 1000 moves sin/cos by 3e-5.
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (diffusers `TimestepEmbedding` / `PixArtAlphaTextProjection`)."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # the input (a sinusoid or pooled text) is narrow: only the model width is split
        x = dense(self.features, "linear_1", self.dtype, axes=(None, "embed"))(x)
        return dense(self.features, "linear_2", self.dtype, axes=("embed", None))(nn.silu(x))


class AdaLNModulation(nn.Module):
    """`linear(silu(temb))` split into `chunks` vectors of width `dim` (order is the caller's)."""

    dim: int
    chunks: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, temb: jax.Array) -> list[jax.Array]:
        emb = dense(self.chunks * self.dim, "linear", self.dtype, axes=("embed", "mlp"))(nn.silu(temb))
        return jnp.split(emb, self.chunks, axis=-1)


# --- rotary position embedding -------------------------------------------------------------------

def _split_float32(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 -> (hi, lo) float32 with `hi` holding `bits` significant bits, so int * hi is exact."""
    m, e = np.frexp(x)
    hi = np.ldexp(np.round(np.ldexp(m, bits)), e - bits)
    return hi.astype(np.float32), (x - hi).astype(np.float32)


_TWO_PI_HI, _TWO_PI_MID = _split_float32(np.array(2 * np.pi), 12)
_TWO_PI_LO = np.float32(2 * np.pi - float(_TWO_PI_HI) - float(_TWO_PI_MID))


def rope_angles(pos: jax.Array, dim: int, theta: float) -> jax.Array:
    """Angles `pos * theta^(-2j/dim)` reduced to [-pi, pi], accurate to float32 rounding.

    The references build this table in float64. Plain float32 `pos * omega` loses ~ulp(angle)
    (4e-6 rad at position 64), so the product is split: omega = hi + lo with 12-bit `hi`, making
    `pos * hi` exact for integer positions below 2^12, and the multiple of 2*pi is removed in three
    exact-ish pieces (Cody-Waite) before the small remainder is added back.
    pos: [N] float32 -> [N, dim/2] float32.
    """
    omega = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    hi, lo = _split_float32(omega, 12)
    pos = pos.astype(jnp.float32)[:, None]
    a_hi = pos * hi
    a_lo = pos * lo
    k = jnp.round((a_hi + a_lo) / np.float32(2 * np.pi))
    r = a_hi - k * _TWO_PI_HI  # exact: k and hi have few significant bits
    r = r - k * _TWO_PI_MID
    r = r - k * _TWO_PI_LO
    return r + a_lo


def rope_table(ids: jax.Array, axes_dims: tuple[int, ...], theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables for multi-axis RoPE with interleaved pairs.

    ids: [N, n_axes] positions -> (cos, sin), each [N, sum(axes_dims)] float32, each frequency
    repeated twice (pairs (x[2j], x[2j+1]) rotate together), axes concatenated in order.
    """
    if ids.shape[-1] != len(axes_dims):
        raise ValueError(f"position ids have {ids.shape[-1]} axes but axes_dims_rope has {len(axes_dims)}")
    angles = jnp.concatenate([rope_angles(ids[:, i], d, theta) for i, d in enumerate(axes_dims)], axis=-1)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    return jnp.repeat(cos, 2, axis=-1), jnp.repeat(sin, 2, axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs of `x` [B, N, H, D] by tables [N, D]; computed in float32."""
    x32 = x.astype(jnp.float32)
    pairs = x32.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    out = x32 * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)
