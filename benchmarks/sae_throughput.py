"""SAE training throughput: jaxdit's trainer step vs a plain JAX TopK step vs EleutherAI sparsify.

    python benchmarks/sae_throughput.py --out sae_throughput.json          # the default shapes
    python benchmarks/sae_throughput.py --quick                            # fewer, shorter rounds
    python benchmarks/sae_throughput.py --shape 3072:16:64:8192            # d:expansion:k:batch
    python benchmarks/sae_throughput.py --crossover --out crossover.json   # dense vs k-sparse backward
    python benchmarks/sae_throughput.py --config experiments/benchmarks/sae_throughput.toml   # as measured

Tokens per second of one training step (forward + backward + optimiser step) on one fixed random batch
already on the device (no data loading), TopK, no latent dead (the first 10M tokens of a run):

- `jaxdit`: the step `jaxdit.train.trainer.train` runs at these steps (`make_train_step`, TopK with the
  default loss, whose AuxK term is left out of the program while no latent is dead; k-sparse or dense
  backward by shape, decoder-gradient projection, clipping, Adam, decoder renormalisation, dead-latent
  counters, non-finite check). `--auxk-program` adds the step that decides inside the program.
- `plain`: the TopK step one writes in ~20 lines of JAX (`plain_step`): dense pre-activations,
  `lax.top_k`, decoder rows gathered by index, FVU, autodiff, the same projection, Adam and
  renormalisation.
- `sparsify`: EleutherAI sparsify's per-step work as its `Trainer` does it: `SparseCoder` forward (fused
  encoder with its k-sparse backward, embedding-bag decoder, FVU), backward, removal of the gradient
  along the decoder rows, `torch.optim.Adam` step, decoder renormalisation and the did-fire bookkeeping;
  bf16 autocast on CUDA as it ships, float32 on CPU. AuxK is off, as in its default config.

The contenders alternate in one process, a timed block of steps each per round (after a compiling
step and warm-up steps, untimed), so they see the same machine load; the table reports the median over
rounds of each contender's tokens/s and the median of the per-round ratios. jaxdit and the plain step
compute in float32 on CPU and bfloat16 (float32 master weights) on GPU, like sparsify. The default
shapes are three CPU-sized ones, plus d 3072 x16 k 64 B 8192 when a GPU is present.

`--crossover` instead times jaxdit's step with the dense and the k-sparse backward forced, at several
latents-per-k ratios, to place `jaxdit.train.sparse.SPARSE_MIN_RATIO`.

`--profile DIR` also writes a `jax.profiler` trace of jaxdit's step per shape (the profile that chose the
CPU kernels of `jaxdit.train.cpu_kernels`; open it with xprof or TensorBoard's profile plugin).

Prints a markdown table and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from jaxdit.experiment import parse_args

CPU_SHAPES = ("48:8:6:4096", "256:16:32:4096", "768:16:32:2048")
GPU_SHAPES = ("3072:16:64:8192",)


@dataclass(frozen=True)
class Shape:
    d: int
    expansion: int
    k: int
    batch: int

    @property
    def n(self) -> int:
        return self.d * self.expansion

    @classmethod
    def parse(cls, text: str) -> "Shape":
        try:
            d, e, k, b = (int(v) for v in text.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"shape {text!r}: expected d:expansion:k:batch, e.g. 768:16:32:2048")
        return cls(d, e, k, b)

    def label(self) -> str:
        return f"d{self.d}, {self.n} latents, k{self.k}, B{self.batch}"


@dataclass
class Contender:
    name: str
    step: Callable[[], None]  # one training step, asynchronous where the framework is
    sync: Callable[[], None]  # wait for every step issued so far
    info: dict
    block: int = 1  # steps per timed block, set by `prepare`


def _gpu_present() -> bool:
    import jax

    return jax.default_backend() == "gpu"


# --- contenders --------------------------------------------------------------------------------------

def jaxdit_contender(shape: Shape, compute_dtype: str, mesh_sizes=(1, 1, 1), seed: int = 0,
                     auxk_program: bool = False) -> Contender:
    """The step `trainer.train` runs here, where no latent is dead: the one compiled without AuxK.
    `auxk_program` times instead the step that decides inside the program (a `lax.switch` on the dead
    count) whether AuxK runs."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxdit.train import sae, trainer

    mesh = trainer.mesh_for(mesh_sizes)
    cfg = sae.SAEConfig(d_in=shape.d, n_latents=shape.n, k=shape.k, compute_dtype=compute_dtype)
    tc = trainer.TrainConfig(steps=10**6, batch_size=shape.batch, lr=2e-4, warmup_steps=0, seed=seed)
    trainer.check_mesh(cfg, tc, mesh)
    schedule = trainer.lr_schedule(tc, tc.base_lr(shape.n))
    optimizer = trainer.make_optimizer(tc, schedule)
    abstract = jax.eval_shape(lambda: trainer.init_state(cfg, tc, optimizer, None))
    shardings = trainer.state_shardings(cfg, optimizer, mesh, abstract)
    step_fn = trainer.make_train_step(cfg, tc, mesh, optimizer, schedule, shardings,
                                      auxk_width=None if auxk_program else 0)
    box = {"state": jax.jit(lambda: trainer.init_state(cfg, tc, optimizer, None), out_shardings=shardings)()}
    x = jax.device_put(jax.random.normal(jax.random.key(seed + 1), (shape.batch, shape.d), jnp.float32),
                       NamedSharding(mesh, trainer.BATCH_SPEC))

    def step():
        box["state"], box["metrics"] = step_fn(box["state"], x)

    def sync():
        jax.block_until_ready(box["state"])

    return Contender("jaxdit+auxk" if auxk_program else "jaxdit", step, sync, {
        "compute_dtype": compute_dtype, "mesh": list(mesh_sizes), "fvu": lambda: float(box["metrics"]["fvu"])})


