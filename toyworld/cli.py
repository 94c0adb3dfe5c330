"""`jaxdit toyworld train|demo|eval`.

    jaxdit toyworld train --run DIR [--seed 0 --steps 3000] [--export toyworld/weights]
    jaxdit toyworld train --detector [--seed 0] [--export toyworld/weights]
    jaxdit toyworld demo [--weights DIR] [--out toyworld_demo.png] [--seed 0 --steps 12]
    jaxdit toyworld eval [--concept star] [--method none|uvr] [--n 32] [--out DIR]
"""

from __future__ import annotations

import sys


def register(sub) -> None:
    from jaxdit.flags import finite_float, fraction_below_one, non_negative_int, positive_float, positive_int, seed_int
    from jaxdit.toyworld.pipeline import DEFAULT_GUIDANCE
    from jaxdit.toyworld.train import DEFAULTS, POOLED

    t = sub.add_parser("toyworld", help="the rendered toy world: a small trained FLUX model with exact detectors")
    tsub = t.add_subparsers(dest="toyworld_command", required=True)
    tr = tsub.add_parser("train", help="train the toy-world transformer + text encoder (or --detector)")
    tr.add_argument("--run", help="run directory (training state, log.jsonl); resumed if it exists")
    tr.add_argument("--detector", action="store_true", help="train the shape/colour detector instead")
    tr.add_argument("--seed", type=seed_int, default=DEFAULTS["seed"])
    tr.add_argument("--steps", type=positive_int, help=f"default {DEFAULTS['steps']} (detector: 3000)")
    for name, kind in (("t2i_batch", positive_int), ("edit_batch", positive_int), ("warmup", non_negative_int),
                       ("lr", positive_float), ("ema", fraction_below_one)):
        tr.add_argument("--" + name.replace("_", "-"), type=kind, default=DEFAULTS[name],
                        help=f"default {DEFAULTS[name]}")
    tr.add_argument("--mix", default=DEFAULTS["mix"], help="training data mix, a jaxdit.toyworld.data.MIXES name: "
                    "uniform (default), binding (more 2-3 object scenes and replace edits), pairs (mostly 2-object scenes)")
    tr.add_argument("--pooled", choices=POOLED, default=DEFAULTS["pooled"],
                    help="the transformer's pooled-text input: mean (the masked mean of the text states, default) "
                         "or off (its projection held at zero: the prompt reaches the image only through attention), "
                         "or fade (from --init-from weights: that projection scaled from 1 to 0 over --fade-steps, "
                         "then held at zero)")
    tr.add_argument("--fade-steps", type=int, default=DEFAULTS["fade_steps"], metavar="N",
                    help="with --pooled fade: the steps over which the pooled-text input fades out")
    tr.add_argument("--init-from", metavar="DIR", help="start from this weights folder's transformer and text "
                    "encoder instead of random initialisation (a continued phase with its own schedule)")
    tr.add_argument("--eval-every", type=non_negative_int, default=0, metavar="N",
                    help="every N steps, sample a few items of every suite and append the prompt-following "
                         "metrics to RUN/curve.jsonl (needs a detector: --detector-weights)")
    tr.add_argument("--eval-n", type=positive_int, default=16, help="items per suite for --eval-every (default 16)")
    tr.add_argument("--detector-weights", metavar="DIR",
                    help="weights folder whose detector/ reads the learning curve (default: the committed one)")
    tr.add_argument("--export", metavar="DIR", help="write the weights folder here when done")
    tr.add_argument("--export-only", action="store_true", help="export the latest state of --run, do not train")
    tr.add_argument("--weights-from", choices=["ema", "params"], default="ema",
                    help="with --export-only: export the (debiased) EMA or the raw parameters")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(fn=_train)
    d = tsub.add_parser("demo", help="generate a grid for a few prompts and edits; print the detector's reading")
    d.add_argument("--weights", help="weights folder (default: the committed one)")
    d.add_argument("--out", default="toyworld_demo.png")
    d.add_argument("--seed", type=seed_int, default=0)
    d.add_argument("--steps", type=positive_int, default=12, help="Euler steps")
    d.add_argument("--guidance", type=finite_float, default=DEFAULT_GUIDANCE,
                   help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE}; 1 = none)")
    d.set_defaults(fn=_demo)
    e = tsub.add_parser("eval", help="run the concept suites without and with a safety method; table + JSON")
    e.add_argument("--weights", help="weights folder (default: the committed one)")
    e.add_argument("--concept", default="star", help="forbidden shape or colour (default: star)")
    e.add_argument("--n", type=positive_int, default=32, help="items per suite")
    e.add_argument("--suites", default="all", help="comma-separated suite names (default: all)")
    e.add_argument("--steps", type=positive_int, default=12)
    e.add_argument("--guidance", type=finite_float, default=DEFAULT_GUIDANCE,
                   help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE}; 1 = none)")
    e.add_argument("--method", default="none",
                   help="comma-separated, any of: none, uvr, uvr-reference, safedig, uvr+safedig, keyword-filter, "
                        "negative-prompt, sld, pooled-erase, or compositions a+b (see jaxdit.toyworld.methods); each "
                        "calibrated on its own items")
    e.add_argument("--suite-seed", type=seed_int, help="seed of the evaluation items (default: the suites' "
                                                  "EVAL_SEED); any other seed draws fresh items")
    e.add_argument("--calibration-n", type=positive_int, default=16,
                   help="calibration items per unsafe suite for the methods' constants (default 16)")
    e.add_argument("--out", help="write summary.json, records.jsonl and examples.png into this folder")
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

        detector = None
        if args.eval_every:
            from jaxdit.toyworld.detector import Detector

            detector = Detector.load(args.detector_weights)
        info = train(args.run, seed=args.seed, steps=args.steps or DEFAULTS["steps"], t2i_batch=args.t2i_batch,
                     edit_batch=args.edit_batch, lr=args.lr, warmup=args.warmup, ema=args.ema,
                     mix=args.mix, init_from=args.init_from, pooled=args.pooled, fade_steps=args.fade_steps,
                     eval_every=args.eval_every, eval_n=args.eval_n, detector=detector, export=args.export,
                     command=_command(), progress=not args.no_progress)
    print(json.dumps(info, indent=2))
    return 0


