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
