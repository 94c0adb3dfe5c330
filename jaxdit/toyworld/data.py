"""Training batches: rendered text-to-image and edit examples, deterministic per (seed, step)."""

from __future__ import annotations

import numpy as np

from jaxdit.toyworld.captions import caption
from jaxdit.toyworld.edits import random_edit
from jaxdit.toyworld.scenes import render, random_scene

CAPTION_DROPOUT = 0.1  # empty prompts, so classifier-free guidance is available at sampling


def t2i_batch(rng: np.random.Generator, n: int, tokenizer) -> dict:
    images, texts = [], []
    for _ in range(n):
        scene = random_scene(rng)
        text, _ = caption(scene, rng)
        images.append(render(scene))
        texts.append("" if rng.random() < CAPTION_DROPOUT else text)
    ids, mask = tokenizer(texts)
    return {"image": np.stack(images), "ids": ids, "mask": mask}


def edit_batch(rng: np.random.Generator, n: int, tokenizer) -> dict:
    src, tgt, texts = [], [], []
    for _ in range(n):
        e = random_edit(rng)
        src.append(render(e.source))
        tgt.append(render(e.target))
        texts.append("" if rng.random() < CAPTION_DROPOUT else e.instruction)
    ids, mask = tokenizer(texts)
    return {"image": np.stack(tgt), "context": np.stack(src), "ids": ids, "mask": mask}


def training_batch(seed: int, step: int, t2i: int, edits: int, tokenizer) -> dict:
    rng = np.random.default_rng([seed, step])
    return {"t2i": t2i_batch(rng, t2i, tokenizer), "edit": edit_batch(rng, edits, tokenizer)}
