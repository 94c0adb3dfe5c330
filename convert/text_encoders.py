"""Text encoders from diffusers pipeline components (the tokenizers: `jaxdit.text.load_tokenizer`).

`load_text_encoder` reads a `text_encoder/`, `text_encoder_2/` or `text_encoder_3/` folder: `config.json`
(its `architectures` / `model_type` say CLIPTextModel, CLIPTextModelWithProjection or T5EncoderModel)
plus one `.safetensors` file or a sharded `*.safetensors.index.json`. Pickle-based weights are refused.
Tensor names are mapped onto jaxdit paths by dropping the prefixes above the stacked layer list; then
the generic `jaxdit.convert.tree.fill_params` rule applies (Linear weight -> kernel.T, 1-D weight -> scale).
Every missing tensor is reported with its checkpoint name; unexpected and mis-shaped ones with both.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

from jaxdit import sharding
from jaxdit.convert.tree import fill_params, flatten, to_key
from jaxdit.io import CheckpointError, TensorSource, refuse_pickle
from jaxdit.text import clip, t5

CLIP_ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")
T5_ARCHITECTURES = ("T5EncoderModel", "T5ForConditionalGeneration", "T5Model")  # the encoder of each

_T5_POSITION_BIAS = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How one checkpoint's tensor names map onto a model's parameter paths."""

    config: object
    abstract: object
    stacks: dict[str, int]
    to_jaxdit: Callable[[str], str | None]  # checkpoint name -> jaxdit dotted name, None = not a parameter
    to_checkpoint: Callable[[str], str]  # inverse, for messages


def _clip_layout(config: clip.ClipTextConfig, keys: list[str]) -> _Layout:
    # transformers 5 saves a bare CLIPTextModel without the `text_model.` prefix that v4 checkpoints
    # (every published diffusers text_encoder) carry; WithProjection always has it. Accept either.
    prefix = "text_model." if config.with_projection or any(k.startswith("text_model.") for k in keys) else ""

    def to_jaxdit(key: str) -> str | None:
        name = key.removeprefix(prefix) if key != "text_projection.weight" else key
        if name == "embeddings.position_ids":  # an index buffer older checkpoints persist
            return None
        m = re.fullmatch(r"embeddings\.(token|position)_embedding\.weight", name)
        if m:  # embedding tables stay [rows, width]: a leaf name the generic rule does not transpose
            return f"embeddings.{m[1]}_embedding.embedding"
        return name.removeprefix("encoder.") if name.startswith("encoder.layers.") else name

    def to_checkpoint(name: str) -> str:
        if name == "text_projection.weight":
            return name
        name = re.sub(r"\.embedding$", ".weight", name)
        return prefix + ("encoder." + name if name.startswith("layers.") else name)

    return _Layout(config, clip.abstract_params(config), {"layers": config.num_hidden_layers}, to_jaxdit,
                   to_checkpoint)


def _t5_layout(config: t5.T5EncoderConfig, keys: list[str]) -> _Layout:
    # The token table is tied: `shared.weight` and/or `encoder.embed_tokens.weight` hold the same tensor.
    has_shared = "shared.weight" in keys

    def to_jaxdit(key: str) -> str | None:
        if key.startswith(("decoder.", "lm_head.")):  # full T5 checkpoints: only the encoder is used
            return None
        if key == "shared.weight" or (key == "encoder.embed_tokens.weight" and not has_shared):
            return "shared.embedding"
        if key == "encoder.embed_tokens.weight":
            return None
        if key == _T5_POSITION_BIAS:  # owned by block 0, used by every block: kept outside the stack
            return "relative_attention_bias.embedding"
        return key.removeprefix("encoder.")

    def to_checkpoint(name: str) -> str:
        if name == "shared.embedding":
            return "shared.weight"
        if name == "relative_attention_bias.embedding":
            return _T5_POSITION_BIAS
        return "encoder." + name

    return _Layout(config, t5.abstract_params(config), {"block": config.num_layers}, to_jaxdit, to_checkpoint)


