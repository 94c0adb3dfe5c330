"""benchmarks/sae_throughput.py runs end to end at toy size (its numbers come from real shapes, not these)."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "sae_throughput.py"


def _bench():
    spec = importlib.util.spec_from_file_location("sae_throughput", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    return bench


def test_sae_throughput_benchmark_runs(tmp_path, capsys):
    out = tmp_path / "sae.json"
    assert _bench().main(["--shape", "16:4:4:64", "--shape", "8:4:2:32", "--rounds", "2", "--block-s", "0.01",
                          "--warmup", "1", "--mesh", "1,1,2", "--out", str(out), "--profile", str(tmp_path / "prof")]) == 0
    result = json.loads(out.read_text())
    for r in result["results"]:  # a trace of jaxdit's step per shape
        assert list(Path(r["profile"]).rglob("*.xplane.pb")), r["profile"]
    assert [(r["shape"]["d"], r["shape"]["n_latents"], r["shape"]["k"], r["shape"]["batch"])
            for r in result["results"]] == [(16, 64, 4, 64), (8, 32, 2, 32)]
    for r in result["results"]:
        assert set(r["tokens_per_s"]) == {"jaxdit", "plain", "sparsify"}
        assert all(len(v) == 2 and min(v) > 0 for v in r["step_s"].values())  # two alternated rounds each
        assert set(r["ratio"]) == {"jaxdit/plain", "jaxdit/sparsify"} and min(r["ratio"].values()) > 0
        assert all(np.isfinite(v) for v in r["fvu"].values())
    text = capsys.readouterr().out
    assert "| d16, 64 latents, k4, B64 |" in text and "jaxdit/sparsify" in text


def test_plain_step_trains():
    import jax

    init, step = _bench().plain_step(8, 32, 2, 1e-2, "float32")
    params, opt_state = init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (64, 8))
    losses = []
    for _ in range(20):
        params, opt_state, loss = step(params, opt_state, x)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(np.linalg.norm(params["W_dec"], axis=1), 1.0, rtol=1e-5)


def test_crossover_mode(tmp_path, capsys):
    out = tmp_path / "cross.json"
    assert _bench().main(["--crossover", "--shape", "8:4:2:32", "--rounds", "1", "--block-s", "0.01", "--warmup", "1",
                          "--out", str(out)]) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert set(r["tokens_per_s"]) == {"sparse", "dense"} and r["shape"]["latents_per_k"] == 16
    assert "sparse / dense" in capsys.readouterr().out


def test_retained_memory_mode_runs_in_its_own_process(tmp_path):
    """--malloc retain changes the allocator of the whole process, so it runs in a fresh one."""
    import subprocess

    out = tmp_path / "retain.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--shape", "8:4:2:32", "--rounds", "1", "--block-s", "0.01",
                           "--warmup", "1", "--no-sparsify", "--malloc", "retain", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["malloc"] == "retain" and result["results"][0]["tokens_per_s"]["jaxdit"] > 0
