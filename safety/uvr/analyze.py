"""Start-up stage analysis: when does the unsafe region form, and through which attention flows?

For one generation (or Kontext edit) it records, at every step and block:
- text flow: the attention weight generated patches put on the concept's text tokens (head mean), inside
  the final unsafe region and outside it (`attn_img_sources` capture);
- context flow (editing): the weight generated patches put on all context patches, inside the region;
and at every step the localized mask (anchor scores at the localization block, `localize`) and its IoU
with the final step's mask: the evidence for where the start-up stage ends on a given model.
Outputs JSON and PNG charts (`write_report`).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxdit.io import atomic_directory, atomic_file
from jaxdit.safety.uvr import localize as loc


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def analyze(pipe, prompt: str, concept: str, anchors: np.ndarray, *, position: str = "single.10.img.attn_heads",
            image=None, height: int = 1024, width: int = 1024, num_inference_steps: int = 28, seed: int = 0,
            config: loc.LocalizeConfig = loc.T2I, max_sequence_length: int | None = None, **kwargs) -> dict:
    from jaxdit.pipeline import capture_run
    from jaxdit.safety.uvr.anchors import concept_token_positions

    max_len = max_sequence_length or pipe.default_max_sequence_length
    capture = tuple(f"{s}.*.joint.attn_img_sources" for s in ("double", "single")) + (position,)
    args = (prompt,) if image is None else (image, prompt)
    _, kept = capture_run(pipe, *args, capture=capture, height=height, width=width,
                          num_inference_steps=num_inference_steps, seed=seed, max_sequence_length=max_len,
                          output_type="latent", progress=False, **kwargs)
    grid = pipe._token_grid(height, width)
    tokens = concept_token_positions(pipe.tokenizer_2, prompt, concept, max_len)
    if len(tokens) == 0:
        raise ValueError(f"the prompt {prompt!r} does not contain the concept {concept!r}")
    return analyze_captures(kept, grid=grid, tokens=tokens, anchors=anchors, position=position, config=config,
                            prompt=prompt, concept=concept, editing=image is not None)


def analyze_captures(kept: dict, *, grid: tuple[int, int], tokens, anchors, position: str,
                     config: loc.LocalizeConfig, prompt: str, concept: str, editing: bool, index: int = 0) -> dict:
    """The analysis of one recorded run: kept = {step: {position: array}} with the localization position and
    `{stack}.{layer}.joint.attn_img_sources` captures (image `index` of the batch); tokens: the concept's
    text token positions."""
    n_gen = grid[0] * grid[1]
    stacks = ("double", "single")
    steps = sorted(kept)
    masks = []
    for s in steps:
        heads = kept[s][position][index:index + 1, :n_gen]
        scores = loc.score_patches(jnp.asarray(heads), jnp.asarray(anchors)).reshape(-1, *grid)
        masks.append(np.asarray(loc.localize(scores, config)[0])[0])
    final = masks[-1]
    inside = final.reshape(-1)
    layers = sorted({k for k in kept[steps[0]] if k.endswith("attn_img_sources")},
                    key=lambda k: (stacks.index(k.split(".")[0]), int(k.split(".")[1])))
    text_in = np.zeros((len(steps), len(layers)))
    text_out = np.zeros_like(text_in)
    ctx_in = np.zeros_like(text_in)
    for i, s in enumerate(steps):
        for j, name in enumerate(layers):
            src = kept[s][name][index, :n_gen]  # [n_gen, T_txt + 1]
            concept_w = src[:, tokens].sum(-1)
            text_in[i, j] = concept_w[inside].mean() if inside.any() else 0.0
            text_out[i, j] = concept_w[~inside].mean() if (~inside).any() else 0.0
            ctx_in[i, j] = src[inside, -1].mean() if inside.any() else 0.0
    return {
        "prompt": prompt, "concept": concept, "position": position, "steps": steps,
        "layers": [".".join(n.split(".")[:2]) for n in layers],
        "iou_with_final": [iou(m, final) for m in masks], "region_patches": [int(m.sum()) for m in masks],
        "text_flow_in_region": text_in.tolist(), "text_flow_outside": text_out.tolist(),
        "context_flow_in_region": ctx_in.tolist(), "editing": editing,
        "final_mask": final.astype(int).tolist(),
    }


def _save_png(image, path: Path) -> None:
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")


def _heatmap(values: np.ndarray, title: str, path: Path, cell: int = 10) -> None:
    """steps x layers heat map (white = 0, black = max), drawn with PIL."""
    from PIL import Image, ImageDraw

    v = np.asarray(values, np.float64)
    norm = v / v.max() if v.max() > 0 else v
    h, w = v.shape
    image = Image.new("RGB", (60 + w * cell, 40 + h * cell), "white")
    draw = ImageDraw.Draw(image)
    draw.text((5, 5), f"{title} (max {v.max():.3g}); rows: steps, columns: blocks", fill="black")
    for i in range(h):
        draw.text((5, 30 + i * cell), str(i), fill="black")
        for j in range(w):
            g = int(255 * (1 - norm[i, j]))
            draw.rectangle([50 + j * cell, 30 + i * cell, 50 + (j + 1) * cell - 1, 30 + (i + 1) * cell - 1],
                           fill=(g, g, g))
    _save_png(image, path)


def _curve(values, title: str, path: Path) -> None:
    from PIL import Image, ImageDraw

    width, height, pad = 420, 200, 30
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((5, 5), title, fill="black")
    n = max(len(values) - 1, 1)
    points = [(pad + i * (width - 2 * pad) / n, height - pad - v * (height - 2 * pad)) for i, v in enumerate(values)]
    draw.line([(pad, height - pad), (width - pad, height - pad)], fill="gray")
    draw.line([(pad, pad), (pad, height - pad)], fill="gray")
    if len(points) > 1:
        draw.line(points, fill="navy", width=2)
    for x, y in points:
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill="navy")
    _save_png(image, path)


def write_report(result: dict, out) -> Path:
    """analysis.json, text_flow.png, context_flow.png (editing), iou.png in `out` (written atomically)."""
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "analysis.json").write_text(json.dumps(result, indent=2))
        _heatmap(np.asarray(result["text_flow_in_region"]), f"flow from '{result['concept']}' into the region",
                 tmp / "text_flow.png")
        if result["editing"]:
            _heatmap(np.asarray(result["context_flow_in_region"]), "flow from context patches into the region",
                     tmp / "context_flow.png")
        _curve(result["iou_with_final"], "IoU of the step-t mask with the final mask", tmp / "iou.png")
    return Path(out)
