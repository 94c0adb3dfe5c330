"""The `jaxdit` command line.

    jaxdit convert SRC OUT [--dtype bfloat16] [--overwrite]
    jaxdit parity (--preset NAME | --model DIR) [--dtype float32|bfloat16] [--json]
    jaxdit positions (--preset NAME | --model DIR) [--size N] [--text-tokens N] [--context] [--json]
    jaxdit generate --model DIR --prompt TEXT --out PNG [--seed --steps --size --guidance --dtype]
    jaxdit edit --model DIR --image IN --prompt TEXT --out PNG [...]
    jaxdit uvr anchors --model DIR --concept NAME --prompts FILE --out BANK
    jaxdit safety eval --model DIR --prompts CSV --method none|uvr [--uvr BANK] --out RUN
    jaxdit safety compare BASE_RUN METHOD_RUN
    jaxdit safedig route|train|adapt|generate ...
    jaxdit sae harvest|train|export|import ...
    (generate / edit take --uvr BANK to restrict that concept)
    jaxdit --config experiments/toyworld/phase3_pairs.toml [--steps 10 --run DIR ...]
    (re-runs an experiment file: its command and options, then the flags given after it, which win)

Errors in the input (a missing file, a bad checkpoint, a wrong flag value) print one line naming what is
wrong, "jaxdit SUBCOMMAND: error: ...", and exit with status 2, before any work where they can be known
before it; nothing half-written is left behind. Warnings print one line each, "jaxdit SUBCOMMAND:
warning: ...". docs/errors.md lists them.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings


from jaxdit import experiment
from jaxdit.flags import Parser, UsageError, finite_float, non_negative_float, positive_int, read_image, seed_int


def _convert(args) -> int:
    from jaxdit.convert import convert
    from jaxdit.convert.loader import config_from_file

    config = None if args.config is None else config_from_file(args.config)
    out = convert(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite, config=config,
                  allow_nonfinite=args.allow_nonfinite)
    print(f"wrote {out}")
    return 0


def _parity(args) -> int:
    from jaxdit.parity import run_component_parity, run_parity, write_json

    if args.json not in (None, "-"):
        from jaxdit.convert.checkpoint import check_writable

        check_writable(args.json, "--json")
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


def _positions(args) -> int:
    from jaxdit.configs import get_config
    from jaxdit.positions import hook_positions, table

    if args.preset is not None:
        config = get_config(args.preset)
    else:
        from jaxdit.convert.loader import read_config

        config = read_config(args.model)
    height, width = args.size
    rows = hook_positions(config, height, width, args.text_tokens, args.context, args.batch)
    if args.json:
        print(json.dumps([{"position": r.pattern, "shape": list(r.shape), "dtype": r.dtype, "layers": list(r.layers)}
                          for r in rows], indent=2))
    else:
        print(table(rows))
    return 0


def _size(text: str) -> tuple[int, int]:
    """'1024' or 'WIDTHxHEIGHT' -> (height, width)."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected N or WIDTHxHEIGHT in positive pixels, got {text!r}")
    return (parts[0], parts[0]) if len(parts) == 1 else (parts[1], parts[0])


def _outputs(out: str, n: int) -> list[str]:
    if n == 1:
        return [out]
    stem, dot, ext = out.rpartition(".")
    return [f"{stem}_{i}.{ext}" for i in range(n)]


