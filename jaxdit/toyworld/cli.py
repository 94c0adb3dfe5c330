"""`jaxdit toyworld train|demo|eval`.

    jaxdit toyworld train --run DIR [--seed 0 --steps 3000] [--export jaxdit/toyworld/weights]
    jaxdit toyworld train --detector [--seed 0] [--export jaxdit/toyworld/weights]
    jaxdit toyworld demo [--weights DIR] [--out toyworld_demo.png] [--seed 0 --steps 12]
    jaxdit toyworld eval [--concept star] [--method none|uvr] [--n 32] [--out DIR]
"""

from __future__ import annotations

import sys


def register(sub) -> None:
    from jaxdit.toyworld.train import DEFAULTS

    t = sub.add_parser("toyworld", help="the rendered toy world: a small trained FLUX model with exact detectors")
    tsub = t.add_subparsers(dest="toyworld_command", required=True)
    tr = tsub.add_parser("train", help="train the toy-world transformer + text encoder (or --detector)")
    tr.add_argument("--run", help="run directory (training state, log.jsonl); resumed if it exists")
    tr.add_argument("--detector", action="store_true", help="train the shape/colour detector instead")
    tr.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    tr.add_argument("--steps", type=int, help=f"default {DEFAULTS['steps']} (detector: 3000)")
    tr.add_argument("--export", metavar="DIR", help="write the weights folder here when done")
    tr.add_argument("--export-only", action="store_true", help="export the latest state of --run, do not train")
    tr.add_argument("--weights-from", choices=["ema", "params"], default="ema",
                    help="with --export-only: export the (debiased) EMA or the raw parameters")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(fn=_train)
    d = tsub.add_parser("demo", help="generate a grid for a few prompts and edits; print the detector's reading")
    d.add_argument("--weights", help="weights folder (default: the committed one)")
    d.add_argument("--out", default="toyworld_demo.png")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--steps", type=int, default=12, help="Euler steps")
    d.set_defaults(fn=_demo)
    e = tsub.add_parser("eval", help="run the concept suites without and with a safety method; table + JSON")
    e.add_argument("--weights", help="weights folder (default: the committed one)")
    e.add_argument("--concept", default="star", help="forbidden shape or colour (default: star)")
    e.add_argument("--n", type=int, default=32, help="items per suite")
    e.add_argument("--suites", default="all", help="comma-separated suite names (default: all)")
    e.add_argument("--steps", type=int, default=12)
    e.add_argument("--guidance", type=float, default=1.0)
    e.add_argument("--method", choices=["none", "uvr"], default="none",
                   help="uvr: UVR with the toy-world bank and constants (jaxdit.toyworld.uvr)")
    e.add_argument("--bank", help="with --method uvr: a saved toy-world bank folder (default: built from "
                                  "calibration runs of the model, about a minute)")
    e.add_argument("--out", help="write summary.json and records.jsonl into this folder")
    e.set_defaults(fn=_eval)


def _command() -> str:
    return "jaxdit " + " ".join(sys.argv[1:])


def _train(args) -> int:
    import json

    if args.detector:
        from jaxdit.toyworld.detector import train_detector

        if not args.export:
            raise ValueError("--detector needs --export DIR (the weights folder to write detector/ into)")
        info = train_detector(args.export, seed=args.seed, steps=args.steps or 3000, progress=not args.no_progress,
                              command=_command())
        print(json.dumps(info, indent=2))
        return 0
    if not args.run:
        raise ValueError("--run DIR is required (where the training state goes)")
    if args.export_only:
        from jaxdit.toyworld.train import export_from_run

        if not args.export:
            raise ValueError("--export-only needs --export DIR")
        info = export_from_run(args.run, args.export, command=_command(), which=args.weights_from)
    else:
        from jaxdit.toyworld.train import DEFAULTS, train

        info = train(args.run, seed=args.seed, steps=args.steps or DEFAULTS["steps"], export=args.export,
                     command=_command(), progress=not args.no_progress)
    print(json.dumps(info, indent=2))
    return 0


def _demo(args) -> int:
    from jaxdit.toyworld.demo import run_demo

    run_demo(args.weights, args.out, seed=args.seed, steps=args.steps)
    return 0


def _eval(args) -> int:
    import json
    from pathlib import Path

    from jaxdit.safety import evaluate as ev
    from jaxdit.toyworld.detector import Detector
    from jaxdit.toyworld.evaluation import run_suites
    from jaxdit.toyworld.pipeline import ToyWorld
    from jaxdit.toyworld.suites import SUITES, Concept, build_suites

    concept = Concept.parse(args.concept)
    names = SUITES if args.suites == "all" else tuple(args.suites.split(","))
    tw, det = ToyWorld.load(args.weights), Detector.load(args.weights)
    method = None
    if args.method == "uvr":
        from jaxdit.toyworld import uvr

        bank = uvr.Bank.load(args.bank) if args.bank else uvr.build_bank(tw, det, concept, steps=args.steps)
        if bank.concept != concept.value:
            raise ValueError(f"--bank {args.bank} is for {bank.concept!r}, not --concept {concept.value!r}")
        method = uvr.uvr_method(bank, **uvr.SETTINGS)
    records = run_suites(tw, det, build_suites(concept, args.n, names), concept, method=method, steps=args.steps,
                         guidance=args.guidance)
    summary = ev.summarize(records)
    print(f"forbidden concept: {concept.kind} {concept.value}; method {args.method}; {args.n} items per suite, "
          f"{args.steps} steps, guidance {args.guidance}")
    print(ev.format_table(summary))
    if args.out:
        out = Path(args.out)
        ev.write_json({"concept": concept.value, "method": args.method, "n": args.n, "steps": args.steps,
                       "guidance": args.guidance, "summary": summary}, out / "summary.json")
        (out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return 0
