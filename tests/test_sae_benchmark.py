"""benchmarks/sae_throughput.py runs end to end at toy size (its numbers matter on a GPU, not here)."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "sae_throughput.py"


def test_sae_throughput_benchmark_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("sae_throughput", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "sae.json"
    assert bench.main(["--d", "16", "--expansion", "4", "--k", "4", "--batch", "64", "--steps", "2", "--warmup", "1",
                       "--aux-k", "0", "--mesh", "1,1,2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["d"], result["n_latents"], result["k"], result["batch"]) == (16, 64, 4, 64)
    jax_rows = [r for r in result["rows"] if r["framework"] == "jaxdit"]
    assert [r["compute_dtype"] for r in jax_rows] == ["float32", "bfloat16"]  # --aux-k 0: no AuxK run
    assert all(r["tokens_per_s"] > 0 and r["step_s"] > 0 for r in result["rows"])
    assert "tokens/s" in capsys.readouterr().out
