"""SAE training throughput: tokens/s of forward + backward + optimiser step, jaxdit vs EleutherAI sparsify.

    python benchmarks/sae_throughput.py --d 3072 --expansion 16 --k 64 --batch 8192 --out sae_throughput.json

Every variant trains a TopK SAE on one fixed random batch already on the device (data loading is not
timed): a first (compiling) step and --warmup more, then the mean over --steps steps, synchronised once
at the end. Variants:

- jaxdit at float32 and bfloat16 matmul operands (float32 master weights), the production train step of
  `jaxdit.train.trainer` (k-sparse encoder backward, gather decoder, decoder-row projection and
  renormalisation, Adam); with --aux-k > 0 also a bfloat16 run with AuxK on (dead latents forced).
- sparsify (`SparseCoder` + torch Adam, the steps its Trainer takes: unit-norm decoder, FVU backward,
  parallel-gradient removal), if importable: bf16 autocast on CUDA as it ships, float32 on CPU.

Prints a table and writes JSON. Runs at toy sizes on CPU (the test suite does).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def time_steps(step, steps: int, warmup: int, sync) -> tuple[float, float]:
    """(seconds of the first call, mean seconds per step after `warmup` more untimed steps)."""
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return first, (time.perf_counter() - t0) / steps


def bench_jaxdit(args, compute_dtype: str, aux: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxdit.train import sae, trainer

    mesh = trainer.mesh_for(args.mesh)
    n = args.expansion * args.d
    cfg = sae.SAEConfig(d_in=args.d, n_latents=n, k=args.k, compute_dtype=compute_dtype)
    loss = sae.LossConfig(aux_k=args.aux_k if aux else 256, aux_alpha=1 / 32 if aux else 0.0,
                          dead_tokens=0 if aux else 10_000_000)  # dead_tokens 0: every latent counts as dead
    tc = trainer.TrainConfig(steps=10**6, batch_size=args.batch, lr=2e-4, warmup_steps=0, loss=loss)
    trainer.check_mesh(cfg, tc, mesh)
    schedule = trainer.lr_schedule(tc, tc.base_lr(n))
    optimizer = trainer.make_optimizer(tc, schedule)
    abstract = jax.eval_shape(lambda: trainer.init_state(cfg, tc, optimizer, None))
    shardings = trainer.state_shardings(cfg, optimizer, mesh, abstract)
    step_fn = trainer.make_train_step(cfg, tc, mesh, optimizer, schedule, shardings)
    state = jax.jit(lambda: trainer.init_state(cfg, tc, optimizer, None), out_shardings=shardings)()
    x = jax.device_put(jax.random.normal(jax.random.key(1), (args.batch, args.d), jnp.float32),
                       jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(trainer.BATCH_AXES, None)))
    box = {"state": state}

    def step():
        box["state"], box["metrics"] = step_fn(box["state"], x)

    first, per_step = time_steps(step, args.steps, args.warmup, lambda: jax.block_until_ready(box["state"]))
    result = {"framework": "jaxdit", "compute_dtype": compute_dtype, "auxk": aux, "first_step_s": first,
              "step_s": per_step, "tokens_per_s": args.batch / per_step,
              "fvu_last": float(box["metrics"]["fvu"]), "device": str(jax.devices()[0].device_kind),
              "mesh": list(args.mesh)}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        result["peak_gb"] = stats["peak_bytes_in_use"] / 2**30
    return result


def bench_sparsify(args) -> dict | None:
    try:
        import torch
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        return None
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    coder = SparseCoder(args.d, SparseCoderConfig(expansion_factor=args.expansion, k=args.k), device=dev,
                        dtype=torch.float32)
    opt = torch.optim.Adam(coder.parameters(), lr=2e-4)
    x = torch.randn(args.batch, args.d, device=dev)

    def step():
        coder.set_decoder_norm_to_unit_norm()
        out = coder(x)
        out.fvu.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=False)
        step.fvu = out.fvu.detach()

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    first, per_step = time_steps(step, args.steps, args.warmup, sync)
    return {"framework": "sparsify", "compute_dtype": "bfloat16 autocast" if dev == "cuda" else "float32",
            "auxk": False, "first_step_s": first, "step_s": per_step, "tokens_per_s": args.batch / per_step,
            "fvu_last": float(step.fvu), "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}


def _mesh(text: str) -> tuple[int, int, int]:
    return tuple(int(s) for s in text.split(","))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=3072)
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first (compiling) one")
    p.add_argument("--aux-k", type=int, default=256, help="AuxK width of the extra jaxdit run (0: skip it)")
    p.add_argument("--mesh", type=_mesh, default=(1, 1, 1), help="jaxdit mesh data,fsdp,tensor")
    p.add_argument("--no-sparsify", action="store_true")
    p.add_argument("--out", default="sae_throughput.json")
    args = p.parse_args(argv)

    import jax

    rows = [bench_jaxdit(args, "float32", False), bench_jaxdit(args, "bfloat16", False)]
    if args.aux_k > 0:
        rows.append(bench_jaxdit(args, "bfloat16", True))
    if not args.no_sparsify:
        sparse_row = bench_sparsify(args)
        if sparse_row is None:
            print("sparsify is not importable: jaxdit only")
        else:
            rows.append(sparse_row)
    result = {"d": args.d, "n_latents": args.expansion * args.d, "k": args.k, "batch": args.batch,
              "steps": args.steps, "aux_k": args.aux_k, "jax_version": jax.__version__, "rows": rows}

    print(f"SAE train step, d={args.d}, n={args.expansion * args.d}, k={args.k}, batch={args.batch}")
    print(f"  {'framework':<10} {'dtype':<18} {'auxk':<5} {'tokens/s':>12} {'ms/step':>9} {'first s':>8}  device")
    for r in rows:
        print(f"  {r['framework']:<10} {r['compute_dtype']:<18} {str(r['auxk']):<5} {r['tokens_per_s']:>12,.0f} "
              f"{1e3 * r['step_s']:>9.2f} {r['first_step_s']:>8.2f}  {r['device']}")
    out = Path(args.out)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