def plain_step(d: int, n: int, k: int, lr: float, compute_dtype: str):
    """(init(key) -> (params, opt_state), step(params, opt_state, x) -> (params, opt_state, fvu)): the
    straightforward JAX TopK SAE step, for comparison."""
    import jax
    import jax.numpy as jnp
    import optax

    dt, opt = jnp.dtype(compute_dtype), optax.adam(lr)

    def init(key):
        w = jax.random.normal(key, (n, d), jnp.float32)
        w = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
        params = {"W_enc": w.T, "b_enc": jnp.zeros(n), "W_dec": w, "b_dec": jnp.zeros(d)}
        return params, opt.init(params)

    def fvu(p, x):
        pre = jnp.dot((x - p["b_dec"]).astype(dt), p["W_enc"].astype(dt), preferred_element_type=jnp.float32)
        values, index = jax.lax.top_k(pre + p["b_enc"], k)
        x_hat = jnp.einsum("bk,bkd->bd", jax.nn.relu(values), p["W_dec"][index]) + p["b_dec"]
        return jnp.sum((x - x_hat) ** 2) / jnp.sum((x - x.mean(0)) ** 2)

    def step(p, s, x):
        loss, g = jax.value_and_grad(fvu)(p, x)
        w = p["W_dec"]
        g = {**g, "W_dec": g["W_dec"] - jnp.sum(g["W_dec"] * w, axis=-1, keepdims=True) * w}
        updates, s = opt.update(g, s, p)
        p = optax.apply_updates(p, updates)
        return {**p, "W_dec": p["W_dec"] / jnp.linalg.norm(p["W_dec"], axis=-1, keepdims=True)}, s, loss

    return init, jax.jit(step, donate_argnums=(0, 1))


