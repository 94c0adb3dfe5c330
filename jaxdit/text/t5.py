"""T5 encoder (T5 v1.1-XXL for FLUX and SD3, and T5 v1.0) as Flax linen modules applied functionally.

Matches transformers `T5EncoderModel`. The traps other ports fell into (the reference notes on the models, section 8):
no 1/sqrt(d_kv) scaling of the scores; one relative-position bias, owned by block 0 and reused by every
layer; `T5LayerNorm` is an RMS norm (no mean, no bias) with float32 statistics, eps 1e-6. The FFN is
T5Config's `feed_forward_proj`: gated `act(wi_0 x) * wi_1 x` ("gated-gelu" of v1.1, with `gelu_new`, the
tanh GELU) or plain `act(wi x)` ("relu" of v1.0), for any activation of `text.common.ACTIVATIONS`.

Parameter paths mirror the transformers names with the `encoder.` prefix dropped, so the block list is
the first path component and is stacked under `nn.scan`:

    shared/embedding                                  [vocab, d_model]
    relative_attention_bias/embedding                 [num_buckets, heads]  (HF: block.0.layer.0.SelfAttention.
                                                                              relative_attention_bias, reused by all)
    block/layer/0/layer_norm/scale                    [L, d_model]
    block/layer/0/SelfAttention/{q,k,v,o}/kernel      [L, ...]
    block/layer/1/layer_norm/scale
    block/layer/1/DenseReluDense/{wi_0,wi_1,wo}/kernel  (plain FFN: {wi,wo})
    final_layer_norm/scale

    last_hidden_state = forward(params, config, input_ids, attention_mask=None)   # [B, T, d_model]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdit import sharding
from jaxdit.configs import check_field_types
from jaxdit.layers import RMSNorm, declare, dense
from jaxdit.text.common import activation, check_input_ids, key_mask, self_attention

_DTYPES = ("float32", "bfloat16", "float16")
_REQUIRED = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
    """transformers `T5Config` fields the encoder uses (same names and meaning)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "gelu_new"
    is_gated_act: bool = True
    # Not architecture: how the program runs.
    dtype: str = "float32"  # compute dtype of activations and matmuls (norms and softmax stay float32)

    family = "t5"

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"T5EncoderConfig.dtype={self.dtype!r}: expected one of {_DTYPES}")
        activation(self.dense_act_fn, "T5EncoderConfig.dense_act_fn")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    def replace(self, **changes) -> "T5EncoderConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_transformers(cls, cfg: dict[str, Any], **overrides) -> "T5EncoderConfig":
        """From a transformers T5 `config.json` dict, the FFN derived as `T5Config` derives it.

        `feed_forward_proj` (default "relu") is "{act}" or "gated-{act}"; "gated-gelu" means gated
        `gelu_new`. Files written by transformers also store the derived `dense_act_fn` and `is_gated_act`,
        which T5Config lets win over `feed_forward_proj`, and so does this.
        """
        proj = cfg.get("feed_forward_proj", "relu")
        if not isinstance(proj, str):
            raise ValueError(f"field 'feed_forward_proj' is {proj!r}, expected a string")
        parts = proj.split("-")
        if (len(parts) > 1 and parts[0] != "gated") or len(parts) > 2:
            raise ValueError(f"T5 feed_forward_proj={proj!r}: expected '{{act}}' or 'gated-{{act}}' "
                             "(e.g. 'relu', 'gated-gelu')")
        if cfg.get("is_decoder", False):
            raise ValueError("T5 config has is_decoder=true; only the encoder is supported")
        missing = [k for k in _REQUIRED if k not in cfg]
        if missing:
            raise ValueError(f"T5 config lacks {missing}")
        # Older configs (the original t5-v1_1 ones) predate relative_attention_max_distance: the
        # dataclass defaults are transformers' T5Config defaults for these.
        fields = {f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name != "dtype" and f.name in cfg}
        check_field_types(cls, fields)
        fields.setdefault("dense_act_fn", "gelu_new" if proj == "gated-gelu" else parts[-1])
        fields.setdefault("is_gated_act", parts[0] == "gated")
        fields.update(overrides)
        return cls(**fields)

    def to_json(self) -> dict[str, Any]:
        return {"family": self.family, **dataclasses.asdict(self)}


T5_XXL = T5EncoderConfig()  # google/t5-v1_1-xxl encoder (FLUX text_encoder_2, SD3 text_encoder_3)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional bucket of (key - query) for every pair: [length, length] int32, a host constant.

    The same float32 operations as transformers `T5Attention._relative_position_bucket` (log, divide,
    truncate), so positions on a bucket boundary round the same way.
    """
    rel = np.arange(length)[None, :] - np.arange(length)[:, None]  # memory - context
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    max_exact = half // 2
    # max(dist, 1) only avoids log(0) on entries the `dist < max_exact` branch takes anyway.
    ratio = np.maximum(dist, 1).astype(np.float32) / np.float32(max_exact)
    large = max_exact + (np.log(ratio) / np.float32(math.log(max_distance / max_exact))
                         * np.float32(half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(dist < max_exact, dist, large)).astype(np.int32)


class T5Attention(nn.Module):
    config: T5EncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array, position_bias: jax.Array, mask: jax.Array | None) -> jax.Array:
        cfg, dt = self.config, jnp.dtype(self.config.dtype)
        b, t, _ = x.shape

        def heads(name):
            y = dense(cfg.inner_dim, name, dt, use_bias=False, axes=("embed", "heads"))(x)  # column-parallel
            return y.reshape(b, t, cfg.num_heads, cfg.d_kv)

        # scale 1: T5 folds the scale into its initialisation and never divides by sqrt(d_kv).
        out = self_attention(heads("q"), heads("k"), heads("v"), 1.0, bias=position_bias, mask=mask)
        return dense(cfg.d_model, "o", dt, use_bias=False, axes=("heads", "embed"))(out.reshape(b, t, cfg.inner_dim))


class T5LayerSelfAttention(nn.Module):
    config: T5EncoderConfig

    @nn.compact
    def __call__(self, x, position_bias, mask):
        h = RMSNorm(self.config.layer_norm_epsilon, name="layer_norm")(x)
        return x + T5Attention(self.config, name="SelfAttention")(h, position_bias, mask)


class T5DenseActDense(nn.Module):
    """T5 v1.0's FFN: wo(act(wi x))."""

    config: T5EncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dt = self.config, jnp.dtype(self.config.dtype)
        h = activation(cfg.dense_act_fn, "T5")(dense(cfg.d_ff, "wi", dt, use_bias=False, axes=("embed", "mlp"))(x))
        return dense(cfg.d_model, "wo", dt, use_bias=False, axes=("mlp", "embed"))(h)


