"""`jaxdit uvr ...` commands and the `--uvr BANK` option of `jaxdit generate` / `jaxdit edit`."""

from __future__ import annotations

import argparse

from jaxdit.flags import (finite_float, fraction, non_negative_float, positive_int, read_image, read_prompt_lines,
                          seed_int)


def register(sub) -> None:
    u = sub.add_parser("uvr", help="UVR: anchor banks for unsafe concepts")
    usub = u.add_subparsers(dest="uvr_command", required=True)
    a = usub.add_parser("anchors", help="collect an anchor bank for a concept from generations",
                        description="Generates each prompt (one per line of --prompts), captures the per-head "
                                    "attention output at --position over the start-up steps, selects the patches "
                                    "the concept's tokens attend to most, and clusters them per head.")
    a.add_argument("--model", required=True, help="FLUX pipeline folder")
    a.add_argument("--concept", required=True, help="the concept's words, as they appear in the prompts")
    a.add_argument("--prompts", required=True, help="text file, one prompt per line")
    a.add_argument("--out", required=True, help="output bank (.safetensors)")
    a.add_argument("--position", default="single.10.img.attn_heads")
    a.add_argument("--steps", type=positive_int, default=28)
    a.add_argument("--size", type=positive_int, default=1024)
    a.add_argument("--window-t", type=non_negative_float, default=850.0, help="start-up window: timesteps >= this")
    a.add_argument("--quantile", type=fraction, default=0.8, help="patches above this attention quantile")
    a.add_argument("--num-anchors", type=positive_int, default=16)
    a.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    a.add_argument("--seed", type=seed_int, default=0)
    a.set_defaults(fn=_anchors)
    z = usub.add_parser("analyze", help="start-up stage analysis: flows by step and block, localization IoU",
                        description="Generates (or edits, with --image) once, recording per step and block the "
                                    "attention flow from the concept's tokens (and context patches) into the "
                                    "unsafe region, and per step the localized mask's IoU with the final one.")
    z.add_argument("--model", required=True)
    z.add_argument("--bank", required=True, help="anchor bank (jaxdit uvr anchors)")
    z.add_argument("--prompt", required=True)
    z.add_argument("--concept", required=True)
    z.add_argument("--image", help="input image: analyse a Kontext edit")
    z.add_argument("--out", required=True, help="report directory (JSON + PNG)")
    z.add_argument("--steps", type=positive_int, default=28)
    z.add_argument("--size", type=positive_int, default=1024)
    z.add_argument("--threshold", type=finite_float, help="localization threshold (default 0.6, editing 0.2)")
    z.add_argument("--seed", type=seed_int, default=0)
    z.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    z.set_defaults(fn=_analyze)


def add_generation_options(g: argparse.ArgumentParser) -> None:
    g.add_argument("--uvr", metavar="BANK", help="restrict the concept of this UVR anchor bank")
    g.add_argument("--uvr-threshold", type=finite_float, help="localization threshold (default 0.6, editing 0.2)")


def controller_from_args(args, editing: bool):
    """The UVR controller for `--uvr BANK`, or None."""
    if not getattr(args, "uvr", None):
        return None
    import dataclasses

    import jax

    from jaxdit.safety.uvr import localize as loc
    from jaxdit.safety.uvr.anchors import load_bank
    from jaxdit.safety.uvr.regulate import RegulateConfig, UVRController

    anchors, meta = load_bank(args.uvr)
    cfg = loc.EDIT if editing else loc.T2I
    if args.uvr_threshold is not None:
        cfg = dataclasses.replace(cfg, threshold=args.uvr_threshold)
    return UVRController(jax.numpy.asarray(anchors), jax.random.key(args.seed), "edit" if editing else "t2i", cfg,
                         RegulateConfig(localize_at=meta["position"]))


def _anchors(args) -> int:
    from jaxdit.convert.checkpoint import check_writable
    from jaxdit.pipeline import FluxPipeline, load_pipeline
    from jaxdit.safety.uvr.anchors import collect, save_bank

    check_writable(args.out, "--out")
    prompts = read_prompt_lines(args.prompts, "--prompts")
    pipe = load_pipeline(args.model, dtype=args.dtype)
    if not isinstance(pipe, FluxPipeline):
        raise ValueError(f"{args.model}: UVR anchors need a FLUX pipeline")
    bank, meta = collect(pipe, prompts, args.concept, position=args.position, height=args.size, width=args.size,
                         num_inference_steps=args.steps, window_t=args.window_t, seed=args.seed,
                         quantile=args.quantile, num_anchors=args.num_anchors)
    meta["model"] = str(args.model)
    print(f"wrote {save_bank(args.out, bank, meta)} ({meta['vectors']} patch vectors -> {bank.shape})")
    return 0


def _analyze(args) -> int:
    import dataclasses

    from jaxdit.convert.checkpoint import check_writable
    from jaxdit.pipeline import FluxPipeline, load_pipeline
    from jaxdit.safety.uvr import localize as loc
    from jaxdit.safety.uvr.analyze import analyze, write_report
    from jaxdit.safety.uvr.anchors import load_bank

    check_writable(args.out, "--out")
    image = read_image(args.image) if args.image else None
    anchors, meta = load_bank(args.bank)
    pipe = load_pipeline(args.model, dtype=args.dtype, editing=args.image is not None)
    if not isinstance(pipe, FluxPipeline):
        raise ValueError(f"{args.model}: the analysis needs a FLUX pipeline")
    cfg = loc.EDIT if args.image else loc.T2I
    if args.threshold is not None:
        cfg = dataclasses.replace(cfg, threshold=args.threshold)
    kw = {} if image is None else {"max_area": args.size * args.size, "auto_resize": False}
    result = analyze(pipe, args.prompt, args.concept, anchors, position=meta["position"], image=image,
                     height=args.size, width=args.size, num_inference_steps=args.steps, seed=args.seed, config=cfg, **kw)
    out = write_report(result, args.out)
    print(f"wrote {out}: IoU with the final mask by step {[round(v, 2) for v in result['iou_with_final']]}")
    return 0