def plain_contender(shape: Shape, compute_dtype: str, seed: int = 0) -> Contender:
    import jax
    import jax.numpy as jnp

    init, step_fn = plain_step(shape.d, shape.n, shape.k, 2e-4, compute_dtype)
    params, opt_state = jax.jit(init)(jax.random.key(seed))
    box = {"p": params, "s": opt_state}
    x = jax.random.normal(jax.random.key(seed + 1), (shape.batch, shape.d), jnp.float32)

    def step():
        box["p"], box["s"], box["fvu"] = step_fn(box["p"], box["s"], x)

    return Contender("plain", step, lambda: jax.block_until_ready(box["p"]),
                     {"compute_dtype": compute_dtype, "fvu": lambda: float(box["fvu"])})


def sparsify_contender(shape: Shape, seed: int = 0) -> Contender | None:
    try:
        import torch
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        return None
    from importlib.metadata import version

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    coder = SparseCoder(shape.d, SparseCoderConfig(expansion_factor=shape.expansion, k=shape.k), device=dev,
                        dtype=torch.float32)
    opt = torch.optim.Adam(coder.parameters(), lr=2e-4)
    x = torch.randn(shape.batch, shape.d, device=dev)
    since_fired = torch.zeros(shape.n, dtype=torch.long, device=dev)
    did_fire = torch.zeros(shape.n, dtype=torch.bool, device=dev)
    box = {}

    def step():  # the order of sparsify.Trainer.fit for one SAE, fvu loss, no gradient accumulation
        coder.set_decoder_norm_to_unit_norm()
        out = coder(x=x, y=x, dead_mask=None)
        did_fire[out.latent_indices.flatten()] = True
        out.fvu.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            since_fired.add_(shape.batch)
            since_fired[did_fire] = 0
            did_fire.zero_()
        box["fvu"] = out.fvu.detach()

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    return Contender("sparsify", step, sync, {
        "compute_dtype": "bfloat16 autocast" if dev == "cuda" else "float32",
        "version": version("eai-sparsify"), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "fvu": lambda: float(box["fvu"])})


# --- timing ------------------------------------------------------------------------------------------

def _timed(c: Contender, steps: int) -> float:
    """Seconds per step of `steps` steps (synchronised before and after)."""
    c.sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        c.step()
    c.sync()
    return (time.perf_counter() - t0) / steps


def prepare(c: Contender, warmup: int, block_s: float) -> dict:
    """Compile (first step), warm up, and choose the steps per timed block (>= block_s seconds)."""
    t0 = time.perf_counter()
    c.step()
    c.sync()
    first = time.perf_counter() - t0
    per = _timed(c, max(warmup, 1))
    c.block = max(1, math.ceil(block_s / max(per, 1e-9)))
    return {"first_step_s": first, "warm_step_s": per, "block_steps": c.block}


def race(contenders: list[Contender], rounds: int, batch: int) -> dict:
    """Alternate timed blocks of the contenders (rotating who goes first) for `rounds` rounds."""
    seconds = {c.name: [] for c in contenders}
    for r in range(rounds):
        for c in contenders[r % len(contenders):] + contenders[:r % len(contenders)]:
            seconds[c.name].append(_timed(c, c.block))
    result = {"step_s": seconds,
              "tokens_per_s": {name: statistics.median(batch / s for s in v) for name, v in seconds.items()}}
    ratios = {}
    if "jaxdit" in seconds:
        for other in seconds:
            if other != "jaxdit":
                ratios[f"jaxdit/{other}"] = statistics.median(o / j for j, o in zip(seconds["jaxdit"], seconds[other]))
    result["ratio"] = ratios
    return result


def profile(c: Contender, where: Path, steps: int = 3) -> str:
    """A `jax.profiler` trace of `steps` warm steps of contender c under `where` (open it with xprof /
    TensorBoard's profile plugin, or Perfetto): the per-op times the CPU kernels were chosen from."""
    import jax

    c.sync()
    with jax.profiler.trace(str(where)):
        for _ in range(steps):
            c.step()
        c.sync()
    return str(where)


