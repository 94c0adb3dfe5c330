"""The 16-channel AutoencoderKL of FLUX.1 and SD3 / SD3.5 (diffusers `AutoencoderKL`) in Flax linen.

Parameter paths mirror diffusers' module names (`encoder/down_blocks/0/resnets/1/conv1/kernel`,
`decoder/mid_block/attentions/0/to_q/kernel`, `decoder/conv_norm_out/scale`, ...), so a diffusers `vae/`
folder converts with the generic rule of `convert/tree.py` and no stacked blocks.

Images are [B, C, H, W] in [-1, 1] like diffusers; the modules run NHWC internally. Group-norm statistics,
the attention softmax and the returned moments / images are float32 whatever the compute dtype.

    config, params = jaxdit.convert.load_vae("FLUX.1-dev/vae")
    mean, logvar = encode(params, config, images)                 # [B, 16, H/8, W/8] each
    latents = normalize_latents(mean, config)                      # what the transformer sees
    images = decode(params, config, denormalize_latents(latents, config))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdit.attention import OutProjection, joint_attention, resolve_backend
from jaxdit.configs import check_field_types
from jaxdit.layers import dense

_DTYPES = ("float32", "bfloat16", "float16")
DIFFUSERS_CLASS = "AutoencoderKL"
NORM_EPS = 1e-6  # diffusers' Encoder / Decoder hard-code it for every group norm
# config.json fields that do not change the encoder/decoder computation.
_IGNORED_FIELDS = ("sample_size", "latents_mean", "latents_std")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """diffusers `AutoencoderKL` fields (same names and meaning) for the FLUX / SD3 family.

    Only `DownEncoderBlock2D` / `UpDecoderBlock2D` blocks and SiLU exist in these models, so the block
    types are validated rather than stored. `force_upcast` is recorded for pipelines (diffusers runs such
    a VAE in float32); `dtype` is the compute dtype here.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 16
    norm_num_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float | None = 0.1159
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True
    force_upcast: bool = True
    # Not architecture: how the program runs.
    dtype: str = "float32"
    # The mid-block attention is one head of width block_out_channels[-1] (512), beyond what flash
    # kernels take, so "auto" means the explicit float32-softmax path ("xla"), run over blocks of this
    # many query positions so the logits stay [B, chunk, H*W] (1 GiB per image at 2048^2 instead of 16).
    attention_backend: str = "auto"
    attention_query_chunk: int = 4096

    family = "vae"

    def __post_init__(self):
        def fail(msg):
            raise ValueError(f"VAEConfig.{msg}")

        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if self.dtype not in _DTYPES:
            fail(f"dtype={self.dtype!r}: expected one of {_DTYPES}")
        if not self.block_out_channels:
            fail("block_out_channels is empty")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            fail(f"block_out_channels={self.block_out_channels}: {bad} not divisible by "
                 f"norm_num_groups={self.norm_num_groups}")
        if self.layers_per_block < 1:
            fail(f"layers_per_block={self.layers_per_block}: must be at least 1")
        if self.scaling_factor == 0:
            fail("scaling_factor is 0")
        if self.attention_query_chunk < 1:
            fail(f"attention_query_chunk={self.attention_query_chunk}: must be positive")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each axis (8 for FLUX / SD3)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def replace(self, **changes) -> "VAEConfig":
        return dataclasses.replace(self, **changes)

    def to_diffusers(self) -> dict[str, Any]:
        """The `config.json` fields diffusers' `AutoencoderKL` takes."""
        n = len(self.block_out_channels)
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "force_upcast": self.force_upcast,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
            "mid_block_add_attention": self.mid_block_add_attention,
        }

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any], **overrides) -> "VAEConfig":
        """Build from a diffusers `vae/config.json` dict (unknown `_*` metadata keys ignored)."""
        check_field_types(cls, cfg)
        cfg = dict(cfg)
        n = len(cfg.get("block_out_channels", cls.block_out_channels))
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = list(cfg.pop(key, [want] * n))
            if types != [want] * n:
                raise ValueError(f"VAE config {key}={types}: only {n} x {want!r} is supported")
        act = cfg.pop("act_fn", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"VAE config act_fn={act!r}: only 'silu' is supported")
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in cfg.items() if k in known}
        unknown = sorted(k for k in cfg if k not in known and k not in _IGNORED_FIELDS and not k.startswith("_"))
        if unknown:
            raise ValueError(f"VAE config has fields this version does not know: {unknown}")
        fields.update(overrides)
        return cls(**fields)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return {"family": self.family, **d}


