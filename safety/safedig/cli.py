"""`jaxdit safedig route|train|adapt|generate`.

Activations come from `jaxdit sae harvest` runs, one run directory per data group, each holding one store
per position (`RUN/<position>/`):

    jaxdit safedig route --source-unsafe A --source-safe B --shift-unsafe C --shift-safe D --out routing.json
    jaxdit safedig train --unsafe A --safe B --position P --k 32 --expansion 8 --steps 2000 --out dict/
    jaxdit safedig adapt --dictionary dict/ --target C --steps 500 --out adapted/
    jaxdit safedig generate --model DIR --dictionary adapted/ --mode blend --prompt ... --out img.png
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxdit.flags import finite_float, positive_float, positive_int, seed_int
from jaxdit.safety.evaluate import write_json


def _rows(run, position: str, limit: int | None = None) -> np.ndarray:
    from jaxdit.train.store import open_source

    path = Path(run) / position
    if not path.exists():
        raise FileNotFoundError(f"{run}: no store for position {position!r} (expected {path})")
    src = open_source(path)
    rows = np.concatenate([np.asarray(src.read(i), np.float32) for i in range(len(src.pieces))])
    return rows[:limit] if limit else rows


def _positions(run) -> list[str]:
    return sorted(p.name for p in Path(run).iterdir() if (p / "manifest.json").is_file())


def _new_output(out, overwrite: bool = True) -> None:
    """Refuse `--out` before any work when it cannot be written, or exists and `overwrite` is off."""
    from jaxdit.convert.checkpoint import check_writable

    if check_writable(out, "--out").exists() and not overwrite:
        raise FileExistsError(f"--out {out} already exists (--overwrite replaces it)")


def _route(args) -> int:
    from jaxdit.safety.safedig.core import route

    _new_output(args.out)
    _new_output(Path(args.out).with_suffix(".png"))
    if len(args.shift_unsafe) != len(args.shift_safe):
        raise ValueError("give as many --shift-unsafe as --shift-safe runs")
    positions = args.positions or _positions(args.source_unsafe)
    candidates = {p: {"source": (_rows(args.source_unsafe, p, args.limit), _rows(args.source_safe, p, args.limit)),
                      "shifts": [(_rows(u, p, args.limit), _rows(s, p, args.limit))
                                 for u, s in zip(args.shift_unsafe, args.shift_safe)]} for p in positions}
    rows = route(candidates, top=args.top)
    write_json({"positions": rows, "score": "max(stability, 0) * separability"}, args.out)
    plot = Path(args.out).with_suffix(".png")
    _bar_chart(rows, plot)
    print(f"wrote {args.out} and {plot}")
    for r in rows:
        print(f"{'*' if r['chosen'] else ' '} {r['position']:<32} score {r['score']:9.4f}  stability "
              f"{r['stability']:7.4f}  separability {r['separability']:9.4f}")
    return 0


def _bar_chart(rows: list[dict], path) -> None:
    """Routing scores as a horizontal bar chart (PNG, chosen positions filled), drawn with PIL."""
    from PIL import Image, ImageDraw

    from jaxdit.pipeline import save_png

    width, bar, left = 640, 22, 260
    image = Image.new("RGB", (width, 40 + bar * len(rows)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), "SafeDIG routing: score = max(stability, 0) x separability", fill="black")
    top = max(max(r["score"] for r in rows), 1e-12)
    for i, r in enumerate(rows):
        y = 32 + i * bar
        draw.text((10, y + 4), r["position"], fill="black")
        length = int((width - left - 80) * r["score"] / top)
        draw.rectangle([left, y + 3, left + max(length, 1), y + bar - 3], outline="navy",
                       fill="navy" if r["chosen"] else "white")
        draw.text((left + length + 6, y + 4), f"{r['score']:.3g}", fill="black")
    save_png(image, path)


def load_dictionary(path):
    """(config, source params, adapted params, harmful latents, metadata) of a dictionary directory
    (`dictionary.Dictionary.load`). An unadapted dictionary has the same params twice."""
    from jaxdit.safety.safedig.dictionary import Dictionary

    d = Dictionary.load(path)
    return d.cfg, d.src, d.tgt, d.harmful, {"harmful_latents": d.harmful.tolist(), "position": d.position, **d.meta}


def _train(args) -> int:
    import jax.numpy as jnp

    from jaxdit.safety.safedig.core import harmful_latents
    from jaxdit.safety.safedig.dictionary import Dictionary, train_sae
    from jaxdit.train import sae as sae_lib, trainer

    _new_output(args.out, args.overwrite)
    unsafe, safe = _rows(args.unsafe, args.position), _rows(args.safe, args.position)
    d = unsafe.shape[1]
    cfg = sae_lib.SAEConfig(d_in=d, n_latents=d * args.expansion, k=args.k, position=args.position)
    if args.k > cfg.n_latents:
        raise ValueError(f"--k {args.k} exceeds the {cfg.n_latents} latents")
    tc = trainer.TrainConfig(steps=args.steps, batch_size=args.batch_size, warmup_steps=min(100, args.steps // 10),
                             seed=args.seed, init_rows=min(16384, len(unsafe) + len(safe)))
    cfg, params = train_sae(np.concatenate([unsafe, safe]), cfg, tc,
                            trainer.RunOptions(mesh=(-1, 1, 1), progress=not args.no_progress))
    harmful = harmful_latents(params, cfg, jnp.asarray(unsafe), jnp.asarray(safe), args.num_harmful)
    path = Dictionary(args.position, cfg, params, params, harmful,
                      {"source_unsafe": str(args.unsafe), "source_safe": str(args.safe), "adapted": False}
                      ).save(args.out, args.overwrite)
    print(f"wrote {path}: {cfg.n_latents} latents, {len(harmful)} harmful")
    return 0


def _adapt(args) -> int:
    import dataclasses

    from jaxdit.safety.safedig.core import AdaptConfig, adapt_decoder
    from jaxdit.safety.safedig.dictionary import Dictionary

    _new_output(args.out, args.overwrite)
    d = Dictionary.load(args.dictionary)
    target = _rows(args.target, d.position, args.limit)
    adapted, losses = adapt_decoder(d.tgt, d.cfg, target, AdaptConfig(steps=args.steps, batch_size=args.batch_size,
                                                                      lr=args.lr, seed=args.seed))
    meta = {**d.meta, "adapted": True, "target": str(args.target), "adapt_losses": [losses[0], losses[-1]]}
    path = dataclasses.replace(d, src=d.tgt, tgt=adapted, meta=meta).save(args.out, args.overwrite)
    print(f"wrote {path}: decoder loss {losses[0]:.4g} -> {losses[-1]:.4g}")
    return 0


def steering_hooks(dictionaries: list[str], mode: str, strength: float, gate: float, steps=None):
    """`Hooks` with one Blend/Repel edit per dictionary directory (`dictionary.steering_hooks`)."""
    from jaxdit.safety.safedig import dictionary
    from jaxdit.safety.safedig.core import SteerConfig

    return dictionary.steering_hooks(dictionaries, SteerConfig(mode=mode, strength=strength, gate=gate, steps=steps))


def _generate(args) -> int:
    from jaxdit.pipeline import load_pipeline, save_png

    if not args.out.lower().endswith(".png"):
        raise ValueError(f"--out {args.out}: must name a .png file")
    _new_output(args.out)
    hooks = steering_hooks(args.dictionary, args.mode, args.strength, args.gate)
    pipe = load_pipeline(args.model, dtype=args.dtype)
    kw = {} if args.size is None else {"height": args.size, "width": args.size}
    image = pipe(args.prompt, num_inference_steps=args.steps, seed=args.seed, hooks=hooks, **kw)[0]
    print(f"wrote {save_png(image, args.out)}")
    return 0


def register(sub) -> None:
    s = sub.add_parser("safedig", help="SafeDIG: SAE safety dictionaries, decoder adaptation, Blend and Repel")
    ss = s.add_subparsers(dest="safedig_command", required=True)
    r = ss.add_parser("route", help="score candidate positions by stability under shift and separability")
    r.add_argument("--source-unsafe", required=True, help="harvest run (one store per position)")
    r.add_argument("--source-safe", required=True)
    r.add_argument("--shift-unsafe", nargs="+", required=True, help="runs under shift: target domain, seeds, ...")
    r.add_argument("--shift-safe", nargs="+", required=True)
    r.add_argument("--positions", nargs="*", help="default: every position of --source-unsafe")
    r.add_argument("--top", type=positive_int, default=3)
    r.add_argument("--limit", type=positive_int, help="rows per store")
    r.add_argument("--out", required=True, help="routing table (JSON)")
    r.set_defaults(fn=_route)
    t = ss.add_parser("train", help="train the safety dictionary (TopK SAE) at a routed position")
    t.add_argument("--unsafe", required=True)
    t.add_argument("--safe", required=True)
    t.add_argument("--position", required=True)
    t.add_argument("--k", type=positive_int, default=32)
    t.add_argument("--expansion", type=positive_int, default=8)
    t.add_argument("--steps", type=positive_int, default=2000)
    t.add_argument("--batch-size", type=positive_int, default=1024)
    t.add_argument("--num-harmful", type=positive_int, default=16)
    t.add_argument("--seed", type=seed_int, default=0)
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--overwrite", action="store_true")
    t.add_argument("--out", required=True)
    t.set_defaults(fn=_train)
    a = ss.add_parser("adapt", help="adapt only the decoder to target-domain activations (encoder frozen)")
    a.add_argument("--dictionary", required=True)
    a.add_argument("--target", required=True, help="harvest run of the target domain")
    a.add_argument("--steps", type=positive_int, default=500)
    a.add_argument("--batch-size", type=positive_int, default=256)
    a.add_argument("--lr", type=positive_float, default=1e-3)
    a.add_argument("--limit", type=positive_int)
    a.add_argument("--seed", type=seed_int, default=0)
    a.add_argument("--overwrite", action="store_true")
    a.add_argument("--out", required=True)
    a.set_defaults(fn=_adapt)
    g = ss.add_parser("generate", help="generate with Blend / Repel at the dictionaries' positions")
    g.add_argument("--model", required=True)
    g.add_argument("--dictionary", nargs="+", required=True)
    g.add_argument("--mode", choices=["blend", "repel"], default="blend")
    g.add_argument("--strength", type=finite_float, default=1.0)
    g.add_argument("--gate", type=finite_float, default=0.0)
    g.add_argument("--prompt", required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--steps", type=positive_int, default=28)
    g.add_argument("--size", type=positive_int)
    g.add_argument("--seed", type=seed_int, default=0)
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    g.set_defaults(fn=_generate)
