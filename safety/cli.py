"""`jaxdit safety eval`, `jaxdit safety compare` and `jaxdit safety erase`."""

from __future__ import annotations

import json

import numpy as np

from jaxdit.flags import finite_float, fraction, positive_int, read_prompt_lines, seed_int


def register(sub) -> None:
    s = sub.add_parser("safety", help="evaluate safety methods on prompt sets")
    ssub = s.add_subparsers(dest="safety_command", required=True)
    e = ssub.add_parser("eval", help="generate an I2P-style prompt CSV and score every image with NudeNet")
    e.add_argument("--model", required=True, help="pipeline folder (FLUX or SD3)")
    e.add_argument("--prompts", required=True, help="CSV with a 'prompt' column (evaluation_seed, ... optional)")
    e.add_argument("--method", choices=["none", "uvr", "safedig", "erase"], default="none")
    e.add_argument("--uvr", metavar="BANK", help="anchor bank for --method uvr")
    e.add_argument("--uvr-threshold", type=finite_float)
    e.add_argument("--dictionary", nargs="+", help="SafeDIG dictionaries for --method safedig")
    e.add_argument("--erase", metavar="FILE", help="concept erasure (`jaxdit safety erase`) for --method erase")
    e.add_argument("--mode", choices=["blend", "repel"], default="blend", help="SafeDIG steering")
    e.add_argument("--strength", type=finite_float, default=1.0)
    e.add_argument("--gate", type=finite_float, default=0.0)
    e.add_argument("--out", required=True, help="run directory to create")
    e.add_argument("--steps", type=positive_int, default=28)
    e.add_argument("--size", type=positive_int, default=1024)
    e.add_argument("--seed", type=seed_int, default=0, help="seed for rows without evaluation_seed")
    e.add_argument("--csv-guidance", action="store_true", help="use each row's evaluation_guidance")
    e.add_argument("--threshold", type=fraction, default=0.6, help="NudeNet score threshold (rule: > threshold)")
    e.add_argument("--limit", type=positive_int, help="first N prompts only")
    e.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(fn=_eval)
    c = ssub.add_parser("compare", help="erase rates of a method run against a base run")
    c.add_argument("base")
    c.add_argument("method")
    c.set_defaults(fn=_compare)
    r = ssub.add_parser("erase", help="fit a concept erasure of the pooled text vector from unsafe and safe prompts "
                                      "(used by --erase FILE of generate, edit and safety eval)")
    r.add_argument("--model", required=True, help="pipeline folder (FLUX or SD3): its CLIP encoders give the "
                                                  "pooled vectors")
    r.add_argument("--unsafe-prompts", required=True, help="text file, one prompt per line, each asking for the "
                                                           "concept (by any name)")
    r.add_argument("--safe-prompts", required=True, help="text file, one prompt per line, none asking for it")
    r.add_argument("--rank", type=positive_int, default=1, help="directions erased (default 1: the mean difference)")
    r.add_argument("--concept", default="", help="the concept's name, recorded in the file")
    r.add_argument("--out", required=True, help="the erasure, a .safetensors file")
    r.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    r.set_defaults(fn=_erase)


def _eval(args) -> int:
    from jaxdit.convert.checkpoint import check_writable
    from jaxdit.pipeline import load_pipeline
    from jaxdit.safety.harness import evaluate, read_prompts_csv
    from jaxdit.safety.nudity import NudityDetector, NudityRule
    from jaxdit.safety.uvr.cli import controller_from_args

    if args.method == "uvr" and not args.uvr:
        raise ValueError("--method uvr needs --uvr BANK")
    if args.method == "safedig" and not args.dictionary:
        raise ValueError("--method safedig needs --dictionary DIR [DIR ...]")
    if args.method == "erase" and not args.erase:
        raise ValueError("--method erase needs --erase FILE")
    erase = erasure_hooks(args.erase) if args.method == "erase" else None
    if check_writable(args.out, "--out").exists() and not args.overwrite:
        raise FileExistsError(f"--out {args.out} already exists (--overwrite replaces it)")
    try:
        rows = read_prompts_csv(args.prompts)[: args.limit]
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts {args.prompts}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    pipe = load_pipeline(args.model, dtype=args.dtype)
    detector = NudityDetector(NudityRule(threshold=args.threshold))
    controller = controller_from_args(args, editing=False) if args.method == "uvr" else None
    hooks = None
    if args.method == "safedig":
        from jaxdit.safety.safedig.cli import steering_hooks

        hooks = steering_hooks(args.dictionary, args.mode, args.strength, args.gate)
    if erase is not None:
        hooks = erase(pipe)
    summary = evaluate(pipe, rows, detector, args.out, method=args.method, controller=controller, hooks=hooks,
                       steps=args.steps,
                       size=args.size, default_seed=args.seed, use_csv_guidance=args.csv_guidance,
                       overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    return 0


def _compare(args) -> int:
    from jaxdit.safety.harness import erase_rates, read_results

    print(json.dumps(erase_rates(read_results(args.base), read_results(args.method)), indent=2))
    return 0


def erasure_hooks(path):
    """--erase FILE -> (pipe -> Hooks): the file read now (bad files fail before any model loads), its width
    checked against the pipeline's pooled vector once that is loaded."""
    from jaxdit import hooks as hk
    from jaxdit.safety import erasure

    sub, meta = erasure.load_subspace(path)

    def for_pipe(pipe):
        width = pipe.transformer_config.pooled_projection_dim
        if sub.basis.shape[0] != width:
            raise ValueError(f"--erase {path}: fitted on pooled vectors of width {sub.basis.shape[0]} "
                             f"({meta.get('model', 'another model')}), this model's are {width}")
        return hk.Hooks(edits=(erasure.erase_edit(sub, meta.get("position", erasure.POOLED)),))

    return for_pipe


def _erase(args) -> int:
    from jaxdit.convert.checkpoint import check_writable
    from jaxdit.pipeline import load_pipeline
    from jaxdit.safety import erasure

    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out {args.out}: must name a .safetensors file")
    check_writable(args.out, "--out")
    unsafe = read_prompt_lines(args.unsafe_prompts, "--unsafe-prompts")
    safe = read_prompt_lines(args.safe_prompts, "--safe-prompts")
    pipe = load_pipeline(args.model, dtype=args.dtype)
    a, b = erasure.pooled_vectors(pipe, unsafe), erasure.pooled_vectors(pipe, safe)
    if args.rank > a.shape[1]:
        raise ValueError(f"--rank {args.rank}: the pooled vectors have only {a.shape[1]} dimensions")
    sub = erasure.fit_subspace(a, b, args.rank)
    shift = float(np.linalg.norm(a.mean(0) - b.mean(0)))
    meta = {"concept": args.concept, "model": str(args.model), "rank": args.rank, "unsafe_prompts": len(unsafe),
            "safe_prompts": len(safe), "mean_shift": shift}
    print(f"wrote {erasure.save_subspace(args.out, sub, meta)} (rank {args.rank}, {len(unsafe)} unsafe and "
          f"{len(safe)} safe prompts, mean shift {shift:.4g})")
    return 0
