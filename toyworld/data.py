"""Training batches: rendered text-to-image and edit examples, deterministic per (seed, step).

Each example carries a per-pixel loss weight from the renderer's exact coverage: 1 on background and
1 + FOREGROUND_WEIGHT on (dilated) object pixels and, for edits, on every pixel the edit changes. Under a
plain mean over pixels an object is 5-15% of the loss and the points of a star a few percent, so shape is
the last thing a short run learns; the weight puts the signal where the prompt's content is.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from jaxdit.toyworld.captions import caption
from jaxdit.toyworld.edits import KINDS, random_edit
from jaxdit.toyworld.scenes import OBJECT_COUNTS, SIZE, Scene, object_coverage, render, random_scene

CAPTION_DROPOUT = 0.1  # empty prompts, so classifier-free guidance is available at sampling
FOREGROUND_WEIGHT = 4.0

# Data mixes: object-count probabilities (1 / 2 / 3 objects) of the scenes, and the edit kinds' weights
# (in edits.KINDS order; None = uniform). "binding" puts the weight on what a run of "uniform" learns last:
# two- and three-object scenes (binding each colour and place to its shape) and replace edits; "pairs" puts
# it on two-object scenes, where a run of "binding" still swaps colours and places between the objects.
_REPLACE_x3 = tuple(3.0 if k == "replace" else 1.0 for k in KINDS)
MIXES = {
    "uniform": {"counts": OBJECT_COUNTS, "kind_weights": None},
    "binding": {"counts": (0.2, 0.45, 0.35), "kind_weights": _REPLACE_x3},
    "pairs": {"counts": (0.15, 0.6, 0.25), "kind_weights": _REPLACE_x3},
}


def foreground(scene: Scene) -> np.ndarray:
    """[SIZE, SIZE] bool: pixels any object touches, grown by one pixel (edges and anti-aliasing)."""
    cover = np.zeros((SIZE, SIZE), bool)
    for obj in scene.objects:
        cover |= object_coverage(obj) > 0
    return ndimage.binary_dilation(cover)


def loss_weight(region: np.ndarray) -> np.ndarray:
    return (1.0 + FOREGROUND_WEIGHT * region).astype(np.float32)


def t2i_batch(rng: np.random.Generator, n: int, tokenizer, mix: str = "uniform") -> dict:
    images, texts, weights = [], [], []
    for _ in range(n):
        scene = random_scene(rng, counts=MIXES[mix]["counts"])
        text, _ = caption(scene, rng)
        images.append(render(scene))
        weights.append(loss_weight(foreground(scene)))
        texts.append("" if rng.random() < CAPTION_DROPOUT else text)
    ids, mask = tokenizer(texts)
    return {"image": np.stack(images), "ids": ids, "mask": mask, "weight": np.stack(weights)}


def edit_batch(rng: np.random.Generator, n: int, tokenizer, mix: str = "uniform") -> dict:
    src, tgt, texts, weights = [], [], [], []
    for _ in range(n):
        e = random_edit(rng, **MIXES[mix])
        s, t = render(e.source), render(e.target)
        src.append(s)
        tgt.append(t)
        changed = ndimage.binary_dilation((s != t).any(-1))
        weights.append(loss_weight(foreground(e.target) | changed))
        texts.append("" if rng.random() < CAPTION_DROPOUT else e.instruction)
    ids, mask = tokenizer(texts)
    return {"image": np.stack(tgt), "context": np.stack(src), "ids": ids, "mask": mask, "weight": np.stack(weights)}


def training_batch(seed: int, step: int, t2i: int, edits: int, tokenizer, mix: str = "uniform") -> dict:
    rng = np.random.default_rng([seed, step])
    return {"t2i": t2i_batch(rng, t2i, tokenizer, mix), "edit": edit_batch(rng, edits, tokenizer, mix)}
