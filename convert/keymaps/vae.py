"""The 16-channel autoencoder in the LDM / BFL layout -> diffusers `AutoencoderKL` names, and its config.

The layout of BFL's `ae.safetensors` (unprefixed) and of the `first_stage_model.*` tensors of all-in-one
files (diffusers `convert_ldm_vae_checkpoint`):
- `{encoder,decoder}.{conv_in,conv_out}` keep their names, `norm_out` is `conv_norm_out`;
- `encoder.down.{i}.block.{j}` -> `encoder.down_blocks.{i}.resnets.{j}` (`nin_shortcut` -> `conv_shortcut`),
  `encoder.down.{i}.downsample.conv` -> `encoder.down_blocks.{i}.downsamplers.0.conv`;
- `decoder.up.{b}` is stored in reverse: it is `decoder.up_blocks.{n - 1 - b}` (and `upsample.conv` ->
  `upsamplers.0.conv`);
- `mid.block_{1,2}` -> `mid_block.resnets.{0,1}`; `mid.attn_1.{norm,q,k,v,proj_out}` ->
  `mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}`, whose 1x1 convolutions become linears.
"""

from __future__ import annotations

import re

import numpy as np

from jaxdit.io import CheckpointError
from jaxdit.vae import VAEConfig

PREFIXES = ("first_stage_model.", "vae.")  # all-in-one files; BFL's ae.safetensors has no prefix
MARKER = "encoder.conv_in.weight"  # present in every layout once the prefix is stripped

_BLOCK = re.compile(r"^(encoder|decoder)\.(down|up)\.(\d+)\.block\.(\d+)\.(.+)$")
_RESAMPLE = re.compile(r"^(encoder|decoder)\.(down|up)\.(\d+)\.(?:downsample|upsample)\.conv\.(weight|bias)$")
_MID_BLOCK = re.compile(r"^(encoder|decoder)\.mid\.block_([12])\.(.+)$")
_MID_ATTN = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$")
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TOP = re.compile(r"^(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)$")
_SAME = ("quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight", "post_quant_conv.bias")


def rename_original(key: str, tensor: np.ndarray, num_blocks: int) -> list[tuple[str, np.ndarray]]:
    """One LDM / BFL tensor (prefix stripped) of a VAE with `num_blocks` resolutions -> its diffusers name."""
    if key in _SAME:
        return [(key, tensor)]
    if m := _TOP.match(key):
        part, module, leaf = m.groups()
        return [(f"{part}.{'conv_norm_out' if module == 'norm_out' else module}.{leaf}", tensor)]
    if m := _BLOCK.match(key):
        part, kind, i, j, rest = m.groups()
        index = int(i) if kind == "down" else num_blocks - 1 - int(i)
        return [(f"{part}.{kind}_blocks.{index}.resnets.{j}.{rest.replace('nin_shortcut', 'conv_shortcut')}",
                 tensor)]
    if m := _RESAMPLE.match(key):
        part, kind, i, leaf = m.groups()
        index = int(i) if kind == "down" else num_blocks - 1 - int(i)
        return [(f"{part}.{kind}_blocks.{index}.{kind}samplers.0.conv.{leaf}", tensor)]
    if m := _MID_BLOCK.match(key):
        part, n, rest = m.groups()
        return [(f"{part}.mid_block.resnets.{int(n) - 1}.{rest}", tensor)]
    if m := _MID_ATTN.match(key):
        part, module, leaf = m.groups()
        if module != "norm" and leaf == "weight" and tensor.ndim > 2:  # a 1x1 convolution is a linear
            if tensor.shape[2:] != (1,) * (tensor.ndim - 2):
                raise CheckpointError(f"tensor {key!r}: attention weight of shape {tuple(tensor.shape)} "
                                      "is not a 1x1 convolution")
            tensor = tensor.reshape(tensor.shape[:2])
        return [(f"{part}.mid_block.attentions.0.{_ATTN[module]}.{leaf}", tensor)]
    raise CheckpointError(f"tensor {key!r} is not part of an LDM / BFL autoencoder")


def infer_config(source, prefix: str, base: VAEConfig) -> VAEConfig:
    """`base` with the fields the tensors under `prefix` determine (widths, depth, channels, optional
    convolutions and mid-block attention). The group-norm count and the latent normalisation are not in
    the weights: they stay `base`'s."""
    keys = {k[len(prefix):]: k for k in source.keys() if k.startswith(prefix)}

    def shape(k):
        if k not in keys:
            raise CheckpointError(f"{source.path}: the autoencoder under {prefix or 'no prefix'!r} lacks {k!r}")
        return source.shape(keys[k])

    levels = 1 + max((int(k.split(".")[2]) for k in keys if k.startswith("encoder.down.")), default=-1)
    blocks = {int(k.split(".")[4]) for k in keys if k.startswith("encoder.down.0.block.")}
    return base.replace(
        in_channels=shape("encoder.conv_in.weight")[1],
        out_channels=shape("decoder.conv_out.weight")[0],
        block_out_channels=tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(levels)),
        layers_per_block=len(blocks),
        latent_channels=shape("decoder.conv_in.weight")[1],
        use_quant_conv="quant_conv.weight" in keys,
        use_post_quant_conv="post_quant_conv.weight" in keys,
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in keys,
    )
