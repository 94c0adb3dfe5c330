"""Attention backends side by side: the FLUX-dev transformer forward and a UVR sampling run, per backend.

    python benchmarks/attention_backends.py --out attention_backends.json        # TPU slice / GPU: full size
    python benchmarks/attention_backends.py --mesh 1,1,8 --uvr-mode t2i --out t2i.json
    python benchmarks/attention_backends.py --tiny --out tiny.json                # CPU: the tiny model

For each backend (default: xla, dot_product and splash on a TPU; xla, dot_product and cudnn on a GPU;
xla, dot_product and splash, the latter in Pallas interpret mode, on a CPU):

1. forward: one FLUX-dev transformer forward at 1024x1024 (4096 image + 512 text tokens), batch 1,
   bfloat16, seeded random weights; first call (compile + run) and the median of --repeats calls; its
   relative error against the xla backend's output.
2. UVR: a --steps (28) step sampling run with `UVRController` inside the pipelines' compiled loop. Mode
   "edit" (default) is Kontext editing, 4096 generated + 4096 context + 512 text = 8704 tokens, with the
   restriction (post-softmax scale over five token groups) computed in every block at every step; mode
   "t2i" localizes and replaces rows with noise (the default `RegulateConfig.t2i="noise"`: captures and
   edits, no attention mask).

A backend that fails (e.g. the dense xla path out of memory at 8704 tokens) is recorded with its error and
the others still run. The mesh (--mesh data,fsdp,tensor) defaults to every device, the attention heads
over `tensor` as far as they divide. Prints a table and writes JSON atomically.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from jaxdit.experiment import parse_args


def _mesh_sizes(text: str) -> tuple[int, int, int]:
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--mesh {text!r}: expected data,fsdp,tensor, e.g. 1,1,8")
    return sizes


def default_backends(platform: str) -> tuple[str, ...]:
    return ("xla", "dot_product", "cudnn") if platform == "gpu" else ("xla", "dot_product", "splash")


def default_mesh(heads: int, devices: int) -> tuple[int, int, int]:
    """Heads over `tensor` (the largest divisor of both counts), the remaining devices over `fsdp`."""
    tensor = max(t for t in range(1, devices + 1) if devices % t == 0 and heads % t == 0)
    return 1, devices // tensor, tensor


def random_params(abstract, axes, mesh, dtype, seed: int):
    """Seeded random parameters in their shards (by their logical `axes`): small models drawn on the host
    (nothing to compile), large ones drawn on the mesh (no host copy of the full model)."""
    import jax
    import jax.numpy as jnp

    from jaxdit import sharding

    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    shardings = sharding.param_shardings(abstract, mesh, axes)

    def value(path, leaf, noise):
        if str(getattr(path[-1], "key", "")) == "scale":  # norm scales around 1
            return 1 + 0.1 * noise
        return noise * (leaf.shape[-2] ** -0.5 if len(leaf.shape) >= 2 else 0.1)

    if sum(int(np.prod(leaf.shape)) for _, leaf in paths_leaves) < 50_000_000:
        rng = np.random.default_rng(seed)
        host = [value(path, leaf, rng.standard_normal(leaf.shape, np.float32)) for path, leaf in paths_leaves]
        return jax.device_put(jax.tree.map(lambda a: jnp.asarray(a, dtype), treedef.unflatten(host)), shardings)

    def make(key):
        keys = jax.random.split(key, len(paths_leaves))
        return treedef.unflatten([value(path, leaf, jax.random.normal(k, leaf.shape, jnp.float32)).astype(dtype)
                                  for k, (path, leaf) in zip(keys, paths_leaves)])

    # rbg keys: XLA's own generator compiles far faster than threefry over ~1000 leaves
    return jax.jit(make, out_shardings=shardings)(jax.random.key(seed, impl="rbg"))


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """(first call s, median of `repeats` further calls s, first result)."""
    import jax

    start = time.perf_counter()
    first = jax.block_until_ready(fn())
    first_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first_s, statistics.median(times), first


def table(result: dict) -> str:
    cols = ("backend", "forward_first_s", "forward_s", "uvr_first_s", "uvr_sample_s", "rel_err_vs_xla")
    rows = [cols]
    for r in result["runs"]:
        if "error" in r:
            rows.append((r["backend"], f"failed: {r['error'][:60]}", "", "", "", ""))
            continue
        rows.append(tuple(r["backend"] if c == "backend" else "-" if r.get(c) is None else f"{r[c]:.4g}"
                          for c in cols))
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="flux-dev")
    p.add_argument("--tiny", action="store_true",
                   help="the tiny-flux preset; --size, --text-tokens, --dtype default to 64, 8, float32")
    p.add_argument("--size", type=int, help="image height and width in pixels, a multiple of 16 (default 1024)")
    p.add_argument("--text-tokens", type=int, help="default 512")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default bfloat16")
    p.add_argument("--steps", type=int, default=28, help="UVR sampling steps")
    p.add_argument("--uvr-mode", choices=("edit", "t2i"), default="edit")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the first")
    p.add_argument("--backends", help="comma-separated attention backends (default: by platform)")
    p.add_argument("--mesh", type=_mesh_sizes, help="data,fsdp,tensor (default: every device, heads on tensor)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="attention_backends.json")
    args = parse_args(p, argv, "benchmarks/attention_backends.py")
    defaults = (64, 8, "float32") if args.tiny else (1024, 512, "bfloat16")
    args.size, args.text_tokens, args.dtype = (given if given is not None else default for given, default in
                                               zip((args.size, args.text_tokens, args.dtype), defaults))
    if args.tiny:
        args.preset = "tiny-flux"
    if args.size % 16 or args.size < 16:
        p.error(f"--size {args.size}: must be a positive multiple of 16")
    for name in ("batch", "steps", "text_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.repeats < 0:
        p.error("--repeats must be >= 0")

    import jax
    import jax.numpy as jnp

    from jaxdit import flux, hooks as hk, sampling, sharding
    from jaxdit.attention import BACKENDS
    from jaxdit.configs import get_config
    from jaxdit.pipeline import _flux_sample
    from jaxdit.safety.evaluate import write_json
    from jaxdit.safety.uvr import localize as loc
    from jaxdit.safety.uvr.regulate import RegulateConfig, UVRController

    platform = jax.default_backend()
    backends = tuple(args.backends.split(",")) if args.backends else default_backends(platform)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        p.error(f"--backends: unknown {unknown}; expected some of {BACKENDS}")
    config = get_config(args.preset, dtype=args.dtype)
    heads = config.num_attention_heads
    sizes = args.mesh or default_mesh(heads, len(jax.devices()))
    count = int(np.prod(sizes))
    if count > len(jax.devices()):
        p.error(f"--mesh {','.join(map(str, sizes))}: needs {count} devices, {len(jax.devices())} present")
    mesh = sharding.make_mesh(*sizes, devices=jax.devices()[:count])

    grid = (args.size // 16, args.size // 16)
    n_img, batch = grid[0] * grid[1], args.batch
    rng = np.random.default_rng(args.seed)
    dt = jnp.dtype(args.dtype)

    def put(x):  # inputs: batch over (data, fsdp) where it divides
        return None if x is None else jax.device_put(jnp.asarray(x, dt), sharding.batch_sharding(mesh, x.shape))

    latents = rng.standard_normal((batch, n_img, config.in_channels), np.float32)
    context = rng.standard_normal((batch, n_img, config.in_channels), np.float32)
    embeds = rng.standard_normal((batch, args.text_tokens, config.joint_attention_dim), np.float32)
    pooled = rng.standard_normal((batch, config.pooled_projection_dim), np.float32)
    guidance = jnp.full((batch,), 3.5, jnp.float32) if config.guidance_embeds else None
    img_ids, txt_ids = flux.image_ids(*grid), flux.text_ids(args.text_tokens)
    ctx_ids = np.concatenate([img_ids, flux.image_ids(*grid, index=1)])
    editing = args.uvr_mode == "edit"
    layout = hk.TokenLayout(args.text_tokens, n_img, n_img if editing else 0)
    geometry = hk.Geometry(layout, grid, grid if editing else None)
    sigmas, timesteps = sampling.flux_schedule(sampling.FLUX_DEV_SCHEDULER, args.steps, n_img)
    block = min(10, config.num_single_layers - 1)  # FLUX-dev's localization block, or the tiny model's last
    controller = UVRController(jnp.asarray(rng.standard_normal((heads, 8, config.attention_head_dim)), jnp.float32),
                               jax.random.key(args.seed), args.uvr_mode, loc.EDIT if editing else loc.T2I,
                               RegulateConfig(localize_at=f"single.{block}.img.attn_heads"))

    result = {"platform": platform, "devices": [str(d) for d in jax.devices()[:count]], "jax": jax.__version__,
              "preset": args.preset, "dtype": args.dtype, "size": args.size, "batch": batch,
              "forward_tokens": args.text_tokens + n_img, "uvr_mode": args.uvr_mode, "uvr_steps": args.steps,
              "uvr_tokens": layout.total, "mesh": dict(zip(sharding.MESH_AXES, sizes)), "repeats": args.repeats,
              "config": args.config, "runs": []}
    with jax.set_mesh(mesh):
        params = random_params(flux.abstract_params(config), flux.logical_axes(config), mesh, dt, args.seed)
        x, e, pl = put(latents), put(embeds), put(pooled)
        ctx = put(context) if editing else None
        reference = None
        for backend in backends:
            cfg = config.replace(attention_backend=backend)
            run = {"backend": backend}
            try:
                forward = jax.jit(lambda prm, x, e, pl: flux.forward(prm, cfg, x, e, pl, jnp.full((batch,), 1.0),
                                                                     img_ids, txt_ids, guidance)[0])
                run["forward_first_s"], run["forward_s"], out = timed(lambda: forward(params, x, e, pl),
                                                                      args.repeats)
                out = np.asarray(out, np.float32)
                if backend == "xla":
                    reference = out
                run["rel_err_vs_xla"] = (None if reference is None else
                                         float(np.abs(out - reference).max() / np.abs(reference).max()))

                def sample():
                    return _flux_sample(params, x, e, pl, guidance, sigmas, timesteps,
                                        ctx_ids if editing else img_ids, txt_ids, ctx, None, controller, config=cfg,
                                        hooks_fn=None, on_step=None, geometry=geometry)

                run["uvr_first_s"], run["uvr_sample_s"], _ = timed(sample, args.repeats)
            except Exception as err:  # a backend that cannot run here is recorded, the others still run
                run["error"] = f"{type(err).__name__}: {err}".splitlines()[0]
            result["runs"].append(run)
            print(f"{backend}: {run}", flush=True)

    print(f"\n{args.preset} {args.size}x{args.size}, batch {batch}, {args.dtype}, mesh {result['mesh']} on "
          f"{platform}; forward {result['forward_tokens']} tokens, UVR {args.uvr_mode} {args.steps} steps "
          f"{layout.total} tokens (seconds)")
    print(table(result))
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