class T5DenseGatedActDense(nn.Module):
    """T5 v1.1's FFN: wo(act(wi_0 x) * wi_1 x)."""

    config: T5EncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dt = self.config, jnp.dtype(self.config.dtype)
        column = {"use_bias": False, "axes": ("embed", "mlp")}
        gate = activation(cfg.dense_act_fn, "T5")(dense(cfg.d_ff, "wi_0", dt, **column)(x))
        up = dense(cfg.d_ff, "wi_1", dt, **column)(x)
        return dense(cfg.d_model, "wo", dt, use_bias=False, axes=("mlp", "embed"))(gate * up)


class T5LayerFF(nn.Module):
    config: T5EncoderConfig

    @nn.compact
    def __call__(self, x):
        h = RMSNorm(self.config.layer_norm_epsilon, name="layer_norm")(x)
        ffn = T5DenseGatedActDense if self.config.is_gated_act else T5DenseActDense
        return x + ffn(self.config, name="DenseReluDense")(h)


class T5LayerList(nn.Module):
    """transformers' `T5Block.layer` ModuleList: index 0 self-attention, index 1 feed-forward."""

    config: T5EncoderConfig

    @nn.compact
    def __call__(self, x, position_bias, mask):
        x = T5LayerSelfAttention(self.config, name="0")(x, position_bias, mask)
        return T5LayerFF(self.config, name="1")(x)


class T5Block(nn.Module):
    """One encoder block; scanned: (carry, position_bias, mask) -> (carry, None)."""

    config: T5EncoderConfig

    @nn.compact
    def __call__(self, x, position_bias, mask):
        return T5LayerList(self.config, name="layer")(x, position_bias, mask), None


class T5Encoder(nn.Module):
    config: T5EncoderConfig

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,  # [B, T] int token ids
        attention_mask: jax.Array | None = None,  # [B, T] 1 = token, 0 = padding; FLUX / SD3 pass None
    ) -> jax.Array:  # [B, T, d_model]
        cfg, dt = self.config, jnp.dtype(self.config.dtype)
        check_input_ids(input_ids, attention_mask, None, "T5Encoder")
        t = input_ids.shape[1]
        x = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dt, param_dtype=jnp.float32,
                     embedding_init=declare(nn.linear.default_embed_init, ("vocab", "embed")), name="shared")(input_ids)
        buckets = relative_position_buckets(t, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)
        # float32 bias, added to float32 logits whatever the compute dtype; [buckets, heads], a few KB: replicated.
        bias = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads, dtype=jnp.float32,
                        param_dtype=jnp.float32, embedding_init=declare(nn.linear.default_embed_init, (None, None)),
                        name="relative_attention_bias")(buckets)  # [T, T, H]
        position_bias = jnp.transpose(bias, (2, 0, 1))[None]  # [1, H, T, T]
        scan = nn.scan(T5Block, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                       metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = scan(cfg, name="block")(x, position_bias, key_mask(attention_mask))
        return RMSNorm(cfg.layer_norm_epsilon, name="final_layer_norm")(x)


def forward(params, config: T5EncoderConfig, input_ids: jax.Array,
            attention_mask: jax.Array | None = None) -> jax.Array:
    """Pure forward -> last_hidden_state [B, T, d_model] (jit with `config` static)."""
    return T5Encoder(config).apply({"params": params}, jnp.asarray(input_ids),
                                   None if attention_mask is None else jnp.asarray(attention_mask))


def _boxed_init(config: T5EncoderConfig, rng: jax.Array):
    return T5Encoder(config).init(rng, jnp.zeros((1, 2), jnp.int32))["params"]


def init_params(config: T5EncoderConfig, rng: jax.Array):
    """Randomly initialised float32 parameters (shapes do not depend on the dummy sequence)."""
    return sharding.unboxed(_boxed_init(config, rng))


def abstract_params(config: T5EncoderConfig):
    """ShapeDtypeStruct tree of the parameters, without allocating them."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def logical_axes(config: T5EncoderConfig):
    """The logical axes every parameter declares, as a tree of tuples like the parameters' (for
    `jaxdit.sharding.param_specs`): q/k/v and the FFN input column-parallel, o and wo row-parallel, the
    model width over `fsdp`, so a T5-XXL (19 GB in float32) is split, never replicated."""
    return sharding.declared_axes(jax.eval_shape(lambda: _boxed_init(config, jax.random.key(0))))
