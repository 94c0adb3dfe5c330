"""Sampling the toy-world model: text-to-image and Kontext-style editing, the whole loop compiled.

The same pieces as jaxdit.pipeline's FLUX pipelines (flux.forward, jaxdit.sampling's schedule and Euler
scan, jaxdit.hooks values and controllers with the same `init / hooks / update` protocol and Geometry), in
pixel space, with optional classifier-free guidance (the model was trained with 10% empty prompts).

    tw = ToyWorld.load()                                    # the committed weights
    images = tw.generate(["a red star at the top left"], seed=0)          # [B, 32, 32, 3] uint8
    edited = tw.edit(images, ["make the background white"], seed=0)
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
from jaxdit.pipeline import Geometry
from jaxdit.toyworld import model as M
from jaxdit.toyworld.tokenizer import WordTokenizer

SCHEDULER = sampling.SchedulerConfig(shift=M.SIGMA_SHIFT)  # the shift the model was trained with
DEFAULT_STEPS = 12


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

    def _check_text(self, texts):
        for t in texts:
            unknown = self.tokenizer.unknown_words(t)
            if unknown:
                raise ValueError(f"prompt {t!r}: words outside the toy-world vocabulary: {unknown}")

    def _run(self, texts, seeds, context, steps, guidance, hooks, controller, return_state=False):
        texts = list(texts)
        self._check_text(texts)
        seeds = list(seeds) if not isinstance(seeds, (int, np.integer)) else [int(seeds) + i for i in range(len(texts))]
        if len(seeds) != len(texts):
            raise ValueError(f"{len(seeds)} seeds for {len(texts)} prompts")
        ids, mask = self.tokenizer(texts)
        if guidance != 1.0:
            nid, nmask = self.tokenizer([""] * len(texts))
            ids, mask = np.concatenate([ids, nid]), np.concatenate([mask, nmask])
        sigmas, timesteps = schedule(steps)
        ctx = None if context is None else M.to_tokens(np.asarray(context))
        out, state = _sample(self.params, initial_noise(seeds), ids, mask, ctx, sigmas, timesteps, float(guidance),
                             None if callable(hooks) else hooks, controller, fcfg=self.flux_config,
                             t5cfg=self.t5_config, hooks_fn=hooks if callable(hooks) else None,
                             geometry=self.geometry(context is not None))
        images = M.to_images(out)
        return (images, state) if return_state else images

    def generate(self, prompts: str | Sequence[str], seed: int | Sequence[int] = 0, steps: int = DEFAULT_STEPS,
                 guidance: float = 1.0, hooks=None, controller=None, return_state: bool = False):
        """Text-to-image: [B, 32, 32, 3] uint8. seed: base seed (image i uses seed + i) or one per prompt."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self._run(prompts, seed, None, steps, guidance, hooks, controller, return_state)

    def edit(self, images, instructions: str | Sequence[str], seed: int | Sequence[int] = 0,
             steps: int = DEFAULT_STEPS, guidance: float = 1.0, hooks=None, controller=None,
             return_state: bool = False):
        """Edit `images` [B, 32, 32, 3] uint8 by `instructions` (source image as Kontext context tokens)."""
        instructions = [instructions] if isinstance(instructions, str) else list(instructions)
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.shape[1:] != (M.SIZE, M.SIZE, 3) or len(images) != len(instructions):
            raise ValueError(f"edit needs [{len(instructions)}, {M.SIZE}, {M.SIZE}, 3] images, got {images.shape}")
        return self._run(instructions, seed, images, steps, guidance, hooks, controller, return_state)


def _hooks_at(hooks, step):
    if hooks is None:
        return None
    h = hooks(step) if callable(hooks) else hooks
    return h.replace(step=step)


@functools.partial(jax.jit, static_argnames=("fcfg", "t5cfg", "hooks_fn", "geometry"))
def _sample(params, noise, ids, mask, context, sigmas, timesteps, guidance, hooks, controller, *, fcfg, t5cfg,
            hooks_fn, geometry):
    """Denoising loop; with guidance != 1 the batch is [cond; uncond] and combined by CFG each step."""
    b = noise.shape[0]
    cfg_on = ids.shape[0] != b
    h, pooled = M.encode_text(params["text_encoder"], t5cfg, ids, mask)
    txt_ids = flux.text_ids(h.shape[1])
    tokens_ids = M.IMG_IDS if context is None else np.concatenate([M.IMG_IDS, M.CTX_IDS])
    n_ctx = 0 if context is None else context.shape[1]
    if context is not None and cfg_on:
        context = jnp.concatenate([context, context])

    def forward(x, t, step_hooks):
        xx = jnp.concatenate([x, x]) if cfg_on else x
        tokens = xx if context is None else jnp.concatenate([xx, context], axis=1)
        v, caps = flux.forward(params["transformer"], fcfg, tokens, h, pooled, jnp.full((xx.shape[0],), t / 1000),
                               tokens_ids, txt_ids, None, step_hooks, n_ctx)
        v = v[:, : x.shape[1]]
        if cfg_on:
            v = sampling.cfg_combine(v[b:], v[:b], guidance)
        return v, caps

    user = lambda i: _hooks_at(hooks_fn if hooks_fn is not None else hooks, i)  # noqa: E731
    if controller is None:
        return sampling.euler_sample(lambda x, t, i: forward(x, t, user(i))[0], noise, sigmas, timesteps), None

    def denoise(x, t, i, state):
        step_hooks = hk.merge(user(i), controller.hooks(state, i, t, geometry)).replace(step=i)
        v, caps = forward(x, t, step_hooks)
        return v, controller.update(state, caps, i, t, geometry)

    return sampling.euler_sample(denoise, noise, sigmas, timesteps,
                                 state=controller.init(ids.shape[0], geometry))
