"""SD3 twins: diffusers `SD3Transformer2DModel` with small random configs, and the original SAI layout."""

from __future__ import annotations

import copy

import numpy as np
import torch

from jaxdit.parity import randomize_weights


def sd3_twin(config, seed: int = 0):
    from diffusers import SD3Transformer2DModel

    return randomize_weights(SD3Transformer2DModel(**config.to_diffusers()).eval(), seed)


def sd3_inputs(config, batch: int, height: int, width: int, n_txt: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs shared by both frameworks (numpy float32); timestep = sigma * 1000 as pipelines pass it."""
    rng = np.random.default_rng(seed)
    return dict(
        hidden_states=rng.standard_normal((batch, config.in_channels, height, width), np.float32),
        encoder_hidden_states=rng.standard_normal((batch, n_txt, config.joint_attention_dim), np.float32),
        pooled_projections=rng.standard_normal((batch, config.pooled_projection_dim), np.float32),
        timestep=rng.uniform(20.0, 1000.0, (batch,)).astype(np.float32),
    )


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2)
    return torch.cat([b, a])


def to_sai(sd: dict[str, torch.Tensor], config, prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    """Write a diffusers SD3 state dict in the original SAI (`mmditx.py`) layout.

    Written independently of `jaxdit.convert.keymaps.sd3`: fused q/k/v, and (shift, scale) halves in the final
    layer and in the last block's context modulation, where diffusers has (scale, shift).
    """
    out = {"pos_embed": sd["pos_embed.pos_embed"]}
    top = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
           "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
           "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
           "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
           "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear"}
    last = config.num_layers - 1
    for leaf in ("weight", "bias"):
        for a, b in top.items():
            out[f"{b}.{leaf}"] = sd[f"{a}.{leaf}"]
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = _swap_halves(sd[f"norm_out.linear.{leaf}"])
        for i in range(config.num_layers):
            p, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
            out[x + f"attn.qkv.{leaf}"] = torch.cat([sd[p + f"attn.to_{n}.{leaf}"] for n in "qkv"])
            out[c + f"attn.qkv.{leaf}"] = torch.cat([sd[p + f"attn.add_{n}_proj.{leaf}"] for n in "qkv"])
            pairs = [("attn.to_out.0", x + "attn.proj"), ("norm1.linear", x + "adaLN_modulation.1"),
                     ("ff.net.0.proj", x + "mlp.fc1"), ("ff.net.2", x + "mlp.fc2")]
            if i != last:
                pairs += [("attn.to_add_out", c + "attn.proj"), ("norm1_context.linear", c + "adaLN_modulation.1"),
                          ("ff_context.net.0.proj", c + "mlp.fc1"), ("ff_context.net.2", c + "mlp.fc2")]
            else:
                out[c + f"adaLN_modulation.1.{leaf}"] = _swap_halves(sd[p + f"norm1_context.linear.{leaf}"])
            if i in config.dual_attention_layers:
                out[x + f"attn2.qkv.{leaf}"] = torch.cat([sd[p + f"attn2.to_{n}.{leaf}"] for n in "qkv"])
                pairs.append(("attn2.to_out.0", x + "attn2.proj"))
            for a, b in pairs:
                out[f"{b}.{leaf}"] = sd[p + f"{a}.{leaf}"]
    if config.qk_norm is not None:
        for i in range(config.num_layers):
            p, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
            pairs = [("attn.norm_q", x + "attn.ln_q"), ("attn.norm_k", x + "attn.ln_k"),
                     ("attn.norm_added_q", c + "attn.ln_q"), ("attn.norm_added_k", c + "attn.ln_k")]
            if i in config.dual_attention_layers:
                pairs += [("attn2.norm_q", x + "attn2.ln_q"), ("attn2.norm_k", x + "attn2.ln_k")]
            for a, b in pairs:
                out[f"{b}.weight"] = sd[p + f"{a}.weight"]
    return {prefix + k: v.contiguous() for k, v in out.items()}


def torch_forward(model, inputs: dict[str, np.ndarray], dtype=torch.float32) -> np.ndarray:
    """Run a twin (a copy at `dtype`) the way the SD3 pipeline does: latents and text in `dtype`, the
    timestep left in float32."""
    if dtype != torch.float32:
        model = copy.deepcopy(model).to(dtype)
    args = {k: torch.from_numpy(v) if k == "timestep" else torch.from_numpy(v).to(dtype) for k, v in inputs.items()}
    with torch.no_grad():
        return model(**args, return_dict=False)[0].float().numpy()
