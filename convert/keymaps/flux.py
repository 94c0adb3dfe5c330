"""FLUX.1: original (BFL) single-file names -> diffusers names, and config inference from a state dict.

BFL fuses q/k/v (`img_attn.qkv`, rows ordered (K=3, H, D)), fuses the single block's q/k/v and MLP input
(`linear1`: [3*D + 4*D, D]), and orders the final modulation (shift, scale) where diffusers'
`AdaLayerNormContinuous` uses (scale, shift).
"""

from __future__ import annotations

import re

import numpy as np

from jaxdit.configs import FluxConfig
from jaxdit.io import CheckpointError

STACKS = ("transformer_blocks", "single_transformer_blocks")
DIFFUSERS_CLASS = "FluxTransformer2DModel"
PREFIXES = ("model.diffusion_model.",)

_RENAMES = [
    (r"time_in\.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    (r"time_in\.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    (r"vector_in\.in_layer", "time_text_embed.text_embedder.linear_1"),
    (r"vector_in\.out_layer", "time_text_embed.text_embedder.linear_2"),
    (r"guidance_in\.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    (r"guidance_in\.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    (r"txt_in", "context_embedder"),
    (r"img_in", "x_embedder"),
    (r"double_blocks\.(\d+)\.img_mod\.lin", r"transformer_blocks.\1.norm1.linear"),
    (r"double_blocks\.(\d+)\.txt_mod\.lin", r"transformer_blocks.\1.norm1_context.linear"),
    (r"double_blocks\.(\d+)\.img_attn\.norm\.query_norm\.scale", r"transformer_blocks.\1.attn.norm_q.weight"),
    (r"double_blocks\.(\d+)\.img_attn\.norm\.key_norm\.scale", r"transformer_blocks.\1.attn.norm_k.weight"),
    (r"double_blocks\.(\d+)\.txt_attn\.norm\.query_norm\.scale", r"transformer_blocks.\1.attn.norm_added_q.weight"),
    (r"double_blocks\.(\d+)\.txt_attn\.norm\.key_norm\.scale", r"transformer_blocks.\1.attn.norm_added_k.weight"),
    (r"double_blocks\.(\d+)\.img_attn\.proj", r"transformer_blocks.\1.attn.to_out.0"),
    (r"double_blocks\.(\d+)\.txt_attn\.proj", r"transformer_blocks.\1.attn.to_add_out"),
    (r"double_blocks\.(\d+)\.img_mlp\.0", r"transformer_blocks.\1.ff.net.0.proj"),
    (r"double_blocks\.(\d+)\.img_mlp\.2", r"transformer_blocks.\1.ff.net.2"),
    (r"double_blocks\.(\d+)\.txt_mlp\.0", r"transformer_blocks.\1.ff_context.net.0.proj"),
    (r"double_blocks\.(\d+)\.txt_mlp\.2", r"transformer_blocks.\1.ff_context.net.2"),
    (r"single_blocks\.(\d+)\.modulation\.lin", r"single_transformer_blocks.\1.norm.linear"),
    (r"single_blocks\.(\d+)\.norm\.query_norm\.scale", r"single_transformer_blocks.\1.attn.norm_q.weight"),
    (r"single_blocks\.(\d+)\.norm\.key_norm\.scale", r"single_transformer_blocks.\1.attn.norm_k.weight"),
    (r"single_blocks\.(\d+)\.linear2", r"single_transformer_blocks.\1.proj_out"),
    (r"final_layer\.linear", "proj_out"),
]
_RENAMES = [(re.compile(rf"^{a}(?P<leaf>\.weight|\.bias|)$"), b) for a, b in _RENAMES]
_QKV = re.compile(r"^double_blocks\.(\d+)\.(img|txt)_attn\.qkv\.(weight|bias)$")
_LINEAR1 = re.compile(r"^single_blocks\.(\d+)\.linear1\.(weight|bias)$")
_FINAL_MOD = re.compile(r"^final_layer\.adaLN_modulation\.1\.(weight|bias)$")


def is_original(keys) -> bool:
    return any(k.endswith("double_blocks.0.img_attn.norm.key_norm.scale") for k in keys)


def rename_original(key: str, tensor: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """One BFL tensor -> the diffusers tensors it holds."""
    for prefix in PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    if m := _QKV.match(key):
        i, stream, leaf = m.groups()
        names = ("to_q", "to_k", "to_v") if stream == "img" else ("add_q_proj", "add_k_proj", "add_v_proj")
        if tensor.shape[0] % 3:
            raise CheckpointError(f"tensor {key!r}: fused qkv with {tensor.shape[0]} rows is not divisible by 3")
        return [(f"transformer_blocks.{i}.attn.{n}.{leaf}", part) for n, part in zip(names, np.split(tensor, 3))]
    if m := _LINEAR1.match(key):
        i, leaf = m.groups()
        # [3*D + mlp]: D from the rows, with the MLP 4x wide: rows = 7*D.
        rows = tensor.shape[0]
        if rows % 7:
            raise CheckpointError(f"tensor {key!r}: linear1 has {rows} rows, expected 3*D + 4*D")
        d = rows // 7
        parts = np.split(tensor, [d, 2 * d, 3 * d])
        names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
        return [(f"single_transformer_blocks.{i}.{n}.{leaf}", p) for n, p in zip(names, parts)]
    if m := _FINAL_MOD.match(key):
        shift, scale = np.split(tensor, 2)
        return [(f"norm_out.linear.{m.group(1)}", np.concatenate([scale, shift]))]
    for pattern, repl in _RENAMES:
        if pattern.match(key):
            return [(pattern.sub(repl + r"\g<leaf>", key), tensor)]
    raise CheckpointError(f"tensor {key!r} is not part of an original FLUX checkpoint")


def infer_original_config(source) -> FluxConfig:
    """Read the architecture off an original-layout checkpoint's tensor names and shapes."""
    keys = {k[len(p):] if k.startswith(p) else k: k for k in source.keys() for p in PREFIXES + ("",)
            if k.startswith(p)}

    def shape(k):
        if k not in keys:
            raise CheckpointError(f"{source.path}: original FLUX checkpoint lacks {k!r}")
        return source.shape(keys[k])

    hidden, in_channels = shape("img_in.weight")
    head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    count = lambda prefix: len({int(k.split(".")[1]) for k in keys if k.startswith(prefix + ".")})  # noqa: E731
    axes = (16, 56, 56) if head_dim == 128 else None
    if axes is None:
        raise CheckpointError(f"{source.path}: head_dim {head_dim} is not FLUX.1's 128; RoPE axes cannot be "
                              "inferred from the weights. Pass config=... to load_transformer / convert "
                              "(jaxdit.convert), or convert the diffusers folder with its config.json.")
    out_channels = shape("final_layer.linear.weight")[0]
    return FluxConfig(
        in_channels=in_channels,
        out_channels=None if out_channels == in_channels else out_channels,
        num_layers=count("double_blocks"),
        num_single_layers=count("single_blocks"),
        attention_head_dim=head_dim,
        num_attention_heads=hidden // head_dim,
        joint_attention_dim=shape("txt_in.weight")[1],
        pooled_projection_dim=shape("vector_in.in_layer.weight")[1],
        guidance_embeds="guidance_in.in_layer.weight" in keys,
        axes_dims_rope=axes,
    )
