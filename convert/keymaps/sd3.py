"""SD3 / SD3.5: diffusers and original (SAI) names -> the segmented parameter tree, and config inference.

Both renames depend on the architecture, so they are built from the config:
- `diffusers_renamer`: `transformer_blocks.{i}.*` -> slot i - s of the segment starting at s
  (`jaxdit.sd3.segments`); every other name is already a parameter path.
- `original_renamer`: SAI name -> diffusers names (`rename_original`), then the same relayout. SAI fuses
  q/k/v (`attn.qkv`, rows ordered (K=3, H, D)), and orders the final modulation and the last (context
  pre-only) block's context modulation (shift, scale) where diffusers' `AdaLayerNormContinuous` uses
  (scale, shift); which block is last needs the depth, hence the config.
Original files may hold other components beside `model.diffusion_model.` (`first_stage_model.*` VAE,
`text_encoders.*`); the loader sets those tensors aside before renaming (`keymaps.components`).
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

from jaxdit import sd3
from jaxdit.configs import SD3Config
from jaxdit.io import CheckpointError

DIFFUSERS_CLASS = "SD3Transformer2DModel"
PREFIXES = ("model.diffusion_model.",)
# SAI's MMDiT fixes the head size (mmditx.py: hidden = 64 * depth, heads = depth); without qk-norm weights
# nothing else in a file says how the width splits into heads.
SAI_HEAD_DIM = 64

Rename = Callable[[str, np.ndarray], list[tuple[str, np.ndarray]]]

_TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # swapped
}
# Per stream of a joint block: SAI module -> diffusers module. `qkv` entries are split in thirds.
_BLOCK = {
    "x_block": {
        "attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "attn.ln_q": "attn.norm_q", "attn.ln_k": "attn.norm_k", "attn.proj": "attn.to_out.0",
        "attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
        "attn2.ln_q": "attn2.norm_q", "attn2.ln_k": "attn2.norm_k", "attn2.proj": "attn2.to_out.0",
        "adaLN_modulation.1": "norm1.linear", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
    },
    "context_block": {
        "attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        "attn.ln_q": "attn.norm_added_q", "attn.ln_k": "attn.norm_added_k", "attn.proj": "attn.to_add_out",
        "adaLN_modulation.1": "norm1_context.linear",  # swapped on the last block
        "mlp.fc1": "ff_context.net.0.proj", "mlp.fc2": "ff_context.net.2",
    },
}
_JOINT = re.compile(r"^joint_blocks\.(\d+)\.(x_block|context_block)\.(.+)\.(weight|bias)$")
_DIFFUSERS_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")


def is_original(keys) -> bool:
    return any(k.endswith("joint_blocks.0.x_block.attn.qkv.weight") for k in keys)


def _swap_halves(t: np.ndarray) -> np.ndarray:
    """(shift, scale) -> (scale, shift) along the output axis."""
    shift, scale = np.split(t, 2)
    return np.concatenate([scale, shift])


def rename_original(key: str, tensor: np.ndarray, num_layers: int) -> list[tuple[str, np.ndarray]]:
    """One SAI tensor of a `num_layers`-block model -> the diffusers tensors it holds."""
    for prefix in PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key == "pos_embed":
        return [("pos_embed.pos_embed", tensor)]
    if m := _JOINT.match(key):
        i, stream, module, leaf = m.groups()
        target = _BLOCK[stream].get(module)
        if target is None:
            raise CheckpointError(f"tensor {key!r} is not part of an original SD3 checkpoint")
        if isinstance(target, tuple):
            if tensor.shape[0] % 3:
                raise CheckpointError(f"tensor {key!r}: fused qkv with {tensor.shape[0]} rows is not divisible by 3")
            return [(f"transformer_blocks.{i}.{t}.{leaf}", part) for t, part in zip(target, np.split(tensor, 3))]
        if target == "norm1_context.linear" and int(i) == num_layers - 1:
            tensor = _swap_halves(tensor)
        return [(f"transformer_blocks.{i}.{target}.{leaf}", tensor)]
    module, _, leaf = key.rpartition(".")
    if module in _TOP and leaf in ("weight", "bias"):
        if module == "final_layer.adaLN_modulation.1":
            tensor = _swap_halves(tensor)
        return [(f"{_TOP[module]}.{leaf}", tensor)]
    raise CheckpointError(f"tensor {key!r} is not part of an original SD3 checkpoint")


def diffusers_renamer(config: SD3Config) -> Rename:
    """diffusers names -> names in the segmented tree (`jaxdit.sd3` module docstring)."""
    where = {i: (sd3.segment_name(a), i - a) for a, b in sd3.segments(config) for i in range(a, b)}

    def rename(key: str, tensor: np.ndarray) -> list[tuple[str, np.ndarray]]:
        m = _DIFFUSERS_BLOCK.match(key)
        if m is None:
            return [(key, tensor)]
        layer, rest = int(m[1]), m[2]
        if layer not in where:
            raise CheckpointError(f"unexpected tensor {key!r}: the model has {config.num_layers} transformer blocks")
        stack, slot = where[layer]
        return [(f"{stack}.{slot}.{rest}", tensor)]

    return rename


def original_renamer(config: SD3Config) -> Rename:
    relayout = diffusers_renamer(config)

    def rename(key: str, tensor: np.ndarray) -> list[tuple[str, np.ndarray]]:
        return [out for k, t in rename_original(key, tensor, config.num_layers) for out in relayout(k, t)]

    return rename


def infer_original_config(source) -> SD3Config:
    """Read the architecture off an original-layout checkpoint's tensor names and shapes.

    The head size is that of the qk-norm weights (SD3.5). Without them (SD3) it cannot be read off the
    tensors: SAI's head size of 64 is taken when the width is 64 x depth, as in every SAI model, and any
    other width is refused rather than split into `depth` heads of a guessed size.
    """
    keys = {k[len(p):] if k.startswith(p) else k: k for k in source.keys() for p in PREFIXES + ("",)
            if k.startswith(p)}

    def shape(k):
        if k not in keys:
            raise CheckpointError(f"{source.path}: original SD3 checkpoint lacks {k!r}")
        return source.shape(keys[k])

    hidden, in_channels, patch, _ = shape("x_embedder.proj.weight")
    blocks = {int(k.split(".")[1]) for k in keys if k.startswith("joint_blocks.")}
    depth = max(blocks) + 1
    ln_q = "joint_blocks.0.x_block.attn.ln_q.weight"
    if ln_q in keys:
        head_dim = shape(ln_q)[0]
        if hidden % head_dim:
            raise CheckpointError(f"{source.path}: {ln_q} {shape(ln_q)} gives a head size of {head_dim}, which "
                                  f"does not divide the width {hidden} (x_embedder.proj.weight "
                                  f"{shape('x_embedder.proj.weight')})")
    elif hidden == SAI_HEAD_DIM * depth:
        head_dim = SAI_HEAD_DIM
    else:
        raise CheckpointError(
            f"{source.path}: no qk-norm weights to read the head size from, and the width {hidden} "
            f"(x_embedder.proj.weight {shape('x_embedder.proj.weight')}) is not {SAI_HEAD_DIM} x depth "
            f"{depth} = {SAI_HEAD_DIM * depth} as in SAI's models, so the heads are unknown; pass config= (an "
            "SD3Config with num_attention_heads and attention_head_dim) to load_transformer / convert, "
            "--config JSON to jaxdit convert, or convert the diffusers folder with its config.json")
    table = shape("pos_embed")[1]
    max_size = int(round(table ** 0.5))
    if max_size * max_size != table:
        raise CheckpointError(f"{source.path}: pos_embed has {table} positions, not a square grid")
    return SD3Config(
        patch_size=patch,
        in_channels=in_channels,
        num_layers=depth,
        attention_head_dim=head_dim,
        num_attention_heads=hidden // head_dim,
        joint_attention_dim=shape("context_embedder.weight")[1],
        caption_projection_dim=shape("context_embedder.weight")[0],
        pooled_projection_dim=shape("y_embedder.mlp.0.weight")[1],
        out_channels=shape("final_layer.linear.weight")[0] // (patch * patch),
        pos_embed_max_size=max_size,
        dual_attention_layers=tuple(sorted(i for i in blocks if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in keys)),
        qk_norm="rms_norm" if "joint_blocks.0.x_block.attn.ln_q.weight" in keys else None,
    )