def bench_shape(shape: Shape, args, dtype: str) -> dict:
    contenders = [jaxdit_contender(shape, dtype, args.mesh), plain_contender(shape, dtype)]
    if args.auxk_program:
        contenders.insert(1, jaxdit_contender(shape, dtype, args.mesh, auxk_program=True))
    if not args.no_sparsify:
        s = sparsify_contender(shape)
        if s is None:
            print("sparsify is not importable: jaxdit and plain only", file=sys.stderr)
        else:
            contenders.append(s)
    prep = {c.name: prepare(c, args.warmup, args.block_s) for c in contenders}
    result = race(contenders, args.rounds, shape.batch)
    if args.profile:
        result["profile"] = profile(contenders[0], Path(args.profile) / f"d{shape.d}-n{shape.n}-k{shape.k}-B{shape.batch}")
    result.update(shape=vars(shape) | {"n_latents": shape.n}, prepare=prep,
                  fvu={c.name: c.info.pop("fvu")() for c in contenders},
                  contenders={c.name: c.info for c in contenders})
    return result


def crossover(shape: Shape, args, dtype: str) -> dict:
    """jaxdit's step with the dense and with the k-sparse backward, alternated."""
    from jaxdit.train import sparse

    contenders = []
    saved = sparse.SPARSE_MIN_RATIO
    try:
        for name, ratio in (("sparse", 0), ("dense", 10**9)):
            sparse.SPARSE_MIN_RATIO = ratio  # read when the step is traced, i.e. at its first call
            c = jaxdit_contender(shape, dtype, args.mesh)
            c.name = name
            prepare(c, args.warmup, args.block_s)
            contenders.append(c)
    finally:
        sparse.SPARSE_MIN_RATIO = saved
    result = race(contenders, args.rounds, shape.batch)
    result["shape"] = vars(shape) | {"n_latents": shape.n, "latents_per_k": shape.n / shape.k}
    result["ratio"] = {"sparse/dense": statistics.median(
        d / s for s, d in zip(result["step_s"]["sparse"], result["step_s"]["dense"]))}
    return result


# --- report ------------------------------------------------------------------------------------------

