"""Sampling the toy-world model: text-to-image and Kontext-style editing, the whole loop compiled.

The same pieces as jaxdit.pipeline's FLUX pipelines (flux.forward, jaxdit.sampling's schedule and Euler
scan, jaxdit.hooks values and controllers with the same `init / hooks / update` protocol and Geometry), in
pixel space, with optional classifier-free guidance (the model was trained with 10% empty prompts).

    tw = ToyWorld.load()                                    # the committed weights
    images = tw.generate(["a red star at the top left"], seed=0)          # [B, 32, 32, 3] uint8
    edited = tw.edit(images, ["make the background gray"], seed=0)
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdit import flux, hooks as hk, sampling
from jaxdit.configs import FluxConfig
from jaxdit.hooks import Geometry
from jaxdit.toyworld import model as M
from jaxdit.toyworld.tokenizer import WordTokenizer

SCHEDULER = sampling.SchedulerConfig(shift=M.SIGMA_SHIFT)  # the shift the model was trained with
DEFAULT_STEPS = 12
# Classifier-free guidance scale of every sampler default (generate, edit, the suites, `jaxdit toyworld eval`).
# Measured on the committed weights, 64 items per suite of 4 suite seeds (docs/toyworld.md): safe-suite
# requested-object accuracy 0.880-0.918 at 1, 0.900-0.916 at 1.5, 0.906-0.926 at 2, 0.893-0.937 at 3; every
# other bar is met at each. 2 doubles the batch of each step (the unconditional branch).
DEFAULT_GUIDANCE = 2.0


def schedule(steps: int):
    """(sigmas [N+1], timesteps [N]): FLUX's linspace(1, 1/N, N), shifted by model.SIGMA_SHIFT."""
    return sampling.flow_match_schedule(SCHEDULER, steps, sigmas=np.linspace(1.0, 1 / steps, steps))


def initial_noise(seeds: Sequence[int]) -> jax.Array:
    """[B, 64, 48]: each image's noise from its own seed, so results do not depend on batching."""
    return jnp.stack([jax.random.normal(jax.random.key(int(s)), (M.TOKENS, 48), jnp.float32) for s in seeds])


