"""The `jaxdit` command line.

    jaxdit convert SRC OUT [--dtype bfloat16] [--overwrite]
    jaxdit parity (--preset NAME | --model DIR) [--dtype float32|bfloat16] [--json]
    jaxdit generate --model DIR --prompt TEXT --out PNG [--seed --steps --size --guidance --dtype]
    jaxdit edit --model DIR --image IN --prompt TEXT --out PNG [...]
    jaxdit uvr anchors --model DIR --concept NAME --prompts FILE --out BANK
    jaxdit safety eval --model DIR --prompts CSV --method none|uvr [--uvr BANK] --out RUN
    jaxdit safety compare BASE_RUN METHOD_RUN
    jaxdit safedig route|train|adapt|generate ...
    jaxdit sae harvest|train|export|import ...
    (generate / edit take --uvr BANK to restrict that concept)

Errors in the input (a missing file, a bad checkpoint, a wrong flag value) print one line naming what is
wrong and exit with status 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import json
import sys


def _convert(args) -> int:
    from jaxdit.convert import convert

    out = convert(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _parity(args) -> int:
    from jaxdit.parity import run_component_parity, run_parity, write_json

    if args.component != "transformer":
        if args.model is None or args.dtype != "float32":
            raise ValueError(f"--component {args.component} compares a checkpoint folder (--model) at float32")
        report = run_component_parity(args.model, args.component, height=args.height, width=args.width,
                                      text_tokens=args.text_tokens, steps=args.steps, seed=args.seed)
    else:
        report = run_parity(preset=args.preset, model_dir=args.model, dtype=args.dtype, batch=args.batch,
                            height=args.height, width=args.width, text_tokens=args.text_tokens,
                            kontext=args.kontext, seed=args.seed)
    if args.json == "-":
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.table())
        print("timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in report.seconds.items()))
        if args.json:
            write_json(report, args.json)
    if args.max_rel is not None and report.output.rel > args.max_rel:
        print(f"FAIL: output relative error {report.output.rel:.3e} > --max-rel {args.max_rel:g}", file=sys.stderr)
        return 1
    return 0


def _size(text: str) -> tuple[int, int]:
    """'1024' or 'WIDTHxHEIGHT' -> (height, width)."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected N or WIDTHxHEIGHT") from None
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) == 2:
        return parts[1], parts[0]
    raise argparse.ArgumentTypeError(f"--size {text!r}: expected N or WIDTHxHEIGHT")


def _outputs(out: str, n: int) -> list[str]:
    if n == 1:
        return [out]
    stem, dot, ext = out.rpartition(".")
    return [f"{stem}_{i}.{ext}" for i in range(n)]


def _generate(args, editing: bool = False) -> int:
    from jaxdit.pipeline import load_pipeline, save_png

    if not args.out.lower().endswith(".png"):
        raise ValueError(f"--out {args.out}: must name a .png file")
    pipe = load_pipeline(args.model, dtype=args.dtype, editing=editing)
    kw = dict(num_inference_steps=args.steps, seed=args.seed, num_images_per_prompt=args.num_images)
    if args.guidance is not None:
        kw["guidance_scale"] = args.guidance
    if args.max_sequence_length is not None:
        kw["max_sequence_length"] = args.max_sequence_length
    if args.size is not None:
        kw["height"], kw["width"] = args.size
    from jaxdit.safety.uvr.cli import controller_from_args

    controller = controller_from_args(args, editing)
    if controller is not None:
        kw["controller"] = controller
    if editing:
        from PIL import Image, UnidentifiedImageError

        try:
            image = Image.open(args.image).convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"--image {args.image}: cannot read an image ({e})") from None
        if args.size is not None:
            kw["max_area"] = kw["height"] * kw["width"]
        images = pipe(image, args.prompt, auto_resize=not args.no_auto_resize, **kw)
    else:
        images = pipe(args.prompt, **kw)
    for image, path in zip(images, _outputs(args.out, len(images))):
        print(f"wrote {save_png(image, path)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from jaxdit.configs import PRESETS
    from jaxdit.safety import cli as safety_cli
    from jaxdit.safety.safedig import cli as safedig_cli
    from jaxdit.safety.uvr import cli as uvr_cli
    from jaxdit.train import cli as sae_cli
    from jaxdit.toyworld import cli as toyworld_cli

    p = argparse.ArgumentParser(prog="jaxdit", description="FLUX.1 / SD3.x diffusion transformers in JAX")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a PyTorch checkpoint (safetensors) to a jaxdit orbax checkpoint",
                       description="SRC: a diffusers model or pipeline folder, or an original single-file "
                                   ".safetensors checkpoint. OUT: the checkpoint directory to create.")
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="cast floating parameters (default: keep the checkpoint's dtype)")
    c.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    c.set_defaults(fn=_convert)

    r = sub.add_parser("parity", help="per-block numerical comparison against the diffusers model")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS), help="random weights from a preset config")
    src.add_argument("--model", help="a diffusers transformer or pipeline folder (real weights)")
    r.add_argument("--component", default="transformer",
                   choices=["transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae", "pipeline"],
                   help="which part of a --model pipeline folder to compare (default: the transformer)")
    r.add_argument("--steps", type=int, default=4, help="denoising steps for --component pipeline")
    r.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    r.add_argument("--batch", type=int, default=1)
    r.add_argument("--height", type=int, help="image height in pixels (multiple of 16)")
    r.add_argument("--width", type=int, help="image width in pixels (multiple of 16)")
    r.add_argument("--text-tokens", type=int, help="text sequence length")
    r.add_argument("--kontext", action="store_true", help="append Kontext context-image tokens")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="write the report as JSON to FILE (or stdout when no FILE is given)")
    r.add_argument("--max-rel", type=float, help="exit 1 if the output relative error exceeds this")
    r.set_defaults(fn=_parity)

    for name, editing in (("generate", False), ("edit", True)):
        g = sub.add_parser(name, help="edit an image with FLUX.1 Kontext" if editing else "text-to-image",
                           description="MODEL is a local diffusers pipeline folder (model_index.json); its "
                                       "transformer/ may be a jaxdit checkpoint written by `jaxdit convert`.")
        g.add_argument("--model", required=True)
        if editing:
            g.add_argument("--image", required=True, help="input image (PNG, JPEG, ...)")
            g.add_argument("--no-auto-resize", action="store_true",
                           help="keep the input size instead of Kontext's preferred resolutions")
        g.add_argument("--prompt", required=True)
        g.add_argument("--out", required=True, help="output .png (with --num-images N: OUT_i.png)")
        g.add_argument("--seed", type=int, default=0)
        g.add_argument("--steps", type=int, default=28)
        g.add_argument("--size", type=_size, help="N or WIDTHxHEIGHT in pixels (default: the model's)")
        g.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's)")
        g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
        g.add_argument("--num-images", type=int, default=1)
        g.add_argument("--max-sequence-length", type=int)
        uvr_cli.add_generation_options(g)
        g.set_defaults(fn=lambda a, e=editing: _generate(a, e))
    uvr_cli.register(sub)
    safety_cli.register(sub)
    safedig_cli.register(sub)
    sae_cli.register(sub)
    toyworld_cli.register(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from jaxdit.convert.safetensors_io import CheckpointError

    try:
        return args.fn(args)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"jaxdit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
