"""Model configurations: frozen dataclasses and the named presets.

A config holds architecture constants only; the compute dtype and attention backend are fields too so a
config fully determines the compiled program. Presets equal the official checkpoints' `config.json`
(diffusers layout), and `tiny-*` presets are small random-weight models for tests.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

_DTYPES = ("float32", "bfloat16", "float16")
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def _fits(value, hint) -> bool:
    """Whether a JSON value fits a field annotation (int, float, bool, str, None, unions, tuple[X, ...])."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    if isinstance(value, bool):  # a JSON true is no number
        return hint is bool
    return isinstance(value, (int, float) if hint is float else hint)


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if origin is tuple:
        return f"a list ({_type_name(typing.get_args(hint)[0])} each)"
    return _TYPE_NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def check_field_types(cls, fields: dict[str, Any]) -> None:
    """Refuse a value read from a config file whose type does not fit its dataclass field of `cls`
    (`"num_layers": "two"`), naming the field; names that are not fields are left to the caller."""
    hints = typing.get_type_hints(cls)
    for name, value in fields.items():
        if name in hints and not _fits(value, hints[name]):
            raise ValueError(f"field {name!r} is {value!r}, expected {_type_name(hints[name])}")


class _TransformerConfig:
    """What every transformer config derives from its fields."""

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class FluxConfig(_TransformerConfig):
    """FLUX.1 transformer (diffusers `FluxTransformer2DModel` fields, same names and meaning)."""

    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    patch_size: int = 1
    # Not architecture: how the program runs.
    dtype: str = "float32"  # compute dtype of activations and matmuls
    attention_backend: str = "auto"  # see jaxdit.attention.BACKENDS
    rope_theta: int = 10000

    family = "flux"

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"FluxConfig.dtype={self.dtype!r}: expected one of {_DTYPES}")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"FluxConfig.axes_dims_rope={self.axes_dims_rope} sums to {sum(self.axes_dims_rope)}, "
                f"but attention_head_dim={self.attention_head_dim}"
            )
        if any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"FluxConfig.axes_dims_rope={self.axes_dims_rope}: every axis must be even")
        if self.patch_size != 1:
            raise ValueError("FluxConfig.patch_size: FLUX.1 packs 2x2 patches outside the model; only 1 is valid")

    def to_diffusers(self) -> dict[str, Any]:
        """The `config.json` fields diffusers' `FluxTransformer2DModel` takes."""
        return {
            "patch_size": self.patch_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_layers": self.num_layers,
            "num_single_layers": self.num_single_layers,
            "attention_head_dim": self.attention_head_dim,
            "num_attention_heads": self.num_attention_heads,
            "joint_attention_dim": self.joint_attention_dim,
            "pooled_projection_dim": self.pooled_projection_dim,
            "guidance_embeds": self.guidance_embeds,
            "axes_dims_rope": list(self.axes_dims_rope),
        }

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any], **overrides) -> "FluxConfig":
        """Build from a diffusers `transformer/config.json` dict (unknown `_*` metadata keys ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in cfg.items() if k in known}
        unknown = sorted(k for k in cfg if k not in known and not k.startswith("_"))
        if unknown:
            raise ValueError(f"FLUX config has fields this version does not know: {unknown}")
        check_field_types(cls, fields)
        if "axes_dims_rope" in fields:
            fields["axes_dims_rope"] = tuple(fields["axes_dims_rope"])
        fields.update(overrides)
        return cls(**fields)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return {"family": self.family, **d}


@dataclasses.dataclass(frozen=True)
class SD3Config(_TransformerConfig):
    """SD3 / SD3.5 MMDiT (diffusers `SD3Transformer2DModel` fields, same names and meaning).

    `sample_size` only seeds diffusers' position table, which checkpoints carry; it is kept so the
    config round-trips. `dual_attention_layers` (MMDiT-X) is normalised to a sorted tuple.
    """

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int | None = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None  # None or "rms_norm"
    # Not architecture: how the program runs.
    dtype: str = "float32"
    attention_backend: str = "auto"

    family = "sd3"

    def __post_init__(self):
        def fail(msg):
            raise ValueError(f"SD3Config.{msg}")

        if self.dtype not in _DTYPES:
            fail(f"dtype={self.dtype!r}: expected one of {_DTYPES}")
        if self.qk_norm not in (None, "rms_norm"):
            fail(f"qk_norm={self.qk_norm!r}: SD3.x uses None or 'rms_norm'")
        # The text stream enters the blocks at the model width (diffusers: added_kv_proj_dim = inner_dim).
        if self.caption_projection_dim != self.inner_dim:
            fail(f"caption_projection_dim={self.caption_projection_dim} must equal num_attention_heads * "
                 f"attention_head_dim = {self.inner_dim}")
        dual = tuple(sorted({int(i) for i in self.dual_attention_layers}))
        if any(not 0 <= i < self.num_layers for i in dual):
            fail(f"dual_attention_layers={self.dual_attention_layers}: layers must lie in [0, {self.num_layers})")
        object.__setattr__(self, "dual_attention_layers", dual)

    def to_diffusers(self) -> dict[str, Any]:
        """The `config.json` fields diffusers' `SD3Transformer2DModel` takes."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("dtype", "attention_backend")}
        d["dual_attention_layers"] = list(self.dual_attention_layers)
        return d

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any], **overrides) -> "SD3Config":
        """Build from a diffusers `transformer/config.json` dict (unknown `_*` metadata keys ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in cfg if k not in known and not k.startswith("_"))
        if unknown:
            raise ValueError(f"SD3 config has fields this version does not know: {unknown}")
        fields = {k: v for k, v in cfg.items() if k in known}
        check_field_types(cls, {k: v for k, v in fields.items() if k != "dual_attention_layers" or v is not None})
        fields["dual_attention_layers"] = tuple(fields.get("dual_attention_layers") or ())
        return cls(**{**fields, **overrides})

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dual_attention_layers"] = list(self.dual_attention_layers)
        return {"family": self.family, **d}


_FLUX_DEV = FluxConfig(guidance_embeds=True)
_SD3_MEDIUM = SD3Config(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192)
_SD35_LARGE = SD3Config(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
                        qk_norm="rms_norm")
_TINY_SD3 = SD3Config(sample_size=16, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
                      num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
                      pooled_projection_dim=12, pos_embed_max_size=8)

_TINY_FLUX = FluxConfig(in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=True,
                        axes_dims_rope=(4, 6, 6))

PRESETS: dict[str, Any] = {
    "flux-dev": _FLUX_DEV,
    "flux-schnell": FluxConfig(guidance_embeds=False),
    # Kontext is the dev transformer unchanged; only token layout and ids differ.
    "flux-kontext-dev": _FLUX_DEV,
    "tiny-flux": _TINY_FLUX,
    "tiny-flux-schnell": _TINY_FLUX.replace(guidance_embeds=False),
    # The embedded toy-world model (jaxdit.toyworld): 32x32 RGB in pixel space, 64 tokens of 48 features.
    "toyworld": FluxConfig(
        in_channels=48,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    ),
    "sd3-medium": _SD3_MEDIUM,
    "sd3.5-medium": _SD3_MEDIUM.replace(pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                                        qk_norm="rms_norm"),
    "sd3.5-large": _SD35_LARGE,
    # Large-turbo is the timestep-distilled large: the transformer architecture is the same.
    "sd3.5-large-turbo": _SD35_LARGE,
    "tiny-sd3": _TINY_SD3,
    "tiny-sd3.5-large": _TINY_SD3.replace(qk_norm="rms_norm"),
    "tiny-sd3.5-medium": _TINY_SD3.replace(num_layers=3, dual_attention_layers=(0,), qk_norm="rms_norm"),
}


def get_config(name: str, **overrides):
    """A named preset, optionally with fields replaced (e.g. `dtype="bfloat16"`)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def config_from_json(d: dict[str, Any]):
    """Inverse of `Config.to_json`."""
    d = dict(d)
    family = d.pop("family", None)
    classes = {"flux": FluxConfig, "sd3": SD3Config}
    if family not in classes:
        raise ValueError(f"config family {family!r} unknown; expected one of {sorted(classes)}")
    cls = classes[family]
    check_field_types(cls, d)
    for k, v in d.items():
        if isinstance(v, list):
            d[k] = tuple(v)
    return cls(**d)


def dump_config(config, path) -> None:
    with open(path, "w") as f:
        json.dump(config.to_json(), f, indent=2, sort_keys=True)
