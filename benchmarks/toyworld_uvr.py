"""UVR efficacy on the toy world: erase rates per concept suite, preservation on the safe suite.

    python benchmarks/toyworld_uvr.py --concept star --n 64 --out toyworld_uvr.json --report uvr_report/

1. anchor banks (text-to-image and editing) from calibration runs of the unprotected model
   (`jaxdit.toyworld.uvr.build_bank`, items from the calibration seed stream);
2. the method's constants picked on calibration items (`calibrate`: best erase rate whose safe-suite
   accuracy drops <= 2 points), never on the evaluation items;
3. every evaluation suite without and with UVR from the same seeds: presence, erase rate, requested-object
   accuracy, pixel and detector-feature distance;
4. with --report: the start-up stage analysis of one prompt and one edit (JSON + PNG) and the bank.

Prints the calibration rows and the table and writes JSON (atomically).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", help="toy-world weights folder (default: the committed one)")
    p.add_argument("--concept", default="star", help="forbidden shape or colour")
    p.add_argument("--n", type=int, default=64, help="evaluation items per suite")
    p.add_argument("--calibration-n", type=int, default=16, help="calibration items per suite")
    p.add_argument("--bank-n", type=int, default=48, help="calibration runs per anchor bank")
    p.add_argument("--settings", choices=["calibrate", "reference"], default="calibrate",
                   help="calibrate the constants, or use the reference values as they are")
    p.add_argument("--out", default="toyworld_uvr.json")
    p.add_argument("--report", help="folder for the bank and the start-up analysis (JSON + PNG)")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from jaxdit.safety import evaluate as ev
    from jaxdit.safety.uvr.analyze import write_report
    from jaxdit.toyworld import uvr
    from jaxdit.toyworld.detector import Detector
    from jaxdit.toyworld.evaluation import run_suites
    from jaxdit.toyworld.pipeline import ToyWorld
    from jaxdit.toyworld.scenes import render
    from jaxdit.toyworld.suites import CALIBRATION_SEED, build_suite, build_suites

    t0 = time.perf_counter()
    tw, det = ToyWorld.load(args.weights), Detector.load(args.weights)
    bank = uvr.build_bank(tw, det, args.concept, n=args.bank_n)
    print(f"anchor banks: t2i threshold {bank.meta['t2i_threshold']:.3f} (F1 {bank.meta['t2i_f1']:.2f}), "
          f"edit threshold {bank.meta['edit_threshold']:.3f} (F1 {bank.meta['edit_f1']:.2f})", flush=True)
    rows = []
    settings = {}
    if args.settings == "calibrate":
        settings, rows = uvr.calibrate(tw, det, bank, n=args.calibration_n)
    print(f"settings: {settings or 'reference constants'}", flush=True)
    records = run_suites(tw, det, build_suites(args.concept, args.n), args.concept,
                         method=uvr.uvr_method(bank, **settings))
    summary = ev.summarize(records)
    seconds = time.perf_counter() - t0
    print(f"UVR on the toy world, forbidden concept {args.concept!r}, {args.n} items per suite")
    print(ev.format_table(summary))
    result = {"concept": args.concept, "n": args.n, "settings": settings, "calibration": rows,
              "bank": bank.meta, "summary": summary, "seconds": round(seconds, 1),
              "hardware": f"{platform.machine()} {jax.default_backend().upper()}, {jax.device_count()} device(s)",
              "weights": tw.info.get("reproduce", "")}
    if args.report:
        report = Path(args.report)
        bank.save(report / "bank")
        prompt = build_suite(args.concept, "explicit", 1, CALIBRATION_SEED)[0]
        write_report(uvr.startup_analysis(tw, bank, prompt.prompt, prompt.seed), report / "t2i")
        edit = build_suite(args.concept, "benign_edits", 1, CALIBRATION_SEED)[0]
        write_report(uvr.startup_analysis(tw, bank, edit.prompt, edit.seed, render(edit.source)), report / "edit")
        result["report"] = str(report)
    ev.write_json(result, args.out)
    print(f"wrote {args.out} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
