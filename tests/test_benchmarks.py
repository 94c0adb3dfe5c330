"""Benchmark scripts run end to end at tiny size (their numbers matter on a GPU, not here)."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flux_parity_benchmark_runs_and_agrees(tmp_path):
    out = tmp_path / "flux.json"
    assert _load("flux_parity").main(["--preset", "tiny-flux", "--height", "64", "--width", "48",
                                      "--text-tokens", "6", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["image_tokens"] == 12
    assert result["jax_float32_vs_torch_fp32_rel"] <= 1e-5
    assert result["jax_bfloat16_vs_torch_fp32_rel"] < 0.1
    assert result["jax_bfloat16_step_s"] > 0 and result["torch_float32_step_s"] > 0
