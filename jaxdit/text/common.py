"""Pieces shared by the text encoders: activations by their transformers names, LayerNorm with affine
parameters, and a self-attention core with an additive bias and a boolean key mask.

The encoders run once per prompt on at most a few hundred tokens, so attention is the explicit
logits -> float32 softmax -> weights @ values path (T5 needs a dense [heads, tokens, tokens] position
bias and no 1/sqrt(d) scale, which the fused kernels do not take in that form).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdit.layers import declare, gelu_tanh, layer_norm


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's x * sigmoid(1.702 x) (transformers `quick_gelu`)."""
    return x * jax.nn.sigmoid(1.702 * x)


def _gelu_erf(x: jax.Array) -> jax.Array:
    return nn.gelu(x, approximate=False)


def _laplace(x: jax.Array, mu: float = 0.707107, sigma: float = 0.282095) -> jax.Array:
    """transformers' `LaplaceActivation` (MEGA): the normal CDF at (x - mu) / sigma."""
    return 0.5 * (1.0 + jax.scipy.special.erf((x - mu) / (sigma * 2.0 ** 0.5)))


# transformers ACT2FN names -> functions: every parameter-free entry, so any `hidden_act` (CLIP) or
# `feed_forward_proj` (T5) that transformers accepts runs here ("prelu" and "xielu" carry learned
# parameters and are refused). Explicit `approximate` everywhere: flax's gelu defaults to tanh. The tanh
# GELU variants (gelu_new, gelu_fast, gelu_accurate, ...) differ only in how their constants round.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": _gelu_erf,
    "gelu_python": _gelu_erf,
    "gelu_10": lambda x: jnp.clip(_gelu_erf(x), -10.0, 10.0),
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_python_tanh": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "gelu_accurate": gelu_tanh,
    "relu": nn.relu,
    "relu2": lambda x: jnp.square(nn.relu(x)),
    "relu6": nn.relu6,
    "leaky_relu": lambda x: nn.leaky_relu(x, 0.01),  # torch's default slope
    "silu": nn.silu,
    "swish": nn.silu,
    "mish": lambda x: x * jnp.tanh(nn.softplus(x)),
    "hardswish": nn.hard_swish,
    "sigmoid": nn.sigmoid,
    "tanh": jnp.tanh,
    "linear": lambda x: x,
    "laplace": _laplace,
    "sqrtsoftplus": lambda x: jnp.sqrt(nn.softplus(x)),
}


def activation(name: str, where: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"{where}: activation {name!r} is not supported (supported: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class LayerNorm(nn.Module):
    """torch `nn.LayerNorm` with weight (`scale`) and bias; statistics and affine in float32."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        scale = self.param("scale", declare(nn.initializers.ones, ("norm",)), (dim,), jnp.float32)
        bias = self.param("bias", declare(nn.initializers.zeros, ("norm",)), (dim,), jnp.float32)
        y = layer_norm(x.astype(jnp.float32), self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def self_attention(
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array,  # [B, T, H, D]
    v: jax.Array,  # [B, T, H, D]
    scale: float,
    bias: jax.Array | None = None,  # additive logits bias broadcastable to [B, H, T, T]
    mask: jax.Array | None = None,  # bool, True = attend, broadcastable to [B, H, T, T]
) -> jax.Array:
    """Softmax attention with float32 logits and softmax; returns [B, T, H, D] in v's dtype.

    Masked logits are *replaced* by the float32 minimum (not added to it, which overflows to -inf):
    the weights of masked keys are exactly zero, as with transformers' additive `finfo.min` mask.
    """
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    if scale != 1.0:
        logits = logits * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(v.dtype)


def key_mask(attention_mask: jax.Array | None) -> jax.Array | None:
    """Tokenizer attention mask [B, T] (1 = token, 0 = padding) -> bool key mask [B, 1, 1, T]."""
    if attention_mask is None:
        return None
    return jnp.asarray(attention_mask).astype(bool)[:, None, None, :]


def check_input_ids(input_ids, attention_mask, max_len: int | None, where: str) -> None:
    if input_ids.ndim != 2:
        raise ValueError(f"{where}: input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"{where}: input_ids must be integers, got {input_ids.dtype}")
    if max_len is not None and input_ids.shape[1] > max_len:
        raise ValueError(f"{where}: {input_ids.shape[1]} tokens but the model has {max_len} positions")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"{where}: attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
