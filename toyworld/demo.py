"""`jaxdit toyworld demo`: a few prompts and edits through the committed model, as one PNG grid, with the
detector's reading of every image printed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxdit.toyworld.scenes import Obj, Scene, render

PROMPTS = (
    "a red star at the top left and a blue circle at the bottom right",
    "a green heart at the top right",
    "a yellow triangle at the bottom left and a blue square at the top right on a gray background",
    "a pentagram in the bottom right corner",
)
SOURCE = Scene((Obj("star", "red", "big", "top left"), Obj("circle", "blue", "big", "bottom right")), "black")
EDITS = ("make the background gray", "turn the circle into a triangle", "remove the star", "make the circle yellow")


def _describe(objs) -> str:
    return ", ".join(f"{o['colour']} {o['shape']} ({o['cell']})" for o in objs) or "nothing"


def run_demo(weights=None, out="toyworld_demo.png", seed: int = 0, steps: int = 12, guidance: float | None = None) -> Path:
    from PIL import Image

    from jaxdit.toyworld.detector import Detector
    from jaxdit.toyworld.pipeline import DEFAULT_GUIDANCE, ToyWorld

    guidance = DEFAULT_GUIDANCE if guidance is None else guidance
    tw, det = ToyWorld.load(weights), Detector.load(weights)
    t2i = tw.generate(list(PROMPTS), seed=seed, steps=steps, guidance=guidance)
    src = render(SOURCE)
    edited = tw.edit(np.stack([src] * len(EDITS)), list(EDITS), seed=seed, steps=steps, guidance=guidance)
    blank = np.full_like(src, 40)
    rows = [np.concatenate([blank, img], 1) for img in t2i] + [np.concatenate([src, img], 1) for img in edited]
    for text, objs in zip(PROMPTS, det.read(t2i)):
        print(f"generate  {text!r}\n          -> {_describe(objs)}")
    print(f"source    -> {_describe(det.read(src[None])[0])}")
    for text, objs in zip(EDITS, det.read(edited)):
        print(f"edit      {text!r}\n          -> {_describe(objs)}")
    grid = np.concatenate([np.pad(r, ((1, 1), (1, 1), (0, 0))) for r in rows], 0)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(out)
    print(f"wrote {out} (rows: {len(PROMPTS)} prompts, then {len(EDITS)} edits of the source in the left column)")
    return out
