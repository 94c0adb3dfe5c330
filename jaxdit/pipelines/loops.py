"""The denoising loops as compiled programs: one `jax.jit` each for FLUX / Kontext and SD3, over
`jaxdit.sampling.controlled_euler` (hooks at every step, a controller's state carried through the scan)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxdit import flux, sampling, sd3


@functools.partial(jax.jit, static_argnames=("config", "hooks_fn", "on_step", "geometry"))
def flux_sample(params, latents, embeds, pooled, guidance, sigmas, timesteps, img_ids, txt_ids, context, hooks,
                controller, *, config, hooks_fn, on_step, geometry):
    """The FLUX denoising loop as one program: [noise; context] tokens in, noise-token velocity out.

    A `controller` (e.g. UVR) carries its state through the loop: hooks from the state before each
    step, the state updated from that step's captures after it.
    """
    n_noise = latents.shape[1]
    n_ctx = 0 if context is None else context.shape[1]

    def velocity(x, t, i, step_hooks, aux):
        tokens = x if context is None else jnp.concatenate([x, context], axis=1)
        v, caps = flux.forward(params, config, tokens, embeds, pooled, jnp.full((x.shape[0],), t / 1000), img_ids,
                               txt_ids, guidance, step_hooks, n_ctx)
        return v[:, :n_noise], caps, aux

    return sampling.controlled_euler(velocity, latents, sigmas, timesteps, hooks_fn if hooks_fn is not None else hooks,
                                     controller, geometry, on_step=on_step)[0]


@functools.partial(jax.jit, static_argnames=("config", "cfg_on", "hooks_fn", "on_step", "geometry"))
def sd3_sample(params, latents, embeds, pooled, guidance_scale, sigmas, timesteps, hooks, controller, *, config,
               cfg_on, hooks_fn, on_step, geometry):
    """The SD3 denoising loop as one program; with CFG the batch is [negative; positive] (a controller
    steers both halves on the state it finds on the positive one)."""
    def velocity(x, t, i, step_hooks, aux):
        x_in = jnp.concatenate([x, x]) if cfg_on else x
        v, caps = sd3.forward(params, config, x_in, embeds, pooled, jnp.full((x_in.shape[0],), t), step_hooks)
        if cfg_on:
            uncond, cond = jnp.split(v, 2)
            v = sampling.cfg_combine(uncond, cond, guidance_scale)
        return v, caps, aux

    return sampling.controlled_euler(velocity, latents, sigmas, timesteps, hooks_fn if hooks_fn is not None else hooks,
                                     controller, geometry, branches=2 if cfg_on else 1, lead=1,
                                     on_step=on_step)[0]
