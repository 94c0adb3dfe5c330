"""Activation stores (atomic chunks, manifest, errors) and the deterministic, resumable batch stream."""

import json
import shutil

import ml_dtypes
import numpy as np
import pytest

from jaxdit.train.store import ActivationStore, BatchStream, NpySource, StoreError, open_source


def _store(path, sizes=(5, 7, 3, 9), d=4, dtype="float32"):
    store = ActivationStore.create(path, d=d, dtype=dtype, model="tiny", position="single.1.img.resid_post",
                                   steps=[0, 2])
    start = 0
    for i, n in enumerate(sizes):
        rows = np.arange(start, start + n, dtype=np.float32)[:, None] * np.ones((1, d), np.float32)
        store.append(rows, {"batch": i}, prompts=1)
        start += n
    return store


def test_append_read_and_manifest(tmp_path):
    _store(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["count"] == 24 and manifest["d"] == 4 and manifest["prompts"] == 4
    assert manifest["model"] == "tiny" and manifest["position"] == "single.1.img.resid_post"
    assert manifest["steps"] == [0, 2] and manifest["dtype"] == "float32"
    assert [c["name"] for c in manifest["chunks"]] == ["000000", "000001", "000002", "000003"]
    assert manifest["chunks"][1] == {"name": "000001", "rows": 7, "batch": 1}
    reopened = ActivationStore.open(tmp_path / "s")
    np.testing.assert_array_equal(reopened.read(1)[:, 0], np.arange(5, 12))
    # bfloat16 stores keep their dtype
    bf = _store(tmp_path / "bf", dtype="bfloat16")
    assert bf.read(0).dtype == ml_dtypes.bfloat16


def test_crash_leftovers_are_never_listed_and_appending_continues(tmp_path):
    store = _store(tmp_path / "s", sizes=(3, 3))
    chunks = tmp_path / "s" / "chunks"
    (chunks / ".tmp-deadbeef").mkdir()  # a write that died before its rename
    shutil.copytree(chunks / "000001", chunks / "000002")  # renamed but the manifest never updated
    reopened = ActivationStore.open(tmp_path / "s")
    assert reopened.count == 6 and len(reopened.chunks) == 2
    reopened.append(np.full((2, 4), 7.0, np.float32), {"batch": 2})
    assert not (chunks / ".tmp-deadbeef").exists()
    np.testing.assert_array_equal(ActivationStore.open(tmp_path / "s").read(2), np.full((2, 4), 7.0))
    assert store.path == reopened.path


def test_store_errors(tmp_path):
    _store(tmp_path / "s")
    shutil.rmtree(tmp_path / "s" / "chunks" / "000002")
    with pytest.raises(StoreError, match="chunk '000002' listed in manifest.json is missing"):
        ActivationStore.open(tmp_path / "s")
    store = _store(tmp_path / "t")
    with pytest.raises(StoreError, match=r"rows must be \[N, 4\]"):
        store.append(np.zeros((3, 5), np.float32))
    with pytest.raises(StoreError, match="d is 4, cannot append data with d 5"):
        ActivationStore.create(tmp_path / "t", d=5, exist_ok=True)
    with pytest.raises(FileExistsError):
        ActivationStore.create(tmp_path / "t", d=4)
    with pytest.raises(StoreError, match="not an activation store"):
        ActivationStore.open(tmp_path)
    np.save(tmp_path / "bad.npy", np.zeros((3, 4, 5), np.float32))
    with pytest.raises(StoreError, match=r"expected a non-empty \[N, d\] array"):
        open_source(tmp_path / "bad.npy")
    with pytest.raises(FileNotFoundError):
        open_source(tmp_path / "nothing.npy")


def _ids(batch):
    return batch[:, 0].astype(int).tolist()


def test_stream_is_a_seeded_permutation_per_epoch_and_resumes_exactly(tmp_path):
    store = _store(tmp_path / "s")
    stream = BatchStream(store, 6, seed=3, window=2)
    rows = sum((_ids(stream.next()) for _ in range(8)), [])  # 48 rows = 2 epochs of 24
    assert sorted(rows[:24]) == list(range(24)) and sorted(rows[24:]) == list(range(24))
    assert rows[:24] != rows[24:] and rows[:24] != list(range(24))
    again = BatchStream(store, 6, seed=3, window=2)
    assert sum((_ids(again.next()) for _ in range(8)), []) == rows
    resumed = BatchStream(store, 6, seed=3, window=2, position=18)
    assert sum((_ids(resumed.next()) for _ in range(5)), []) == rows[18:48]
    assert sum((_ids(BatchStream(store, 6, seed=4, window=2).next()) for _ in range(1)), []) != rows[:6]


def test_stream_splits_chunks_between_parts(tmp_path):
    store = _store(tmp_path / "s")
    seen = []
    for p in range(2):
        stream = BatchStream(store, 4, seed=0, part=p, parts=2)
        seen.append(set(_ids(stream.take(stream.epoch_rows)[0])))
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(24))
    with pytest.raises(StoreError, match="has 4 chunk"):
        BatchStream(store, 4, part=5, parts=6)


def test_npy_source_pieces(tmp_path):
    np.save(tmp_path / "x.npy", np.arange(30, dtype=np.float32).reshape(10, 3))
    source = NpySource(tmp_path / "x.npy", piece_rows=4)
    assert source.pieces == [4, 4, 2] and source.d == 3
    stream = BatchStream(source, 10, seed=1)
    assert sorted(stream.next()[:, 0].tolist()) == list(range(0, 30, 3))
    assert source.describe(1, 2) == f"{tmp_path / 'x.npy'}, row 6"