# The released VAEs (models.md section 5): the FLUX.1 `vae/` and the SD3 / SD3.5 `vae/` differ only in
# the latent normalisation.
FLUX_VAE = VAEConfig(scaling_factor=0.3611, shift_factor=0.1159)
SD3_VAE = VAEConfig(scaling_factor=1.5305, shift_factor=0.0609)


# --- building blocks ------------------------------------------------------------------------------

class GroupNorm(nn.Module):
    """torch `nn.GroupNorm` over the channel (last) axis: contiguous channel groups, biased variance,
    two-pass float32 statistics; `scale` / `bias` as torch's weight / bias. x: [B, ..., C]."""

    groups: int
    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        g = x.astype(jnp.float32).reshape(x.shape[0], -1, self.groups, c // self.groups)
        mean = g.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(g - mean).mean(axis=(1, 3), keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def _conv(features: int, name: str, dtype, kernel: int = 3, stride: int = 1, padding=None) -> nn.Conv:
    """torch `nn.Conv2d` (cross-correlation, symmetric `kernel // 2` padding unless given) on NHWC."""
    p = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding or ((p, p), (p, p)),
                   dtype=dtype, param_dtype=jnp.float32, name=name)


class ModuleList(nn.Module):
    """A diffusers `nn.ModuleList`: children named "0", "1", ..., one applied per call (so lists whose
    members interleave with other modules, like the mid block's, keep their own names)."""

    makers: tuple[Callable[..., nn.Module], ...]  # each takes `name=` and returns the child

    @nn.compact
    def __call__(self, x: jax.Array, index: int) -> jax.Array:
        return self.makers[index](name=str(index))(x)

    def all(self, x: jax.Array) -> jax.Array:
        for i in range(len(self.makers)):
            x = self(x, i)
        return x


class ResnetBlock(nn.Module):
    """diffusers `ResnetBlock2D` without a time embedding: norm-SiLU-conv twice plus the (1x1) shortcut."""

    features: int
    config: VAEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dt = self.config, jnp.dtype(self.config.dtype)
        h = nn.silu(GroupNorm(cfg.norm_num_groups, NORM_EPS, dt, name="norm1")(x))
        h = _conv(self.features, "conv1", dt)(h)
        h = nn.silu(GroupNorm(cfg.norm_num_groups, NORM_EPS, dt, name="norm2")(h))
        h = _conv(self.features, "conv2", dt)(h)
        if x.shape[-1] != self.features:
            x = _conv(self.features, "conv_shortcut", dt, kernel=1)(x)
        return x.astype(dt) + h


class Downsample(nn.Module):
    """diffusers `Downsample2D(padding=0)`: zero-pad one row/column at the bottom/right, 3x3 stride-2 conv."""

    features: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _conv(self.features, "conv", self.dtype, stride=2, padding=((0, 1), (0, 1)))(x)


class Upsample(nn.Module):
    """diffusers `Upsample2D`: nearest-neighbour 2x, then a 3x3 conv."""

    features: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.features, "conv", self.dtype)(x)


class SpatialAttention(nn.Module):
    """The mid block's `Attention` (from the deprecated attention block): group norm, one head over the
    H*W positions, output projection, residual; rescale_output_factor is 1."""

    config: VAEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dt = self.config, jnp.dtype(self.config.dtype)
        b, hgt, wid, c = x.shape
        h = GroupNorm(cfg.norm_num_groups, NORM_EPS, dt, name="group_norm")(x).reshape(b, hgt * wid, 1, c)
        q, k, v = (dense(c, name, dt, axes=None)(h) for name in ("to_q", "to_k", "to_v"))  # never sharded
        backend = "xla" if cfg.attention_backend == "auto" else resolve_backend(cfg.attention_backend, dt)
        out = _query_chunked(lambda q_: joint_attention(q_, k, v, None, backend), q, cfg.attention_query_chunk)
        out = OutProjection(c, dt, axes=None, name="to_out")(out.reshape(b, hgt * wid, c))
        return out.reshape(x.shape) + x.astype(dt)