def _edit_sizes(pipe, image, args) -> dict:
    """The edit's size arguments, printed before they are used. With --size WxH the output is WxH and the
    auto-resized context image has W*H pixels (at the preferred Kontext aspect nearest the input's);
    without --size the sizes are diffusers' (context at a preferred resolution of about 1024x1024, output
    about 1024x1024 pixels at the context's aspect). --no-auto-resize keeps the input's own size for the
    context and, without --size, for the output."""
    kw = {"auto_resize": not args.no_auto_resize}
    if args.size is not None:
        kw.update(height=args.size[0], width=args.size[1], max_area=args.size[0] * args.size[1],
                  context_area=args.size[0] * args.size[1])
    elif args.no_auto_resize:
        (w, h), _ = pipe.edit_sizes(image.size, auto_resize=False)
        kw.update(height=h, width=w, max_area=w * h)
    (cw, ch), (ow, oh) = pipe.edit_sizes(image.size, **kw)
    f = 2 * pipe.vae_scale_factor
    print(f"context image {image.size[0]}x{image.size[1]} -> {cw}x{ch} ({cw // f * (ch // f)} tokens); "
          f"output {ow}x{oh} ({ow // f * (oh // f)} tokens)")
    return kw


def _generate(args, editing: bool = False) -> int:
    from jaxdit.convert.checkpoint import check_writable
    from jaxdit.pipeline import load_pipeline, save_png
    from jaxdit.safety.cli import erasure_hooks
    from jaxdit.safety.uvr.cli import controller_from_args

    if not args.out.lower().endswith(".png"):
        raise ValueError(f"--out {args.out}: must name a .png file")
    check_writable(args.out, "--out")
    image = read_image(args.image) if editing else None
    controller = controller_from_args(args, editing)
    erase = erasure_hooks(args.erase) if args.erase else None
    pipe = load_pipeline(args.model, dtype=args.dtype, editing=editing)
    kw = dict(num_inference_steps=args.steps, seed=args.seed, num_images_per_prompt=args.num_images)
    if args.guidance is not None:
        kw["guidance_scale"] = args.guidance
    if args.max_sequence_length is not None:
        kw["max_sequence_length"] = args.max_sequence_length
    if controller is not None:
        kw["controller"] = controller
    if erase is not None:
        kw["hooks"] = erase(pipe)
    if editing:
        images = pipe(image, args.prompt, **kw, **_edit_sizes(pipe, image, args))
    else:
        if args.size is not None:
            kw["height"], kw["width"] = args.size
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

    p = Parser(prog="jaxdit", description="FLUX.1 / SD3.x diffusion transformers in JAX")
    experiment.add_option(p, dest="experiment")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a PyTorch checkpoint (safetensors) to a jaxdit orbax checkpoint",
                       description="SRC: a diffusers model or pipeline folder, or an original single-file "
                                   ".safetensors checkpoint. OUT: the checkpoint directory to create.")
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="cast floating parameters (default: keep the checkpoint's dtype)")
    c.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    c.add_argument("--allow-nonfinite", action="store_true",
                   help="write weights holding NaN or inf (refused by default, naming the first such tensor)")
    c.add_argument("--config", metavar="JSON",
                   help="the transformer's config (diffusers config.json or jaxdit JSON) where a single file "
                        "does not say it, e.g. SD3 without qk-norm whose width is not 64 x depth")
    c.set_defaults(fn=_convert)

    r = sub.add_parser("parity", help="per-block numerical comparison against the diffusers model")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS), help="random weights from a preset config")
    src.add_argument("--model", help="a diffusers transformer or pipeline folder (real weights)")
    r.add_argument("--component", default="transformer",
                   choices=["transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae", "pipeline"],
                   help="which part of a --model pipeline folder to compare (default: the transformer)")
    r.add_argument("--steps", type=positive_int, default=4, help="denoising steps for --component pipeline")
    r.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    r.add_argument("--batch", type=positive_int, default=1)
    r.add_argument("--height", type=positive_int, help="image height in pixels (multiple of 16)")
    r.add_argument("--width", type=positive_int, help="image width in pixels (multiple of 16)")
    r.add_argument("--text-tokens", type=positive_int, help="text sequence length")
    r.add_argument("--kontext", action="store_true", help="append Kontext context-image tokens")
    r.add_argument("--seed", type=seed_int, default=0)
    r.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="write the report as JSON to FILE (or stdout when no FILE is given)")
    r.add_argument("--max-rel", type=non_negative_float, help="exit 1 if the output relative error exceeds this")
    r.set_defaults(fn=_parity)

    q = sub.add_parser("positions", help="every hook position of a model and its shape for a size and text length",
                       description="Shapes are traced through the model's forward (nothing is computed or "
                                   "loaded but the config); names are those of --capture, harvest and SAEs.")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS))
    src.add_argument("--model", help="a jaxdit checkpoint, diffusers transformer folder or pipeline folder")
    q.add_argument("--size", type=_size, default=(1024, 1024), help="N or WIDTHxHEIGHT in pixels (default 1024)")
    q.add_argument("--text-tokens", type=positive_int,
                   help="text sequence length (default: 512 for FLUX, 333 for SD3: CLIP 77 + T5 256)")
    q.add_argument("--context", action="store_true", help="with Kontext context-image tokens (FLUX)")
    q.add_argument("--batch", type=positive_int, default=1)
    q.add_argument("--json", action="store_true", help="print JSON instead of the table")
    q.set_defaults(fn=_positions)

    for name, editing in (("generate", False), ("edit", True)):
        g = sub.add_parser(name, help="edit an image with FLUX.1 Kontext" if editing else "text-to-image",
                           description="MODEL is a local diffusers pipeline folder (model_index.json); its "
                                       "transformer/ may be a jaxdit checkpoint written by `jaxdit convert`.")
        g.add_argument("--model", required=True)
        if editing:
            g.add_argument("--image", required=True, help="input image (PNG, JPEG, ...)")
            g.add_argument("--no-auto-resize", action="store_true",
                           help="keep the input's size for the context image (and, without --size, the output) "
                                "instead of Kontext's preferred resolutions")
        g.add_argument("--prompt", required=True)
        g.add_argument("--out", required=True, help="output .png (with --num-images N: OUT_i.png)")
        g.add_argument("--seed", type=seed_int, default=0)
        g.add_argument("--steps", type=positive_int, default=28)
        g.add_argument("--size", type=_size, help="N or WIDTHxHEIGHT in pixels (default: the model's)" + (
            "; the output size, and the pixel count the context image is auto-resized to" if editing else ""))
        g.add_argument("--guidance", type=finite_float, help="guidance scale (default: the pipeline's)")
        g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
        g.add_argument("--num-images", type=positive_int, default=1)
        g.add_argument("--max-sequence-length", type=positive_int)
        g.add_argument("--erase", metavar="FILE", help="erase a concept from the pooled text vector (a file of "
                                                       "`jaxdit safety erase`); combines with --uvr")
        uvr_cli.add_generation_options(g)
        g.set_defaults(fn=lambda a, e=editing: _generate(a, e))
    uvr_cli.register(sub)
    safety_cli.register(sub)
    safedig_cli.register(sub)
    sae_cli.register(sub)
    toyworld_cli.register(sub)
    return p


def _command_name(args) -> str:
    """'jaxdit sae train': the command and its sub-command, for messages."""
    sub = getattr(args, f"{args.command}_command", None)
    return " ".join(["jaxdit", args.command] + ([sub] if sub else []))


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(experiment.expand(parser, sys.argv[1:] if argv is None else argv, "jaxdit"))
    except experiment.ExperimentError as e:
        print(f"jaxdit: error: {e}", file=sys.stderr)
        return 2
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    from jaxdit.convert.safetensors_io import CheckpointError

    from tqdm.auto import tqdm

    name = _command_name(args)
    with warnings.catch_warnings():
        # one line each, clear of any progress bar on the terminal
        warnings.showwarning = lambda message, *_, **__: tqdm.write(f"{name}: warning: {message}", file=sys.stderr)
        try:
            return args.fn(args)
        except (CheckpointError, OSError, ValueError, KeyError) as e:
            message = e.args[0] if isinstance(e, KeyError) and e.args else e
            print(f"{name}: error: " + " ".join(str(message).splitlines()), file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
