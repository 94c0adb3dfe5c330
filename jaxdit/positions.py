"""Every hook position of a model, with the shape it has for a given image size and text length.

    rows = hook_positions(get_config("flux-dev"), height=1024, width=1024, text_tokens=512)
    print(table(rows))   # double.*.img.resid_pre  [1, 4096, 3072]  float32  19 layers ...

The shapes come from tracing the model's own forward with every position captured (`jax.eval_shape`:
nothing is computed or allocated), through the same `POSITIONS` table and capture plan that validate and
serve a `Hooks` value, so what is printed is what a capture returns.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import jax
import jax.numpy as jnp

from jaxdit import hooks as hk

VAE_FACTOR = 8  # pixels per latent cell (FLUX.1 and SD3 VAEs)
DEFAULT_TEXT_TOKENS = {"flux": 512, "sd3": 333}  # T5 512 (FLUX.1-dev); SD3: CLIP 77 + T5 256


@dataclasses.dataclass(frozen=True)
class Row:
    pattern: str  # "stack.*.stream.site", or one layer's name where layers differ
    shape: tuple[int, ...]
    dtype: str
    layers: tuple[int, ...]
    total: int  # layers in the stack


def _module(config):
    from jaxdit import flux, sd3

    return {"flux": flux, "sd3": sd3}[config.family]


def _inputs(config, height: int, width: int, text_tokens: int, context: bool, batch: int):
    """Abstract forward inputs (after `params`, before `hooks`) and the call's keyword arguments."""
    if height % 16 or width % 16:
        raise ValueError(f"height and width must be multiples of 16 pixels, got {height}x{width}")
    s = jax.ShapeDtypeStruct
    if config.family == "flux":
        n_img = (height // 16) * (width // 16)
        n = n_img * (2 if context else 1)
        guidance = s((batch,), jnp.float32) if config.guidance_embeds else None
        args = (s((batch, n, config.in_channels), jnp.float32), s((batch, text_tokens, config.joint_attention_dim),
                jnp.float32), s((batch, config.pooled_projection_dim), jnp.float32), s((batch,), jnp.float32),
                s((n, 3), jnp.float32), s((text_tokens, 3), jnp.float32), guidance)
        return args, {"num_context_tokens": n - n_img}
    if context:
        raise ValueError("context tokens (Kontext) exist only for FLUX models")
    h, w = height // VAE_FACTOR, width // VAE_FACTOR
    args = (s((batch, config.in_channels, h, w), jnp.float32),
            s((batch, text_tokens, config.joint_attention_dim), jnp.float32),
            s((batch, config.pooled_projection_dim), jnp.float32), s((batch,), jnp.float32))
    return args, {}


def hook_positions(config, height: int = 1024, width: int = 1024, text_tokens: int | None = None,
                   context: bool = False, batch: int = 1) -> list[Row]:
    """One row per (stack, stream, site) whose shape is the same at every layer, else one per layer."""
    mod = _module(config)
    text_tokens = text_tokens or DEFAULT_TEXT_TOKENS[config.family]
    args, kwargs = _inputs(config, height, width, text_tokens, context, batch)
    names = tuple(f"{stack}.*.{stream}.{site}" for stack, streams in mod.POSITIONS.items()
                  for stream, sites in streams.items() for site in sites)
    hooks = hk.Hooks(capture=names)

    def captures(params, *xs):
        return mod.forward(params, config, *xs, hooks=hooks, **kwargs)[1]

    shapes = jax.eval_shape(captures, mod.abstract_params(config), *args)
    groups = defaultdict(list)
    for name, value in shapes.items():
        p = hk.Position.parse(name)
        groups[(p.stack, p.stream, p.site)].append((p.layer, tuple(value.shape), str(value.dtype)))
    total = mod.num_layers(config)
    rows = []
    for name in names:  # the table's order; positions a model never reaches have no row
        stack, _, stream, site = name.split(".")
        items = groups.get((stack, stream, site))
        if not items:
            continue
        kinds = {(shape, dtype) for _, shape, dtype in items}
        if len(kinds) == 1:
            (shape, dtype), = kinds
            layers = tuple(sorted(l for l, _, _ in items))
            where = "*" if len(layers) > 1 or (len(layers) == total[stack] > 1) else str(layers[0])
            rows.append(Row(f"{stack}.{where}.{stream}.{site}", shape, dtype, layers, total[stack]))
        else:
            rows += [Row(f"{stack}.{layer}.{stream}.{site}", shape, dtype, (layer,), total[stack])
                     for layer, shape, dtype in sorted(items)]
    return rows


def table(rows: list[Row]) -> str:
    width = max(len(r.pattern) for r in rows)
    shape_width = max(len(str(list(r.shape))) for r in rows)
    lines = []
    for r in rows:
        which = f"all {r.total} layers" if len(r.layers) == r.total else "layers " + ", ".join(map(str, r.layers))
        lines.append(f"{r.pattern:<{width}}  {str(list(r.shape)):<{shape_width}}  {r.dtype:<8}  {which}")
    return "\n".join(lines)