def table(results: list[dict]) -> str:
    names = [n for n in ("jaxdit", "jaxdit+auxk", "plain", "sparsify") if any(n in r["tokens_per_s"] for r in results)]
    ratio_names = [f"jaxdit/{n}" for n in names if n != "jaxdit"]
    head = ["shape", *(f"{n} tokens/s" for n in names), *ratio_names]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for r in results:
        s = Shape(r["shape"]["d"], r["shape"]["expansion"], r["shape"]["k"], r["shape"]["batch"])
        cells = [s.label(), *(f"{r['tokens_per_s'][n]:,.0f}" if n in r["tokens_per_s"] else "-" for n in names),
                 *(f"{r['ratio'][q]:.2f}" if q in r["ratio"] else "-" for q in ratio_names)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def crossover_table(results: list[dict]) -> str:
    lines = ["| shape | latents / k | sparse tokens/s | dense tokens/s | sparse / dense |",
             "| --- | --- | --- | --- | --- |"]
    for r in results:
        s = Shape(r["shape"]["d"], r["shape"]["expansion"], r["shape"]["k"], r["shape"]["batch"])
        lines.append(f"| {s.label()} | {s.n / s.k:g} | {r['tokens_per_s']['sparse']:,.0f} | "
                     f"{r['tokens_per_s']['dense']:,.0f} | {r['ratio']['sparse/dense']:.2f} |")
    return "\n".join(lines)


def retain_freed_memory() -> None:
    """glibc: serve every thread from the main arena and keep freed blocks below 1 GiB in the process (fresh
    pages cost a fault and a zeroing per 4 KiB, on every step that allocates them anew)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        raise SystemExit("benchmarks/sae_throughput.py: --malloc retain needs glibc (libc.so.6 not found)") from None
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8  # mallopt parameters (malloc.h)
    ok = [libc.mallopt(m_arena_max, 1), libc.mallopt(m_mmap_threshold, 1 << 30),
          libc.mallopt(m_trim_threshold, 1 << 31)]
    if not all(ok):
        raise SystemExit(f"benchmarks/sae_throughput.py: --malloc retain: mallopt refused ({ok})")


def _mesh(text: str) -> tuple[int, int, int]:
    return tuple(int(s) for s in text.split(","))


CROSSOVER_SHAPES = ("48:1:12:4096", "48:1:6:4096", "48:2:6:4096", "48:4:6:4096", "48:8:6:4096", "48:16:6:4096",
                    "256:1:64:4096", "256:1:32:4096", "256:2:32:4096", "256:4:32:4096", "256:8:32:4096",
                    "768:1:32:2048", "768:2:32:2048", "768:4:32:2048")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=Shape.parse, action="append", help="d:expansion:k:batch (repeatable)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per shape (contenders alternate)")
    p.add_argument("--block-s", type=float, default=1.0, help="seconds of steps per contender and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compiling) one")
    p.add_argument("--quick", action="store_true", help="3 rounds of ~0.3 s blocks")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="jaxdit / plain compute dtype "
                   "(default: float32 on CPU, bfloat16 on GPU, as sparsify)")
    p.add_argument("--mesh", type=_mesh, default=(1, 1, 1), help="jaxdit mesh data,fsdp,tensor")
    p.add_argument("--no-sparsify", action="store_true")
    p.add_argument("--auxk-program", action="store_true",
                   help="also time jaxdit's step that decides inside the program whether AuxK runs")
    p.add_argument("--crossover", action="store_true", help="dense vs k-sparse backward of jaxdit's step")
    p.add_argument("--profile", metavar="DIR", help="also write a jax.profiler trace of 3 jaxdit steps per shape "
                   "under DIR")
    p.add_argument("--malloc", choices=("default", "retain"), default="default",
                   help="the process's allocator (every contender's): glibc's defaults, or 'retain' (one arena, "
                        "mmap and trim thresholds of 1 / 2 GiB), so large buffers freed by one step are reused "
                        "by the next instead of being returned to the kernel and faulted in again (Linux, glibc)")
    p.add_argument("--out", default="sae_throughput.json")
    args = parse_args(p, argv, "benchmarks/sae_throughput.py")
    if args.quick:
        args.rounds, args.block_s, args.warmup = 3, 0.3, 1
    if args.malloc == "retain":
        retain_freed_memory()  # before any library starts a thread or allocates a large buffer

    import jax

    from jaxdit.io import atomic_file

    gpu = _gpu_present()
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    shapes = args.shape or [Shape.parse(s) for s in (CROSSOVER_SHAPES if args.crossover else
                                                     CPU_SHAPES + (GPU_SHAPES if gpu else ()))]
    results = []
    for shape in shapes:
        results.append(crossover(shape, args, dtype) if args.crossover else bench_shape(shape, args, dtype))
        print(f"done: {shape.label()}", file=sys.stderr, flush=True)
    device = jax.devices()[0]
    result = {"benchmark": "crossover" if args.crossover else "sae_throughput", "device": device.device_kind,
              "platform": device.platform, "jax_version": jax.__version__, "cpu_count": os.cpu_count(),
              "compute_dtype": dtype, "rounds": args.rounds, "block_s": args.block_s, "config": args.config,
              "malloc": args.malloc,
              "results": results}
    print(f"SAE training step, tokens/s (median of {args.rounds} alternated rounds), {device.device_kind}, "
          f"jaxdit/plain in {dtype}")
    print(crossover_table(results) if args.crossover else table(results))
    if not args.crossover:
        for r in results:
            first = ", ".join(f"{name} {p['first_step_s']:.1f} s" for name, p in r["prepare"].items())
            print(f"first step (compile + 1 step), d{r['shape']['d']}: {first}")
    out = Path(args.out)
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
