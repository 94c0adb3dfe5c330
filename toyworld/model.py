"""The toy-world model: a small FLUX transformer (jaxdit.flux, unchanged) and a small T5 encoder.

Pixel space, no VAE: a 32x32 RGB image in [-1, 1] is rearranged 2x2 space-to-depth into a 16x16x12
"latent" (lossless), which `flux.pack_latents` packs 2x2 into 8x8 = 64 tokens of 48 features, exactly as
FLUX packs its VAE latents. Text: a word-level tokenizer and a 2-layer T5 encoder; the pooled projection
is the masked mean of its output (FLUX takes CLIP's pooled vector there). Editing appends the source
image's tokens with position ids (1, row, col), as Kontext does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxdit import flux
from jaxdit.configs import FluxConfig, get_config
from jaxdit.text import t5
from jaxdit.toyworld.scenes import SIZE

LATENT = SIZE // 2  # 16x16 latent grid after 2x2 space-to-depth
GRID = LATENT // 2  # 8x8 token grid
TOKENS = GRID * GRID

FLUX_CONFIG: FluxConfig = get_config("toyworld")


def t5_config(vocab_size: int) -> t5.T5EncoderConfig:
    return t5.T5EncoderConfig(vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                              relative_attention_num_buckets=16, relative_attention_max_distance=32)


# --- pixels <-> latents <-> tokens ------------------------------------------------------------------

def to_latents(images) -> jax.Array:
    """[B, 32, 32, 3] uint8 (or float in [-1, 1]) -> [B, 12, 16, 16] float32 in [-1, 1]."""
    x = jnp.asarray(images)
    if x.dtype == jnp.uint8:
        x = x.astype(jnp.float32) / 127.5 - 1
    b = x.shape[0]
    x = x.reshape(b, LATENT, 2, LATENT, 2, 3).transpose(0, 5, 2, 4, 1, 3)  # [B, 3, 2, 2, 16, 16]
    return x.reshape(b, 12, LATENT, LATENT)


def from_latents(latents) -> jax.Array:
    """Inverse of `to_latents`: [B, 12, 16, 16] -> [B, 32, 32, 3] float in [-1, 1]."""
    b = latents.shape[0]
    x = jnp.asarray(latents).reshape(b, 3, 2, 2, LATENT, LATENT).transpose(0, 4, 2, 5, 3, 1)
    return x.reshape(b, SIZE, SIZE, 3)


def to_tokens(images) -> jax.Array:
    """[B, 32, 32, 3] -> [B, 64, 48] packed tokens."""
    return flux.pack_latents(to_latents(images))


def to_images(tokens) -> np.ndarray:
    """[B, 64, 48] tokens -> [B, 32, 32, 3] uint8."""
    x = from_latents(flux.unpack_latents(tokens, LATENT, LATENT))
    return np.asarray(jnp.clip(jnp.round((x + 1) * 127.5), 0, 255)).astype(np.uint8)


# Noise-level shift of training and sampling, sigma -> shift * sigma / (1 + (shift - 1) sigma), as SD3 and
# FLUX shift for large images: a token here is 48 strongly correlated values (flat colour in 4x4 pixels),
# so the layout survives until high noise and is decided there; unshifted logit-normal training almost
# never visits sigma > 0.95 and the model then ignores the prompt at the first sampling steps.
SIGMA_SHIFT = 3.0


def shift_sigma(sigma):
    return SIGMA_SHIFT * sigma / (1 + (SIGMA_SHIFT - 1) * sigma)


IMG_IDS = flux.image_ids(GRID, GRID, 0)
CTX_IDS = flux.image_ids(GRID, GRID, 1)


# --- text -------------------------------------------------------------------------------------------

def encode_text(t5_params, t5_cfg, ids, mask) -> tuple[jax.Array, jax.Array]:
    """(per-token embeddings [B, T, 64], pooled masked mean [B, 64])."""
    h = t5.forward(t5_params, t5_cfg, ids, mask)
    m = jnp.asarray(mask, h.dtype)[..., None]
    return h, (h * m).sum(1) / jnp.maximum(m.sum(1), 1)


def velocity(params, config: FluxConfig, t5_cfg, x, ids, mask, sigma, context=None, hooks=None):
    """Flow velocity (noise - image) for noise tokens x [B, 64, 48] at sigma [B]; context [B, 64, 48] or None.

    Returns (velocity [B, 64, 48], captures).
    """
    h, pooled = encode_text(params["text_encoder"], t5_cfg, ids, mask)
    txt_ids = flux.text_ids(h.shape[1])
    tokens, img_ids, n_ctx = x, IMG_IDS, 0
    if context is not None:
        tokens, img_ids, n_ctx = flux.with_context(x, IMG_IDS, context, CTX_IDS)
    out, caps = flux.forward(params["transformer"], config, tokens, h, pooled, sigma, img_ids, txt_ids, None, hooks,
                             n_ctx)
    return flux.noise_prediction(out, x.shape[1]), caps


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """Both model configs, hashable so they can be static under jit."""

    flux: FluxConfig
    t5: t5.T5EncoderConfig


# Modulation and output layers that start at zero (adaLN-Zero, as DiT trains from scratch): every residual
# branch is gated off and the prediction is 0 at step 0, so the model starts as the identity and learns
# each block's contribution instead of first undoing random modulation.
ZERO_INIT = ("norm1", "norm1_context", "norm", "norm_out", "proj_out")


def adaln_zero(transformer_params: dict) -> dict:
    """Zero the AdaLN modulation linears of every block, the final modulation and the output projection."""
    def visit(tree, top):
        out = {}
        for name, sub in tree.items():
            if name in ZERO_INIT and (name != "proj_out" or top):  # single blocks' proj_out is their MLP output
                out[name] = jax.tree.map(jnp.zeros_like, sub)
            elif isinstance(sub, dict):
                out[name] = visit(sub, False)
            else:
                out[name] = sub
        return out

    return visit(transformer_params, True)


def init_params(cfg: ToyConfig, rng: jax.Array) -> dict:
    k1, k2 = jax.random.split(rng)
    return {"transformer": adaln_zero(flux.init_params(cfg.flux, k1)), "text_encoder": t5.init_params(cfg.t5, k2)}