@dataclasses.dataclass
class ToyWorld:
    flux_config: FluxConfig
    t5_config: Any
    params: dict  # {"transformer": ..., "text_encoder": ...}
    tokenizer: WordTokenizer
    info: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, weights=None) -> "ToyWorld":
        import jaxdit
        from jaxdit.toyworld.weights import DEFAULT_DIR, load_text_encoder

        folder = Path(weights or DEFAULT_DIR)
        if not (folder / "transformer").is_dir():
            raise FileNotFoundError(f"{folder}: no toy-world weights (transformer/ missing)")
        fcfg, tparams = jaxdit.load_transformer(folder / "transformer")
        t5cfg, t5params = load_text_encoder(folder)
        info = json.loads((folder / "training.json").read_text()) if (folder / "training.json").exists() else {}
        return cls(fcfg, t5cfg, {"transformer": tparams, "text_encoder": t5params},
                   WordTokenizer.load(folder / "vocab.json"), info)

    def geometry(self, editing: bool) -> Geometry:
        layout = hk.TokenLayout(self.tokenizer.max_length, M.TOKENS, M.TOKENS if editing else 0)
        return Geometry(layout, (M.GRID, M.GRID), (M.GRID, M.GRID) if editing else None)

    def pooled(self, texts: Sequence[str]) -> np.ndarray:
        """The pooled text vectors [len(texts), 64] the transformer is conditioned on (encoder only)."""
        texts = list(texts)
        self._check_text(texts)
        ids, mask = self.tokenizer(texts)
        return np.asarray(_pooled(self.params["text_encoder"], ids, mask, t5cfg=self.t5_config))

    def _check_text(self, texts):
        for t in texts:
            unknown = self.tokenizer.unknown_words(t)
            if unknown:
                raise ValueError(f"prompt {t!r}: words outside the toy-world vocabulary: {unknown}")

    def _run(self, texts, seeds, context, steps, guidance, hooks, controller, return_state=False,
             negative_prompt=None, safety_guidance: "SafetyGuidance | None" = None):
        texts = list(texts)
        negatives = None
        if negative_prompt is not None:
            negatives = [negative_prompt] * len(texts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != len(texts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(texts)} prompts")
        self._check_text(texts + (negatives or []) + ([safety_guidance.concept] if safety_guidance else []))
        seeds = list(seeds) if not isinstance(seeds, (int, np.integer)) else [int(seeds) + i for i in range(len(texts))]
        if len(seeds) != len(texts):
            raise ValueError(f"{len(seeds)} seeds for {len(texts)} prompts")
        ids, mask = self.tokenizer(texts)
        if guidance != 1.0 or negatives is not None or safety_guidance is not None:
            nid, nmask = self.tokenizer(negatives or [""] * len(texts))  # the unconditional (or negative) branch
            ids, mask = np.concatenate([ids, nid]), np.concatenate([mask, nmask])
        if safety_guidance is not None:
            sid, smask = self.tokenizer([safety_guidance.concept] * len(texts))
            ids, mask = np.concatenate([ids, sid]), np.concatenate([mask, smask])
        sigmas, timesteps = schedule(steps)
        ctx = None if context is None else M.to_tokens(np.asarray(context))
        out, state = _sample(self.params, initial_noise(seeds), ids, mask, ctx, sigmas, timesteps, float(guidance),
                             None if callable(hooks) else hooks, controller, fcfg=self.flux_config,
                             t5cfg=self.t5_config, hooks_fn=hooks if callable(hooks) else None,
                             geometry=self.geometry(context is not None), sld=safety_guidance)
        images = M.to_images(out)
        return (images, state) if return_state else images

    def generate(self, prompts: str | Sequence[str], seed: int | Sequence[int] = 0, steps: int = DEFAULT_STEPS,
                 guidance: float = DEFAULT_GUIDANCE, hooks=None, controller=None, return_state: bool = False,
                 negative_prompt: str | Sequence[str] | None = None, safety_guidance: "SafetyGuidance | None" = None):
        """Text-to-image: [B, 32, 32, 3] uint8. seed: base seed (image i uses seed + i) or one per prompt.

        guidance: classifier-free guidance scale, away from the empty prompt or from `negative_prompt`;
        safety_guidance: safe-latent-diffusion guidance away from a concept's text (`SafetyGuidance`).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self._run(prompts, seed, None, steps, guidance, hooks, controller, return_state, negative_prompt,
                         safety_guidance)

    def edit(self, images, instructions: str | Sequence[str], seed: int | Sequence[int] = 0,
             steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, hooks=None, controller=None,
             return_state: bool = False, negative_prompt: str | Sequence[str] | None = None,
             safety_guidance: "SafetyGuidance | None" = None):
        """Edit `images` [B, 32, 32, 3] uint8 by `instructions` (source image as Kontext context tokens);
        guidance arguments as for `generate`."""
        instructions = [instructions] if isinstance(instructions, str) else list(instructions)
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.shape[1:] != (M.SIZE, M.SIZE, 3) or len(images) != len(instructions):
            raise ValueError(f"edit needs [{len(instructions)}, {M.SIZE}, {M.SIZE}, 3] images, got {images.shape}")
        return self._run(instructions, seed, images, steps, guidance, hooks, controller, return_state,
                         negative_prompt, safety_guidance)


@functools.partial(jax.jit, static_argnames="t5cfg")
def _pooled(t5_params, ids, mask, *, t5cfg):
    return M.encode_text(t5_params, t5cfg, ids, mask)[1]


@dataclasses.dataclass(frozen=True)
class SafetyGuidance:
    """Safe latent diffusion (Schramowski et al., CVPR 2023) in velocity space: guidance away from the
    velocity conditioned on `concept`, element-wise where the prompt's velocity is close to the concept's,
    with momentum, after `warmup` steps. Combined as diffusers' StableDiffusionPipelineSafe does:

        g = v_c - v_u;  mu = clip(scale * |v_c - v_s|, max 1), 0 where v_c - v_s >= threshold
        g_s = mu (v_s - v_u) + momentum_scale * m;  m <- beta m + (1 - beta) g_s
        v = v_u + guidance * (g - g_s [step >= warmup])
    """

    concept: str
    scale: float = 1000.0
    threshold: float = 0.01
    warmup: int = 2
    momentum_scale: float = 0.3
    beta: float = 0.4


def _combine(vs: list, guidance, sld: SafetyGuidance | None, i, momentum):
    """Velocities of the branches [cond] / [cond, uncond] / [cond, uncond, concept] -> one velocity."""
    if len(vs) == 1:
        return vs[0], momentum
    v_c, v_u = vs[0], vs[1]
    if sld is None:
        return sampling.cfg_combine(v_u, v_c, guidance), momentum
    v_s = vs[2]
    g = v_c - v_u
    mu = jnp.where(v_c - v_s >= sld.threshold, 0.0, jnp.minimum(sld.scale * jnp.abs(v_c - v_s), 1.0))
    g_s = mu * (v_s - v_u) + sld.momentum_scale * momentum
    momentum = sld.beta * momentum + (1 - sld.beta) * g_s
    g = jnp.where(i >= sld.warmup, g - g_s, g)
    return v_u + guidance * g, momentum


@functools.partial(jax.jit, static_argnames=("fcfg", "t5cfg", "hooks_fn", "geometry", "sld"))
def _sample(params, noise, ids, mask, context, sigmas, timesteps, guidance, hooks, controller, *, fcfg, t5cfg,
            hooks_fn, geometry, sld=None):
    """Denoising loop. The text batch holds `branches` = ids.shape[0] / noise.shape[0] prompt sets: the
    prompts, then (guidance) the empty or negative prompts, then (sld) the concept; each step runs all
    branches in one batch and `_combine` merges them."""
    b = noise.shape[0]
    branches = ids.shape[0] // b
    h, pooled = M.encode_text(params["text_encoder"], t5cfg, ids, mask)
    txt_ids = flux.text_ids(h.shape[1])
    tokens_ids = M.IMG_IDS if context is None else np.concatenate([M.IMG_IDS, M.CTX_IDS])
    n_ctx = 0 if context is None else context.shape[1]
    if context is not None and branches > 1:
        context = jnp.concatenate([context] * branches)

    def velocity(x, t, i, step_hooks, momentum):
        xx = jnp.concatenate([x] * branches) if branches > 1 else x
        tokens = xx if context is None else jnp.concatenate([xx, context], axis=1)
        v, caps = flux.forward(params["transformer"], fcfg, tokens, h, pooled, jnp.full((xx.shape[0],), t / 1000),
                               tokens_ids, txt_ids, None, step_hooks, n_ctx)
        v, momentum = _combine(jnp.split(v[:, : x.shape[1]], branches), guidance, sld, i, momentum)
        return v, caps, momentum

    return sampling.controlled_euler(velocity, noise, sigmas, timesteps, hooks_fn if hooks_fn is not None else hooks,
                                     controller, geometry, aux=None if sld is None else jnp.zeros_like(noise),
                                     branches=branches)