def _query_chunked(attend: Callable[[jax.Array], jax.Array], q: jax.Array, chunk: int) -> jax.Array:
    """attend(q) [B, T, H, D] -> [B, T, H, D], one block of `chunk` queries at a time (rows of a softmax
    are independent, so this is exact); the last block is zero-padded and the padding dropped."""
    t = q.shape[1]
    if t <= chunk:
        return attend(q)
    n = -(-t // chunk)
    q = jnp.pad(q, ((0, 0), (0, n * chunk - t), (0, 0), (0, 0)))
    blocks = jnp.moveaxis(q.reshape(q.shape[0], n, chunk, *q.shape[2:]), 1, 0)
    out = jax.lax.map(attend, blocks)  # [n, B, chunk, H, D]
    return jnp.moveaxis(out, 0, 1).reshape(q.shape[0], n * chunk, *out.shape[3:])[:, :t]


class MidBlock(nn.Module):
    """diffusers `UNetMidBlock2D`: resnet, (attention), resnet at the lowest resolution."""

    config: VAEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        width = cfg.block_out_channels[-1]
        resnets = ModuleList((functools.partial(ResnetBlock, width, cfg),) * 2, name="resnets")
        x = resnets(x, 0)
        if cfg.mid_block_add_attention:
            x = ModuleList((functools.partial(SpatialAttention, cfg),), name="attentions")(x, 0)
        return resnets(x, 1)


class ResampleBlock(nn.Module):
    """diffusers `DownEncoderBlock2D` / `UpDecoderBlock2D`: resnets, then an optional 2x resample."""

    features: int
    num_resnets: int
    resample: str | None  # "down", "up" or None
    config: VAEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dt = self.config, jnp.dtype(self.config.dtype)
        x = ModuleList((functools.partial(ResnetBlock, self.features, cfg),) * self.num_resnets, name="resnets").all(x)
        if self.resample == "down":
            x = ModuleList((functools.partial(Downsample, self.features, dt),), name="downsamplers")(x, 0)
        elif self.resample == "up":
            x = ModuleList((functools.partial(Upsample, self.features, dt),), name="upsamplers")(x, 0)
        return x


def _head(x: jax.Array, features: int, cfg: VAEConfig) -> jax.Array:
    """conv_norm_out -> SiLU -> conv_out, shared by encoder and decoder (called inside their scope)."""
    dt = jnp.dtype(cfg.dtype)
    x = nn.silu(GroupNorm(cfg.norm_num_groups, NORM_EPS, dt, name="conv_norm_out")(x))
    return _conv(features, "conv_out", dt)(x)


class Encoder(nn.Module):
    """diffusers `Encoder` with double_z: [B, H, W, in] -> [B, H/f, W/f, 2 * latent] moments."""

    config: VAEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dt = self.config, jnp.dtype(self.config.dtype)
        chans = cfg.block_out_channels
        x = _conv(chans[0], "conv_in", dt)(x.astype(dt))
        blocks = tuple(functools.partial(ResampleBlock, c, cfg.layers_per_block,
                                         "down" if i < len(chans) - 1 else None, cfg)
                       for i, c in enumerate(chans))
        x = ModuleList(blocks, name="down_blocks").all(x)
        x = MidBlock(cfg, name="mid_block")(x)
        return _head(x, 2 * cfg.latent_channels, cfg)


class Decoder(nn.Module):
    """diffusers `Decoder`: [B, h, w, latent] -> [B, h*f, w*f, out] images."""

    config: VAEConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, dt = self.config, jnp.dtype(self.config.dtype)
        chans = cfg.block_out_channels[::-1]
        x = _conv(chans[0], "conv_in", dt)(z.astype(dt))
        x = MidBlock(cfg, name="mid_block")(x)
        blocks = tuple(functools.partial(ResampleBlock, c, cfg.layers_per_block + 1,
                                         "up" if i < len(chans) - 1 else None, cfg)
                       for i, c in enumerate(chans))
        x = ModuleList(blocks, name="up_blocks").all(x)
        return _head(x, cfg.out_channels, cfg)


class AutoencoderKL(nn.Module):
    """diffusers `AutoencoderKL` (no tiling or slicing). Methods take and return NHWC arrays."""

    config: VAEConfig

    def setup(self):
        cfg, dt = self.config, jnp.dtype(self.config.dtype)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.use_quant_conv:
            self.quant_conv = _conv(2 * cfg.latent_channels, None, dt, kernel=1)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = _conv(cfg.latent_channels, None, dt, kernel=1)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, H, W, in] -> (mean, logvar), each [B, H/f, W/f, latent] float32 (logvar clipped like diffusers)."""
        moments = self.encoder(x)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """[B, h, w, latent] -> [B, h*f, w*f, out] float32."""
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z.astype(jnp.dtype(self.config.dtype)))
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Encode to the mean and decode it (used to create every parameter at init)."""
        return self.decode(self.encode(x)[0])


