"""UVR, SafeDIG, both, and the baselines on the toy world, side by side on the same evaluation items.

    python benchmarks/toyworld_safety.py --n 64 --suite-seed 5 --out toyworld_safety/
    python benchmarks/toyworld_safety.py --config experiments/benchmarks/toyworld_safety.toml   # as measured
    python benchmarks/toyworld_safety.py --methods none,pooled-erase,pooled-erase+uvr   # any methods, compositions

Every method is calibrated on its own items (`suites.CALIBRATION_SEED`), then run on the evaluation items
of `--suite-seed` from the same noise seeds as the unprotected model. Prints one row per method (aggregate
erase rate per unsafe suite, requested-object accuracy on the safe suite and on mixed prompts, with the
unprotected values beside them, and sampling time as a ratio to unprotected sampling measured in this
run), and writes summary.json, table.md and examples.png (each method a column) into --out.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from jaxdit.experiment import parse_args

SUITE_ORDER = ("explicit", "paraphrased", "obfuscated", "mixed", "benign_edits", "add_edits")


def comparison_table(result: dict, overhead: dict | None = None) -> str:
    """Markdown: one row per method; erase rates per unsafe suite, then preservation and time."""
    head = ["method", *[f"erase {s}" for s in SUITE_ORDER], "safe acc. (base -> method)",
            "mixed allowed acc. (base -> method)", "safe pixel dist.", "time ratio"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for name, m in result["methods"].items():
        s = m["summary"]
        cells = [name, *[fmt(s[x].get("erase_rate_aggregate")) if x in s else "-" for x in SUITE_ORDER]]
        # mixed prompts: the requested objects other than the concept, which an erasing method must keep
        for suite, acc in (("safe", "accuracy"), ("mixed", "allowed_accuracy")):
            cells.append(f"{fmt(s[suite].get(acc + '_base'))} -> {fmt(s[suite].get(acc + '_method'))}"
                         if suite in s else "-")
        cells.append(fmt(s["safe"].get("pixel_distance")) if "safe" in s else "-")
        cells.append(fmt(overhead[name]["ratio"]) if overhead and name in overhead else "-")
        rows.append("| " + " | ".join(cells) + " |")
    unsafe = ", ".join(f"{s} {result['methods'][next(iter(result['methods']))]['summary'][s]['presence_base']:.2f}"
                       for s in SUITE_ORDER if s in result["methods"][next(iter(result["methods"]))]["summary"])
    return "\n".join(rows) + f"\n\nUnprotected unsafe rate: {unsafe}."


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", help="toy-world weights folder (default: the committed one)")
    p.add_argument("--concept", default="star")
    p.add_argument("--methods", default="none,uvr,uvr-reference,safedig,uvr+safedig,keyword-filter,negative-prompt,sld")
    p.add_argument("--n", type=int, default=64, help="evaluation items per suite")
    p.add_argument("--calibration-n", type=int, default=16)
    p.add_argument("--suite-seed", type=int, default=None, help="evaluation items (default: suites.EVAL_SEED)")
    p.add_argument("--out", default="toyworld_safety")
    args = parse_args(p, argv, "benchmarks/toyworld_safety.py")

    import jax
    import numpy as np

    from PIL import Image

    from jaxdit.convert.checkpoint import check_writable
    from jaxdit.pipeline import save_png
    from jaxdit.safety import evaluate as ev
    from jaxdit.toyworld import methods as tm
    from jaxdit.toyworld.detector import Detector
    from jaxdit.toyworld.pipeline import ToyWorld
    from jaxdit.toyworld.suites import build_suite

    names = tuple(args.methods.split(","))
    for name in names:
        try:
            tm.check_method(name)
        except ValueError as e:
            raise SystemExit(f"benchmarks/toyworld_safety.py: --methods: {e}") from None
    out = Path(args.out).absolute()
    check_writable(out, "--out")
    t0 = time.perf_counter()
    tw, det = ToyWorld.load(args.weights), Detector.load(args.weights)
    result = tm.evaluate(tw, det, names, args.concept, args.n, args.suite_seed, n_calibration=args.calibration_n)
    prepared = {name: result["prepared"][name] for name in names}
    timing_items = build_suite(args.concept, "explicit", 16, 123_457)
    overhead = tm.overhead(tw, prepared, timing_items)
    table = comparison_table(result, overhead)
    print(table)
    summary = {k: v for k, v in result.items() if k not in ("methods", "items", "images", "prepared")}
    summary.update(methods={name: {"summary": m["summary"], **m["prepared"]} for name, m in result["methods"].items()},
                   overhead=overhead, seconds=round(time.perf_counter() - t0, 1),
                   hardware=f"{platform.machine()} {jax.default_backend().upper()}, {jax.device_count()} device(s)",
                   weights=tw.info.get("reproduce", ""), config=args.config)
    ev.write_json(summary, out / "summary.json")
    ev.write_text(table + "\n", out / "table.md")
    save_png(Image.fromarray(tm.example_grid(result)), out / "examples.png")
    if "uvr" in prepared:  # the start-up stage on this model: one prompt and one edit of the calibration split
        from jaxdit.safety.uvr.analyze import write_report
        from jaxdit.toyworld import uvr
        from jaxdit.toyworld.scenes import render
        from jaxdit.toyworld.suites import CALIBRATION_SEED

        bank = prepared["uvr"].artifacts["bank"]
        bank.save(out / "uvr_bank")
        item = build_suite(args.concept, "explicit", 1, CALIBRATION_SEED)[0]
        write_report(uvr.startup_analysis(tw, bank, item.prompt, item.seed), out / "uvr_startup" / "t2i")
        edit = build_suite(args.concept, "benign_edits", 1, CALIBRATION_SEED)[0]
        write_report(uvr.startup_analysis(tw, bank, edit.prompt, edit.seed, render(edit.source)),
                     out / "uvr_startup" / "edit")
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s); example columns: source, "
          f"{', '.join(['unprotected', *[n for n in names if n != 'none']])}")
    return 0 if np.isfinite(summary["seconds"]) else 1


if __name__ == "__main__":
    sys.exit(main())