def _demo(args) -> int:
    from jaxdit.toyworld.demo import run_demo

    run_demo(args.weights, args.out, seed=args.seed, steps=args.steps, guidance=args.guidance)
    return 0


def _eval(args) -> int:
    import json
    from pathlib import Path

    from PIL import Image

    from jaxdit.convert.checkpoint import check_writable
    from jaxdit.pipeline import save_png
    from jaxdit.safety import evaluate as ev
    from jaxdit.toyworld.detector import Detector
    from jaxdit.toyworld.methods import check_method, evaluate, example_grid
    from jaxdit.toyworld.pipeline import ToyWorld
    from jaxdit.toyworld.suites import SUITES, Concept

    concept = Concept.parse(args.concept)
    names = SUITES if args.suites == "all" else tuple(args.suites.split(","))
    unknown = [s for s in names if s not in SUITES]
    if unknown:
        raise ValueError(f"--suites: unknown suite(s) {unknown}; expected some of {list(SUITES)}")
    methods = tuple(m.strip() for m in args.method.split(","))
    for m in methods:
        try:
            check_method(m)
        except ValueError as e:
            raise ValueError(f"--method: {e}") from None
    out = Path(args.out).absolute() if args.out else None
    if out is not None:
        check_writable(out, "--out")
    tw, det = ToyWorld.load(args.weights), Detector.load(args.weights)
    result = evaluate(tw, det, methods, concept, args.n, args.suite_seed, names, args.calibration_n, args.steps,
                      guidance=args.guidance)
    print(f"forbidden concept: {concept.kind} {concept.value}; {args.n} items per suite (suite seed "
          f"{result['suite_seed']}), {args.steps} steps, guidance {args.guidance}")
    for name, m in result["methods"].items():
        print(f"\n[{name}] settings: {m['prepared']['settings'] or '-'}")
        print(ev.format_table(m["summary"]))
    if out is not None:
        summary = {k: v for k, v in result.items() if k not in ("methods", "items", "images", "prepared")}
        summary["steps"], summary["guidance"] = args.steps, args.guidance
        summary["methods"] = {name: {"summary": m["summary"], "sampling_seconds": m["sampling_seconds"],
                                     **m["prepared"]} for name, m in result["methods"].items()}
        ev.write_json(summary, out / "summary.json")
        lines = "".join(json.dumps({"method": name, **r}) + "\n" for name, m in result["methods"].items()
                        for r in m["records"])
        ev.write_text(lines, out / "records.jsonl")
        save_png(Image.fromarray(example_grid(result)), out / "examples.png")
        print(f"\nwrote {out}/summary.json, records.jsonl, examples.png")
    return 0
