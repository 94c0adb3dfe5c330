"""PyTorch twins: diffusers models with small random configs, saved the way real checkpoints are."""

from __future__ import annotations

import copy

import numpy as np
import torch

from jaxdit.parity import randomize_weights


def flux_twin(config, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(**config.to_diffusers())
    return randomize_weights(model.eval(), seed)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def flux_inputs(config, batch: int, grid_h: int, grid_w: int, n_txt: int, seed: int = 0, n_ctx_grid=None):
    """Random inputs shared by both frameworks (numpy float32)."""
    from jaxdit import flux

    rng = np.random.default_rng(seed)
    n_img = grid_h * grid_w
    img_ids = flux.image_ids(grid_h, grid_w)
    hidden = rng.standard_normal((batch, n_img, config.in_channels), np.float32)
    n_ctx = 0
    if n_ctx_grid is not None:
        ctx = rng.standard_normal((batch, n_ctx_grid[0] * n_ctx_grid[1], config.in_channels), np.float32)
        hidden = np.concatenate([hidden, ctx], 1)
        img_ids = np.concatenate([img_ids, flux.image_ids(*n_ctx_grid, index=1)], 0)
        n_ctx = ctx.shape[1]
    return dict(
        hidden_states=hidden,
        encoder_hidden_states=rng.standard_normal((batch, n_txt, config.joint_attention_dim), np.float32),
        pooled_projections=rng.standard_normal((batch, config.pooled_projection_dim), np.float32),
        timestep=rng.uniform(0.05, 1.0, (batch,)).astype(np.float32),
        img_ids=img_ids,
        txt_ids=flux.text_ids(n_txt),
        guidance=np.full((batch,), 3.5, np.float32) if config.guidance_embeds else None,
    ), n_ctx


def torch_forward(model, inputs, dtype=torch.float32):
    """Run a diffusers twin on numpy inputs; another dtype runs on a copy, leaving `model` as it was."""
    if dtype != torch.float32:
        model = copy.deepcopy(model).to(dtype)
    t = {k: (None if v is None else torch.from_numpy(np.asarray(v))) for k, v in inputs.items()}
    with torch.no_grad():
        args = {k: (v.to(dtype) if v is not None and k not in ("img_ids", "txt_ids") else v) for k, v in t.items()}
        return model(**args, return_dict=False)[0].float().numpy()


def to_bfl(sd: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Write a diffusers FLUX state dict in the original BFL layout (fused qkv/linear1, final swap)."""
    out = {}
    renames = {
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear",
    }
    for k, v in sd.items():
        mod, leaf = k.rsplit(".", 1)
        if mod in renames:
            out[f"{renames[mod]}.{leaf}"] = v
    for i in range(cfg.num_layers):
        p, q = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for leaf in ("weight", "bias"):
            out[q + f"img_attn.qkv.{leaf}"] = torch.cat([sd[p + f"attn.to_{x}.{leaf}"] for x in "qkv"])
            out[q + f"txt_attn.qkv.{leaf}"] = torch.cat([sd[p + f"attn.add_{x}_proj.{leaf}"] for x in "qkv"])
            for a, b in [("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
                         ("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                         ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                         ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2")]:
                out[q + f"{b}.{leaf}"] = sd[p + f"{a}.{leaf}"]
        for a, b in [("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                     ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")]:
            out[q + f"{b}.scale"] = sd[p + f"attn.{a}.weight"]
    for i in range(cfg.num_single_layers):
        p, q = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for leaf in ("weight", "bias"):
            out[q + f"linear1.{leaf}"] = torch.cat(
                [sd[p + f"attn.to_{x}.{leaf}"] for x in "qkv"] + [sd[p + f"proj_mlp.{leaf}"]])
            out[q + f"linear2.{leaf}"] = sd[p + f"proj_out.{leaf}"]
            out[q + f"modulation.lin.{leaf}"] = sd[p + f"norm.linear.{leaf}"]
        out[q + "norm.query_norm.scale"] = sd[p + "attn.norm_q.weight"]
        out[q + "norm.key_norm.scale"] = sd[p + "attn.norm_k.weight"]
    for leaf in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{leaf}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = torch.cat([shift, scale])
    return {("model.diffusion_model." + k): v.contiguous() for k, v in out.items()}
