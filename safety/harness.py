"""Real-model safety evaluation: I2P-style prompt CSVs -> images -> detector -> per-image JSON + summary.

    jaxdit safety eval --model FLUX.1-dev/ --prompts i2p.csv --method uvr --uvr nudity.safetensors --out runs/uvr
    jaxdit safety compare runs/none runs/uvr

CSV columns: `prompt` (required), `evaluation_seed` and `evaluation_guidance` (optional, per row), others
kept as metadata. Output directory (written under a temporary name, renamed when complete):
`images/NNNNN.png`, `results.jsonl` (one line per prompt: row, seed, detections, unsafe), `summary.json`.
Erase rates of a method against a base run on the same prompts and seeds, both definitions:
aggregate 1 - U_method / U_base, and per sample: the share of base-unsafe images no longer unsafe.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from jaxdit.safety import evaluate as ev


def read_prompts_csv(path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompt file")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "prompt" not in reader.fieldnames:
            raise ValueError(f"{path}: needs a 'prompt' column (found {reader.fieldnames})")
        rows = []
        for i, row in enumerate(reader):
            try:
                if row.get("evaluation_seed") not in (None, ""):
                    row["evaluation_seed"] = int(float(row["evaluation_seed"]))
                if row.get("evaluation_guidance") not in (None, ""):
                    row["evaluation_guidance"] = float(row["evaluation_guidance"])
            except ValueError as e:
                raise ValueError(f"{path}: row {i + 2}: {e}") from None
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def evaluate(pipe, rows: list[dict], detector, out, *, method: str = "none", controller=None, hooks=None,
             steps: int = 28,
             size: int = 1024, default_seed: int = 0, use_csv_guidance: bool = False, progress: bool = True,
             overwrite: bool = False) -> dict:
    """Generate every row, score it, and write the run directory `out`; returns the summary."""
    from tqdm.auto import tqdm

    from jaxdit.convert.checkpoint import atomic_directory
    from jaxdit.pipeline import save_png

    unsafe = 0
    with atomic_directory(out, overwrite) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / "results.jsonl", "w") as log:
            for i, row in enumerate(tqdm(rows, desc=f"eval {method}", disable=not progress)):
                seed = row.get("evaluation_seed")
                seed = default_seed if seed in (None, "") else seed
                kw = {}
                if use_csv_guidance and row.get("evaluation_guidance") not in (None, ""):
                    kw["guidance_scale"] = row["evaluation_guidance"]
                if controller is not None:
                    kw["controller"] = controller
                if hooks is not None:
                    kw["hooks"] = hooks
                image = pipe(row["prompt"], height=size, width=size, num_inference_steps=steps, seed=seed,
                             progress=False, **kw)[0]
                save_png(image, tmp / "images" / f"{i:05d}.png")
                found = detector.detect([image])[0]
                unsafe += found["unsafe"]
                log.write(json.dumps({"index": i, "seed": seed, "row": row, **found}) + "\n")
        summary = {"method": method, "rule": detector.rule.describe(), "n": len(rows), "unsafe": unsafe,
                   "unsafe_rate": unsafe / len(rows), "steps": steps, "size": size}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def read_results(run) -> list[dict]:
    path = Path(run) / "results.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run}: not an evaluation run (no results.jsonl)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def erase_rates(base: list[dict], method: list[dict]) -> dict:
    """Both erase-rate definitions on runs over the same prompts and seeds (matched by index)."""
    if [(r["index"], r["seed"]) for r in base] != [(r["index"], r["seed"]) for r in method]:
        raise ValueError("the two runs do not cover the same prompts and seeds")
    return ev.erase_rates([r["unsafe"] for r in base], [r["unsafe"] for r in method])
