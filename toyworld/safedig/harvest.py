"""Toy-world SafeDIG harvest: token activations at the candidate positions from forward passes on the
examples' rendered scenes, noised at the sampler's sigmas, every token labelled."""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdit import hooks as hk
from jaxdit.toyworld import model as M
from jaxdit.toyworld.pipeline import DEFAULT_STEPS, initial_noise, schedule
from jaxdit.toyworld.safedig.examples import Example, _concept, image_token_labels, text_token_labels
from jaxdit.toyworld.scenes import render

CANDIDATES = ("double.0.txt.resid_pre", "double.0.txt.resid_post", "double.0.img.resid_post",
              "double.1.img.resid_post", "single.0.img.resid_post", "single.1.img.resid_post")
HARVEST_STEPS = (0, 3, 6, 9, 11)  # indices into the 12-step sampling schedule: the sigmas the scenes are noised at


def stream_of(position: str) -> str:
    return hk.Position.parse(position).stream


@dataclasses.dataclass
class Harvest:
    """Token activations at several positions with per-token metadata (shared by positions of a stream).

    acts[position]: [N_stream, d] float32; label/step/example/role[stream]: [N_stream]; role 0 = generated
    image token, 1 = context image token (edits), 2 = text token; step = sampling-step index of the sigma.
    """

    concept: str
    acts: dict
    label: dict
    step: dict
    example: dict
    role: dict

    def mask(self, position: str, labels=None, steps=None, roles=None) -> np.ndarray:
        s = stream_of(position)
        keep = np.ones(len(self.label[s]), bool)
        if labels is not None:
            keep &= np.isin(self.label[s], labels)
        if steps is not None:
            keep &= np.isin(self.step[s], steps)
        if roles is not None:
            keep &= np.isin(self.role[s], roles)
        return keep

    def select(self, position: str, labels=None, steps=None, roles=None) -> np.ndarray:
        return self.acts[position][self.mask(position, labels, steps, roles)]

    def unsafe(self, position: str, steps=None) -> np.ndarray:
        return self.select(position, (2,), steps)

    def safe(self, position: str, steps=None) -> np.ndarray:
        return self.select(position, (0, 1), steps)


@functools.partial(jax.jit, static_argnames=("fcfg", "t5cfg", "positions"))
def _capture(params, x, ids, mask, sigma, context, *, fcfg, t5cfg, positions):
    _, caps = M.velocity(params, fcfg, t5cfg, x, ids, mask, sigma, context, hk.Hooks(capture=positions))
    return {p: caps[p] for p in positions}


def harvest(tw, examples: Sequence[Example], concept, positions: Sequence[str] = CANDIDATES,
            steps: Sequence[int] = HARVEST_STEPS, num_steps: int = DEFAULT_STEPS, batch: int = 32) -> Harvest:
    """Forward passes of the toy model on the examples' rendered scenes noised at the sigmas of `steps`
    (indices into the `num_steps` sampling schedule); returns every token at every position, labelled."""
    concept = _concept(concept)
    positions = tuple(positions)
    sigmas, _ = schedule(num_steps)
    streams = sorted({stream_of(p) for p in positions})
    acts = {p: [] for p in positions}
    meta = {s: {"label": [], "step": [], "example": [], "role": []} for s in streams}
    for is_edit in (False, True):
        idx = [i for i, e in enumerate(examples) if (e.context is not None) == is_edit]
        for start in range(0, len(idx), batch):
            chunk = idx[start:start + batch]
            pad = chunk + [chunk[-1]] * (batch - len(chunk))
            exs = [examples[i] for i in pad]
            x0 = M.to_tokens(np.stack([render(e.scene) for e in exs]))
            noise = initial_noise([e.seed for e in exs])
            ids, tmask = tw.tokenizer([e.text for e in exs])
            ctx = M.to_tokens(np.stack([render(e.context) for e in exs])) if is_edit else None
            img_labels = np.stack([np.concatenate([image_token_labels(e.scene, concept)]
                                                  + ([image_token_labels(e.context, concept)] if is_edit else []))
                                   for e in exs])[: len(chunk)]
            img_roles = np.concatenate([np.zeros(M.TOKENS, np.int8)] + ([np.ones(M.TOKENS, np.int8)] if is_edit
                                                                          else []))
            txt_labels = np.stack([text_token_labels(e.text, tw.tokenizer, concept) for e in exs])[: len(chunk)]
            for k in steps:
                sigma = float(sigmas[k])
                xs = (1 - sigma) * x0 + sigma * noise
                caps = _capture(tw.params, xs, ids, tmask, jnp.full((batch,), sigma, jnp.float32), ctx,
                                fcfg=tw.flux_config, t5cfg=tw.t5_config, positions=positions)
                for p in positions:
                    a = np.asarray(caps[p], np.float32)[: len(chunk)]
                    acts[p].append(a.reshape(-1, a.shape[-1]))
                for s in streams:
                    lab = img_labels if s == "img" else txt_labels
                    meta[s]["label"].append(lab.reshape(-1))
                    meta[s]["step"].append(np.full(lab.size, k, np.int16))
                    meta[s]["example"].append(np.repeat(np.asarray(chunk, np.int32), lab.shape[1]))
                    role = img_roles if s == "img" else np.full(lab.shape[1], 2, np.int8)
                    meta[s]["role"].append(np.tile(role, len(chunk)))
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros((0,))  # noqa: E731
    return Harvest(concept.value, {p: cat(v) for p, v in acts.items()},
                   *({s: cat(meta[s][key]) for s in streams} for key in ("label", "step", "example", "role")))


