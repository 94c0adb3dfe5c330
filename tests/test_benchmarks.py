"""Benchmark scripts run end to end at tiny size (their numbers matter on a GPU, not here)."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("preset,batch", [("tiny-flux", 1), ("tiny-sd3.5-medium", 2)])
def test_transformer_parity_benchmark_runs_and_agrees(tmp_path, preset, batch):
    out = tmp_path / "bench.json"
    assert _load("transformer_parity").main(["--preset", preset, "--height", "64", "--width", "48", "--batch",
                                             str(batch), "--text-tokens", "6", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["image_tokens"] == 12
    assert result["jax_float32_vs_torch_fp32_rel"] <= 1e-5
    assert result["jax_bfloat16_vs_torch_fp32_rel"] < 0.1
    assert result["jax_bfloat16_step_s"] > 0 and result["torch_float32_step_s"] > 0