# --- public functions ------------------------------------------------------------------------------

def _check(name: str, x, channels: int, multiple: int) -> None:
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} must be [B, {channels}, H, W], got {tuple(x.shape)}")
    h, w = x.shape[2:]
    if multiple > 1 and (h % multiple or w % multiple):
        raise ValueError(f"image size {h}x{w} is not divisible by the VAE's downsampling factor {multiple}; "
                         f"resize or crop to a multiple of {multiple} (e.g. {h - h % multiple or multiple}x"
                         f"{w - w % multiple or multiple})")


def _nhwc(x):
    return jnp.transpose(jnp.asarray(x), (0, 2, 3, 1))


def _nchw(x):
    return jnp.transpose(x, (0, 3, 1, 2))


@functools.partial(jax.jit, static_argnums=1)
def encode(params, config: VAEConfig, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images [B, in_channels, H, W] in [-1, 1] -> (mean, logvar), each [B, latent, H/f, W/f] float32.

    The moments of diffusers' `vae.encode(images).latent_dist` (`.mean`, `.logvar`); H and W must be
    multiples of `config.downsample_factor`.
    """
    _check("images", images, config.in_channels, config.downsample_factor)
    mean, logvar = AutoencoderKL(config).apply({"params": params}, _nhwc(images), method=AutoencoderKL.encode)
    return _nchw(mean), _nchw(logvar)


@functools.partial(jax.jit, static_argnums=1)
def decode(params, config: VAEConfig, latents: jax.Array) -> jax.Array:
    """VAE-space latents [B, latent, h, w] (already denormalised) -> images [B, out_channels, h*f, w*f]
    float32, like diffusers' `vae.decode(latents).sample` (not clipped to [-1, 1])."""
    _check("latents", latents, config.latent_channels, 1)
    out = AutoencoderKL(config).apply({"params": params}, _nhwc(latents), method=AutoencoderKL.decode)
    return _nchw(out)


@jax.jit
def sample(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """A draw from the posterior, `mean + exp(logvar / 2) * noise` (diffusers `latent_dist.sample()`)."""
    noise = jax.random.normal(key, mean.shape, jnp.float32)
    return mean + jnp.exp(0.5 * logvar) * noise


def normalize_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
    """VAE latents -> transformer latents: `(z - shift_factor) * scaling_factor` (FLUX / SD3 pipelines)."""
    return (z - (config.shift_factor or 0.0)) * config.scaling_factor


def denormalize_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
    """Transformer latents -> VAE latents: `z / scaling_factor + shift_factor`, before `decode`."""
    return z / config.scaling_factor + (config.shift_factor or 0.0)


def encode_mean_normalized(params, config: VAEConfig, images: jax.Array) -> jax.Array:
    """Images -> normalised latents from the posterior mean ("argmax" sampling): the Kontext / editing
    context latents of diffusers' `FluxKontextPipeline._encode_vae_image`. [B, C, H, W] -> [B, latent, h, w]."""
    return normalize_latents(encode(params, config, images)[0], config)


def init_params(config: VAEConfig, rng: jax.Array):
    """Randomly initialised parameters (float32)."""
    f = config.downsample_factor
    return AutoencoderKL(config).init(rng, jnp.zeros((1, f, f, config.in_channels)))["params"]


def abstract_params(config: VAEConfig):
    """ShapeDtypeStruct tree of the parameters, without allocating them."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
