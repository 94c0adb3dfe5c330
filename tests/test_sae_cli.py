"""`jaxdit sae ...`: bad input prints one line and exits 2; train / export / import end to end."""


import numpy as np


def run_cli(argv) -> int:
    from jaxdit.cli import main

    return main(argv)


def _train(tmp_path, *extra, data="x.npy", out="run"):
    return run_cli(["sae", "train", "--data", str(tmp_path / data), "--out", str(tmp_path / out), "--steps", "4",
                    "--batch-size", "16", "--warmup", "1", "--no-progress", "--mesh", "1,1,1", *extra])


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_train_export_import(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32))
    assert _train(tmp_path, "--k", "2", "--expansion", "4", "--position", "double.0.img.resid_post") == 0
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "run" / "sae" / "params.safetensors").is_file()
    assert run_cli(["sae", "export", "--format", "sparsify", str(tmp_path / "run"), str(tmp_path / "sp")]) == 0
    assert run_cli(["sae", "import", "--format", "sparsify", str(tmp_path / "sp"), str(tmp_path / "back")]) == 0
    assert run_cli(["sae", "export", "--format", "sparsify", str(tmp_path / "run"), str(tmp_path / "sp")]) == 2
    assert "already exists" in _error(capsys)
    assert run_cli(["sae", "export", "--format", "sparsify", str(tmp_path / "run"), str(tmp_path / "sp"),
                    "--overwrite"]) == 0


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.ones((64, 8), np.float32))
    np.save(tmp_path / "y.npy", np.ones((64, 6), np.float32))
    capsys.readouterr()
    assert _train(tmp_path, "--k", "100", "--expansion", "4") == 2
    assert "k=100 must be between 1 and the SAE width n_latents=32" in _error(capsys)
    assert _train(tmp_path, data="missing.npy") == 2
    assert "does not exist" in _error(capsys)
    assert _train(tmp_path, "--k", "2", "--expansion", "2") == 0
    capsys.readouterr()
    assert _train(tmp_path, "--k", "2", "--expansion", "2") == 2
    assert "--resume" in _error(capsys)
    assert _train(tmp_path, "--k", "2", "--expansion", "2", "--resume", data="y.npy") == 2
    assert "sae.d_in: checkpoint 8, given 6" in _error(capsys)
    assert run_cli(["sae", "export", "--format", "saelens", str(tmp_path / "nowhere"), str(tmp_path / "o")]) == 2
    assert "does not exist" in _error(capsys)
    assert _train(tmp_path, "--mesh", "2,2") == 2
    assert "data,fsdp,tensor" in _error(capsys)


def test_missing_chunk_is_named(tmp_path, capsys):
    import shutil

    from jaxdit.train.store import ActivationStore

    store = ActivationStore.create(tmp_path / "s", d=4)
    for _ in range(3):
        store.append(np.ones((8, 4), np.float32))
    shutil.rmtree(tmp_path / "s" / "chunks" / "000001")
    assert _train(tmp_path, data="s") == 2
    assert "chunk '000001' listed in manifest.json is missing" in _error(capsys)


def test_registered_in_the_jaxdit_command(tmp_path, capsys):
    from jaxdit.cli import main

    assert main(["sae", "export", "--format", "saelens", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "does not exist" in _error(capsys)


def test_planted_dictionary_recovered_through_the_cli_in_minutes(tmp_path, capsys):
    """The recovery run of benchmarks/RESULTS.md: d 48, 384 latents, k 6, 1500 steps of 4096 rows, defaults
    otherwise (AuxK on, 1000 warm-up steps), on one device; it took over 40 minutes before the k-sparse step."""
    import json
    import time

    from test_sae_train import _planted

    from jaxdit.train.interop import load_sae

    x, dictionary = _planted(n_rows=1 << 18, d=48, atoms=192, k=4)
    np.save(tmp_path / "x.npy", x)
    t0 = time.perf_counter()
    assert run_cli(["sae", "train", "--data", str(tmp_path / "x.npy"), "--out", str(tmp_path / "run"),
                    "--steps", "1500", "--batch-size", "4096", "--k", "6", "--expansion", "8", "--mesh", "1,1,1",
                    "--no-progress"]) == 0
    elapsed = time.perf_counter() - t0
    _, params = load_sae(tmp_path / "run")
    rows = params["W_dec"] / np.linalg.norm(params["W_dec"], axis=1, keepdims=True)
    best = (dictionary @ rows.T).max(axis=1)
    final = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    with capsys.disabled():
        print(f"\nplanted d48 via the CLI: {elapsed:.1f} s, {np.mean(best >= 0.9):.3f} of 192 atoms at cosine >= 0.9, "
              f"FVU {final['fvu']:.4f}, L0 {final['l0']:.2f}")
    assert np.mean(best >= 0.9) >= 0.8 and final["fvu"] < 0.15
    assert elapsed < 180
