"""CLIP text transformer (CLIP-L and OpenCLIP bigG) as Flax linen modules applied functionally.

Matches transformers `CLIPTextModel` (FLUX: `pooler_output`) and `CLIPTextModelWithProjection` (SD3:
`hidden_states[-2]` and the projected `text_embeds`). Parameter paths mirror the transformers names with
the `text_model.` and `encoder.` prefixes dropped, so the layer list is the first path component and is
stacked on a leading layer axis under `nn.scan`:

    embeddings/token_embedding/embedding          [vocab, D]
    embeddings/position_embedding/embedding       [positions, D]
    layers/self_attn/{q,k,v,out}_proj/{kernel,bias}   [L, ...]
    layers/layer_norm{1,2}/{scale,bias}, layers/mlp/fc{1,2}/{kernel,bias}
    final_layer_norm/{scale,bias}
    text_projection/kernel                        [D, projection_dim]   (WithProjection only)

    out = forward(params, config, input_ids)      # CLIPTextOutput
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdit import sharding
from jaxdit.configs import check_field_types
from jaxdit.layers import declare, dense
from jaxdit.text.common import LayerNorm, activation, check_input_ids, key_mask, self_attention

_DTYPES = ("float32", "bfloat16", "float16")
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
    """transformers `CLIPTextConfig` fields that define the text transformer (same names and meaning).

    `projection_dim` is None for `CLIPTextModel` and the width of `text_projection` for
    `CLIPTextModelWithProjection` (transformers configs carry a projection_dim either way).
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # 2 is the pre-#24773 openai value that selects pooling at argmax(input_ids) (see `pooled_positions`).
    eos_token_id: int = 2
    projection_dim: int | None = None
    # Not architecture: how the program runs.
    dtype: str = "float32"  # compute dtype of activations and matmuls

    family = "clip"

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"ClipTextConfig.dtype={self.dtype!r}: expected one of {_DTYPES}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"ClipTextConfig: hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        activation(self.hidden_act, "ClipTextConfig.hidden_act")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def with_projection(self) -> bool:
        return self.projection_dim is not None

    def replace(self, **changes) -> "ClipTextConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_transformers(cls, cfg: dict[str, Any], with_projection: bool, **overrides) -> "ClipTextConfig":
        """From a transformers `config.json` dict (a `CLIPConfig` with a `text_config` is accepted too).

        Sizes must be present; the rest falls back to transformers' `CLIPTextConfig` defaults.
        """
        cfg = cfg.get("text_config", cfg)
        missing = [k for k in _REQUIRED if k not in cfg]
        if missing:
            raise ValueError(f"CLIP text config lacks {missing}")
        fields = {f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name not in ("projection_dim", "dtype")
                  and f.name in cfg}
        check_field_types(cls, fields)
        fields.setdefault("eos_token_id", 49407)  # transformers 5's default (4.x defaulted to the legacy 2)
        if with_projection:
            if "projection_dim" not in cfg:
                raise ValueError("a CLIPTextModelWithProjection config needs projection_dim")
            fields["projection_dim"] = cfg["projection_dim"]
            check_field_types(cls, {"projection_dim": fields["projection_dim"]})
        fields.update(overrides)
        return cls(**fields)

    def to_json(self) -> dict[str, Any]:
        return {"family": self.family, **dataclasses.asdict(self)}


# The encoders of the published pipelines, for shapes and sharding plans without weights (loading always
# reads the folder's config.json). With the published tokenizers both eos conventions pool the same token.
CLIP_L = ClipTextConfig()
CLIP_L_PROJECTION = ClipTextConfig(projection_dim=768)  # SD3 text_encoder
CLIP_G = ClipTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                        hidden_act="gelu", projection_dim=1280)


class CLIPTextOutput(NamedTuple):
    last_hidden_state: jax.Array  # [B, T, D] after final_layer_norm
    hidden_states: jax.Array  # [L + 1, B, T, D] embeddings, then each layer's output (no final LN), as
    #                           transformers' `hidden_states` tuple: [-2] is SD3's penultimate state
    pooler_output: jax.Array  # [B, D] final-LN state at the EOS position
    text_embeds: jax.Array | None  # [B, projection_dim] text_projection(pooler_output); WithProjection only


class CLIPAttention(nn.Module):
    config: ClipTextConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        cfg, dt = self.config, jnp.dtype(self.config.dtype)
        b, t, d = x.shape

        def heads(name):
            y = dense(d, name, dt, axes=("embed", "heads"))(x)  # column-parallel
            return y.reshape(b, t, cfg.num_attention_heads, cfg.head_dim)

        out = self_attention(heads("q_proj"), heads("k_proj"), heads("v_proj"), cfg.head_dim ** -0.5, mask=mask)
        return dense(d, "out_proj", dt, axes=("heads", "embed"))(out.reshape(b, t, d))