def _read_config(folder: Path) -> tuple[dict, Path]:
    if (folder / "model_index.json").is_file():
        raise CheckpointError(f"{folder}: this is a pipeline folder; pass its text_encoder/, text_encoder_2/ or "
                              "text_encoder_3/ component")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{folder}: a text encoder folder needs config.json")
    try:
        return json.loads(cfg_file.read_text()), cfg_file
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None


def _layout(raw: dict, keys: list[str], cfg_file: Path) -> _Layout:
    archs = raw.get("architectures") or []
    arch = archs[0] if archs else None
    model_type = raw.get("model_type")
    try:
        if arch in CLIP_ARCHITECTURES or (arch is None and model_type in ("clip_text_model", "clip")):
            # Without `architectures` the projection's presence decides between the two CLIP classes.
            projection = arch == "CLIPTextModelWithProjection" or (
                arch is None and "text_projection.weight" in keys)
            return _clip_layout(clip.ClipTextConfig.from_transformers(raw, projection), keys)
        if arch in T5_ARCHITECTURES or (arch is None and model_type == "t5"):
            return _t5_layout(t5.T5EncoderConfig.from_transformers(raw), keys)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None
    raise CheckpointError(f"{cfg_file}: text encoder {arch or model_type!r} is not supported (supported: "
                          f"{list(CLIP_ARCHITECTURES + T5_ARCHITECTURES)})")


def _progress(folder: Path, total: int):
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, silent in logs and CI (as the transformer loader).
    return lambda it: tqdm(it, desc=f"reading {folder.name}", total=total, unit="tensor", leave=False,
                           disable=None)


def read_text_encoder(folder, dtype=None):
    """(config, numpy params) from a diffusers text-encoder folder."""
    folder = Path(folder)
    refuse_pickle(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such directory (expected a diffusers text_encoder*/ folder)")
    raw, cfg_file = _read_config(folder)
    source = TensorSource(folder)
    keys = source.keys()
    layout = _layout(raw, keys, cfg_file)

    # Missing tensors are checked here, in checkpoint names; fill_params reports the rest (unexpected,
    # duplicated, mis-shaped tensors) naming the checkpoint key too.
    present = {layout.to_jaxdit(k) for k in keys}
    missing = []
    for path, leaf in flatten(layout.abstract).items():
        n = layout.stacks.get(path[0])
        for layer in (range(n) if n else [None]):
            name = to_key(path, layer, len(leaf.shape))
            if name not in present:
                missing.append(layout.to_checkpoint(name))
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise CheckpointError(f"missing tensors in {source.path}: {shown}")

    def rename(key, tensor):
        name = layout.to_jaxdit(key)
        return [] if name is None else [(name, tensor)]

    params = fill_params(source, layout.abstract, layout.stacks, rename,
                         dtype=None if dtype is None else jnp.dtype(dtype), progress=_progress(folder, len(keys)))
    return layout.config, params


def load_text_encoder(folder, dtype=None, mesh=None):
    """(config, params) of a CLIP or T5 text encoder from a diffusers `text_encoder*/` folder.

    dtype: cast the parameters (e.g. "bfloat16"); default keeps the checkpoint dtype. The compute dtype is
    `config.dtype` (float32 by default): `config.replace(dtype="bfloat16")` to run in bf16.
    mesh: put the parameters sharded on this mesh (the axes the model declares under `jaxdit.sharding.RULES`:
    T5-XXL is split, not replicated).
    """
    config, params = read_text_encoder(folder, dtype)
    if mesh is not None:
        model = clip if isinstance(config, clip.ClipTextConfig) else t5
        params = jax.device_put(params, sharding.param_shardings(params, mesh, model.logical_axes(config)))
    else:
        params = jax.tree_util.tree_map(jnp.asarray, params)
    return config, params
