"""SAE training from an array in memory (`trainer.train_array`): bitwise the `.npy` route, errors naming it."""

import json

import numpy as np
import pytest

from jaxdit.train import sae, trainer
from jaxdit.train.store import ArraySource, NpySource, StoreError


def _rows(n, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) * rng.uniform(0.5, 2, d) + 1).astype(np.float32)


def test_array_source_reads_the_pieces_of_the_npy_file(tmp_path):
    x = _rows(70000)  # two pieces of 65536 rows at most, like the .npy reader
    np.save(tmp_path / "x.npy", x)
    a, f = ArraySource(x), NpySource(tmp_path / "x.npy")
    assert a.pieces == f.pieces == [65536, 70000 - 65536] and a.d == f.d == 8 and a.count == 70000
    for i in range(len(a.pieces)):
        np.testing.assert_array_equal(a.read(i), f.read(i))
    assert a.describe(1, 3) == "array, row 65539"


def test_train_array_is_bitwise_the_npy_route(tmp_path):
    x = _rows(70000)
    np.save(tmp_path / "x.npy", x)
    cfg = sae.SAEConfig(d_in=8, n_latents=32, k=4)
    tc = trainer.TrainConfig(steps=8, batch_size=64, lr=1e-3, warmup_steps=2, init_rows=512,
                             loss=sae.LossConfig(aux_k=8, dead_tokens=128))  # AuxK active after a few steps
    opts = trainer.RunOptions(mesh=(1, 1, 1), log_every=2, checkpoint_every=4, progress=False)
    cfg_f, from_file = trainer.train(tmp_path / "x.npy", tmp_path / "file", cfg, tc, opts)
    cfg_a, from_array = trainer.train_array(x, tmp_path / "array", cfg, tc, opts, name="rows")
    assert cfg_a == cfg_f and set(from_array) == set(from_file)
    for k in from_file:
        np.testing.assert_array_equal(from_array[k], from_file[k])
    metrics = lambda run: [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "elapsed_s")}  # noqa: E731
                           for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert metrics("array") == metrics("file")
    assert "rows [70000, 8] float32" in json.loads((tmp_path / "array" / "train.json").read_text())["data"]


def test_bad_arrays_are_refused_naming_them(tmp_path):
    cfg = sae.SAEConfig(d_in=8, n_latents=32, k=4)
    tc = trainer.TrainConfig(steps=2, batch_size=16, warmup_steps=1, init_rows=16)
    opts = trainer.RunOptions(mesh=(1, 1, 1), progress=False)
    with pytest.raises(StoreError, match="acts: expected a non-empty"):
        trainer.train_array(np.zeros((0, 8), np.float32), tmp_path / "a", cfg, tc, opts, name="acts")
    with pytest.raises(StoreError, match="floating-point"):
        ArraySource(np.zeros((4, 8), np.int32))
    with pytest.raises(StoreError, match="d=6"):
        trainer.train_array(_rows(64, d=6), tmp_path / "b", cfg, tc, opts)
    bad = _rows(64)
    bad[:, 2] = np.nan
    with pytest.raises(trainer.NonFiniteError, match="acts, row "):
        trainer.train_array(bad, tmp_path / "c", cfg, tc, opts, name="acts")
