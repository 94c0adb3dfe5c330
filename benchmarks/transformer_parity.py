"""Full-size transformer parity and step time: jaxdit vs diffusers on the same random weights, one run.

    python benchmarks/transformer_parity.py --preset flux-dev --height 1024 --width 1024 --out flux_dev.json
    python benchmarks/transformer_parity.py --preset sd3.5-large --batch 2 --text-tokens 333 --out sd35.json

1. Builds the diffusers transformer (FluxTransformer2DModel / SD3Transformer2DModel) from the preset
   with seeded random weights and saves it as a diffusers folder in bfloat16 (bf16 values are exact
   in float32, so both precisions see the same weights).
2. PyTorch: float32 forward (TF32 off) -> the reference; bfloat16 forward -> diffusers' own bf16 error.
   Median step time of each over --repeats runs after a warm-up.
3. jaxdit: loads the folder with its converter, float32 forward at matmul precision "highest" and a
   bfloat16 forward, their relative errors vs the reference, compile time and median step time.
Prints a table and writes JSON. Memory: the torch model is freed before jaxdit loads, so flux-dev fits
one 80 GB GPU (float32 weights 48 GB). SD3 runs with batch 2 stand for classifier-free guidance.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxdit.experiment import parse_args


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="flux-dev")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where the random checkpoint is written (default: a temp dir)")
    p.add_argument("--out", default="transformer_parity.json")
    args = parse_args(p, argv, "benchmarks/transformer_parity.py")

    import diffusers
    import torch
    from diffusers.utils import logging as diffusers_logging

    import jax
    import jax.numpy as jnp

    from jaxdit.convert.loader import read_torch_checkpoint
    from jaxdit.io import atomic_file
    from jaxdit.configs import get_config
    from jaxdit.parity import _families, randomize_weights

    diffusers_logging.set_verbosity_error()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    config = get_config(args.preset)
    fam = _families()[config.family]
    inputs, _ = fam.inputs(config, args.batch, args.height, args.width, args.text_tokens, False, args.seed)
    image_tokens = (args.height // 16) * (args.width // 16)
    result = {"preset": args.preset, "height": args.height, "width": args.width, "text_tokens": args.text_tokens,
              "batch": args.batch, "image_tokens": image_tokens, "jax_devices": str(jax.devices()),
              "torch_device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
              "versions": {"jax": jax.__version__, "torch": torch.__version__}, "config": args.config}

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp) / "transformer"
        t0 = time.perf_counter()
        with torch.device("cpu"):
            model = randomize_weights(getattr(diffusers, fam.torch_class)(**config.to_diffusers()), args.seed)
        model.to(torch.bfloat16).save_pretrained(folder)
        result["seconds_build_checkpoint"] = time.perf_counter() - t0

        def torch_inputs(dt):
            t = {k: None if v is None else torch.from_numpy(np.asarray(v)).to(dev) for k, v in inputs.items()}
            return {k: v if v is None or k.endswith("_ids") else v.to(dt) for k, v in t.items()}

        for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            model.to(dev, dt)
            x = torch_inputs(dt)

            def step():
                with torch.no_grad():
                    out = model(**x, return_dict=False)[0]
                if dev == "cuda":
                    torch.cuda.synchronize()
                return out

            out = step().float().cpu().numpy()
            result[f"torch_{name}_step_s"] = median_time(step, args.repeats)
            if dev == "cuda":
                result[f"torch_{name}_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
            if name == "float32":
                ref = out
            else:
                result["torch_bf16_vs_fp32_rel"] = rel(out, ref)
        model = x = None  # free the torch weights before jaxdit loads its own
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()

        t0 = time.perf_counter()
        loaded_config, params = read_torch_checkpoint(folder)  # host numpy; one device copy per dtype below
        result["seconds_convert"] = time.perf_counter() - t0
    for name in ("float32", "bfloat16"):
        cfg = loaded_config.replace(dtype=name)
        p_dt = jax.device_put(jax.tree_util.tree_map(lambda a: a.astype(name), params))
        fn = jax.jit(lambda p, x, cfg=cfg: fam.forward(p, cfg, x, None, 0)[0])
        x = {k: None if v is None else jnp.asarray(v) for k, v in inputs.items()}
        with jax.default_matmul_precision("highest" if name == "float32" else "default"):
            t0 = time.perf_counter()
            compiled = fn.lower(p_dt, x).compile()
            result[f"jax_{name}_compile_s"] = time.perf_counter() - t0
            out = np.asarray(compiled(p_dt, x).astype(jnp.float32))
            result[f"jax_{name}_step_s"] = median_time(lambda: compiled(p_dt, x).block_until_ready(), args.repeats)
        result[f"jax_{name}_vs_torch_fp32_rel"] = rel(out, ref)
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            result[f"jax_{name}_peak_gb"] = stats["peak_bytes_in_use"] / 2**30
        p_dt = None
        gc.collect()

    rows = [("output rel err vs torch fp32, jaxdit fp32", result["jax_float32_vs_torch_fp32_rel"]),
            ("output rel err vs torch fp32, jaxdit bf16", result["jax_bfloat16_vs_torch_fp32_rel"]),
            ("output rel err vs torch fp32, diffusers bf16", result["torch_bf16_vs_fp32_rel"]),
            ("step s, diffusers fp32 (eager)", result["torch_float32_step_s"]),
            ("step s, jaxdit fp32", result["jax_float32_step_s"]),
            ("step s, diffusers bf16 (eager)", result["torch_bfloat16_step_s"]),
            ("step s, jaxdit bf16", result["jax_bfloat16_step_s"]),
            ("compile s, jaxdit bf16", result["jax_bfloat16_compile_s"])]
    print(f"{args.preset} {args.height}x{args.width}, batch {args.batch}, {image_tokens} image + {args.text_tokens} "
          f"text tokens on {result['torch_device']}")
    for k, v in rows:
        print(f"  {k:<48} {v:.4g}")
    out_path = Path(args.out)
    with atomic_file(out_path) as tmp_path:
        tmp_path.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