class CLIPMLP(nn.Module):
    config: ClipTextConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dt = self.config, jnp.dtype(self.config.dtype)
        h = activation(cfg.hidden_act, "CLIP")(dense(cfg.intermediate_size, "fc1", dt, axes=("embed", "mlp"))(x))
        return dense(cfg.hidden_size, "fc2", dt, axes=("mlp", "embed"))(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block; scanned: (carry, mask) -> (carry, this layer's output for `hidden_states`)."""

    config: ClipTextConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array):
        cfg = self.config
        x = x + CLIPAttention(cfg, name="self_attn")(LayerNorm(cfg.layer_norm_eps, name="layer_norm1")(x), mask)
        x = x + CLIPMLP(cfg, name="mlp")(LayerNorm(cfg.layer_norm_eps, name="layer_norm2")(x))
        return x, x


class CLIPTextEmbeddings(nn.Module):
    config: ClipTextConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg, dt = self.config, jnp.dtype(self.config.dtype)
        table = declare(nn.linear.default_embed_init, ("vocab", "embed"))
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=jnp.float32, embedding_init=table,
                          name="token_embedding")(input_ids)
        positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dt, param_dtype=jnp.float32,
                             embedding_init=table, name="position_embedding")(jnp.arange(input_ids.shape[1]))
        return tokens + positions[None]


def pooled_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Index of the pooled (EOS) token per sequence, exactly as transformers picks it.

    Legacy configs (`eos_token_id == 2`) take argmax(input_ids): the first <|endoftext|>, the largest id.
    Otherwise the first position equal to eos_token_id (padding may repeat it; argmax returns the first).
    """
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPTextTransformer(nn.Module):
    config: ClipTextConfig

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,  # [B, T] int token ids, T <= max_position_embeddings
        attention_mask: jax.Array | None = None,  # [B, T] 1 = token, 0 = padding; pipelines pass None
    ) -> CLIPTextOutput:
        cfg = self.config
        check_input_ids(input_ids, attention_mask, cfg.max_position_embeddings, "CLIPTextTransformer")
        t = input_ids.shape[1]
        embedded = CLIPTextEmbeddings(cfg, name="embeddings")(input_ids)
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None]  # causal, always (transformers does too)
        padding = key_mask(attention_mask)
        if padding is not None:
            mask = mask & padding
        scan = nn.scan(CLIPEncoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(nn.broadcast,), length=cfg.num_hidden_layers,
                       metadata_params={nn.PARTITION_NAME: "layers"})
        x, per_layer = scan(cfg, name="layers")(embedded, mask)
        # Under jit, unused hidden states are dead code and never materialised.
        hidden_states = jnp.concatenate([embedded[None], per_layer], axis=0)
        last = LayerNorm(cfg.layer_norm_eps, name="final_layer_norm")(x)
        pooled = last[jnp.arange(last.shape[0]), pooled_positions(input_ids, cfg.eos_token_id)]
        text_embeds = None
        if cfg.with_projection:
            text_embeds = dense(cfg.projection_dim, "text_projection", jnp.dtype(cfg.dtype), use_bias=False,
                                axes=("embed", None))(pooled)
        return CLIPTextOutput(last, hidden_states, pooled, text_embeds)


def forward(params, config: ClipTextConfig, input_ids: jax.Array,
            attention_mask: jax.Array | None = None) -> CLIPTextOutput:
    """Pure forward (jit with `config` static)."""
    return CLIPTextTransformer(config).apply({"params": params}, jnp.asarray(input_ids),
                                             None if attention_mask is None else jnp.asarray(attention_mask))


def _boxed_init(config: ClipTextConfig, rng: jax.Array):
    return CLIPTextTransformer(config).init(rng, jnp.zeros((1, 2), jnp.int32))["params"]


def init_params(config: ClipTextConfig, rng: jax.Array):
    """Randomly initialised float32 parameters (shapes do not depend on the dummy sequence)."""
    return sharding.unboxed(_boxed_init(config, rng))


def abstract_params(config: ClipTextConfig):
    """ShapeDtypeStruct tree of the parameters, without allocating them."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def logical_axes(config: ClipTextConfig):
    """The logical axes every parameter declares, as a tree of tuples like the parameters' (for
    `jaxdit.sharding.param_specs`): the Megatron layout, as for T5."""
    return sharding.declared_axes(jax.eval_shape(lambda: _boxed_init(config, jax.random.key(0))))
