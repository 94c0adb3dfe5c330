"""Activation stores (harvest output, SAE training input) and the shuffled batch stream read from them.

A store is a directory:

    STORE/manifest.json       {"format": "jaxdit-activations", "version": 1, "model", "position", "d",
                               "dtype", "count", "steps", "timesteps", "prompts", "chunks": [...], "extra"}
    STORE/chunks/000000/      one zarr v3 array [rows, d] per append (tensorstore), ...

Each append writes its chunk under a temporary name, renames it into place, then rewrites the manifest
(temp file + rename). A chunk is part of the store only once the manifest lists it, so a crash at any
point leaves a readable store: at worst an unlisted chunk directory, removed on the next append. One
manifest writer at a time; several processes may write chunks side by side (`write_chunk`, each under
its own name) while one of them lists them (`commit`), as a multi-process harvest does.

Training reads a store, a plain `.npy` [N, d] file, or an array in memory (`ArraySource`, the same
pieces as the array saved as `.npy`) through `BatchStream`: a deterministic shuffle
whose state is one integer (rows consumed), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Protocol

import ml_dtypes
import numpy as np
import tensorstore as ts

from jaxdit.convert.checkpoint import atomic_file

FORMAT = "jaxdit-activations"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
          "bfloat16": np.dtype(ml_dtypes.bfloat16)}
ZARR_ROWS = 16384  # rows per zarr chunk inside a store chunk (partial reads stay small)


class StoreError(ValueError):
    """A store or data file that cannot be used as asked."""


def _write_json_atomic(path: Path, obj: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


class ActivationStore:
    """A store directory: create or open it, append chunks, read them back."""

    def __init__(self, path: str | os.PathLike, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest

    # -- creation and opening --

    @classmethod
    def create(cls, path: str | os.PathLike, *, d: int, dtype: str = "float32", model: str | None = None,
               position: str | None = None, steps: list[int] | None = None,
               timesteps: list[float] | None = None, extra: dict[str, Any] | None = None,
               exist_ok: bool = False) -> "ActivationStore":
        """A new empty store; with exist_ok, an existing one with the same d/dtype/model/position
        (and steps, when given) is opened for appending instead."""
        path = Path(path)
        if dtype not in DTYPES:
            raise StoreError(f"store dtype {dtype!r}: expected one of {sorted(DTYPES)}")
        want = {"model": model, "position": position, "d": int(d), "dtype": dtype,
                "steps": None if steps is None else [int(s) for s in steps]}
        if (path / MANIFEST).exists():
            if not exist_ok:
                raise FileExistsError(f"activation store {path} already exists")
            store = cls.open(path)
            for key, value in want.items():
                if value is not None and store.manifest.get(key) != value:
                    raise StoreError(f"activation store {path}: {key} is {store.manifest.get(key)!r}, "
                                     f"cannot append data with {key} {value!r}")
            return store
        (path / "chunks").mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT, "version": VERSION, **want,
                    "timesteps": None if timesteps is None else [float(t) for t in timesteps],
                    "count": 0, "prompts": 0, "chunks": [], "extra": extra or {}}
        _write_json_atomic(path / MANIFEST, manifest)
        return cls(path, manifest)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ActivationStore":
        """Open an existing store; every listed chunk must be present."""
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            raise StoreError(f"{path} is not an activation store (no {MANIFEST})") from None
        except json.JSONDecodeError as e:
            raise StoreError(f"{path / MANIFEST}: not valid JSON ({e})") from None
        if manifest.get("format") != FORMAT:
            raise StoreError(f"{path / MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        if manifest.get("dtype") not in DTYPES:
            raise StoreError(f"{path / MANIFEST}: dtype {manifest.get('dtype')!r} not one of {sorted(DTYPES)}")
        for chunk in manifest["chunks"]:
            if not (path / "chunks" / chunk["name"] / "zarr.json").is_file():
                raise StoreError(f"activation store {path}: chunk {chunk['name']!r} listed in {MANIFEST} "
                                 f"is missing (expected {path / 'chunks' / chunk['name']})")
        return cls(path, manifest)

    # -- properties --

    @property
    def d(self) -> int:
        return int(self.manifest["d"])

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.manifest["dtype"]]

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return self.manifest["chunks"]

    @property
    def pieces(self) -> list[int]:
        """Row count of each chunk (the `Source` protocol)."""
        return [int(c["rows"]) for c in self.chunks]

    # -- writing --

    def append(self, rows: np.ndarray, record: dict[str, Any] | None = None, prompts: int = 0) -> str:
        """Add rows [N, d] as one new chunk; `record` is stored in the chunk's manifest entry and
        `prompts` added to the store's prompt count. Returns the chunk name."""
        self.remove_leftovers()
        entry = self.write_chunk(rows, f"{len(self.chunks):06d}", record)
        self.commit([entry], prompts)
        return entry["name"]

    def remove_leftovers(self) -> None:
        """Delete temporary chunk directories left by a crash inside an earlier write. Only while no
        other process is writing chunks into this store."""
        for stale in (self.path / "chunks").glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def write_chunk(self, rows: np.ndarray, name: str, record: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write rows [N, d] as chunk `name` (not yet listed: `commit` lists it); returns its manifest entry.
        An unlisted chunk of that name, left by a crash, is replaced."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.d:
            raise StoreError(f"activation store {self.path}: cannot append an array of shape {rows.shape}, "
                             f"rows must be [N, {self.d}]")
        if rows.shape[0] == 0:
            raise StoreError(f"activation store {self.path}: cannot append an empty chunk")
        if any(c["name"] == name for c in self.chunks):
            raise StoreError(f"activation store {self.path}: chunk {name!r} is already listed in {MANIFEST}")
        chunks_dir = self.path / "chunks"
        tmp = chunks_dir / f".tmp-{uuid.uuid4().hex[:8]}"
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp)},
                "metadata": {"shape": list(rows.shape), "data_type": self.manifest["dtype"],
                             "chunk_grid": {"name": "regular",
                                            "configuration": {"chunk_shape": [min(ZARR_ROWS, rows.shape[0]), self.d]}}}}
        try:
            array = ts.open(spec, create=True).result()
            array.write(rows.astype(self.dtype, copy=False)).result()
            final = chunks_dir / name
            if final.exists():  # renamed by a crashed write but never listed: not part of the store
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return {"name": name, "rows": int(rows.shape[0]), **(record or {})}

    def commit(self, entries: list[dict[str, Any]], prompts: int = 0, write: bool = True) -> None:
        """List written chunks (entries of `write_chunk`, in order) and add `prompts` to the prompt count,
        in one manifest rewrite. `write=False` updates only this object, for the processes of a
        multi-process writer that are not the one writing the manifest."""
        manifest = dict(self.manifest)
        manifest["chunks"] = self.chunks + list(entries)
        manifest["count"] = self.count + sum(int(e["rows"]) for e in entries)
        manifest["prompts"] = int(manifest.get("prompts", 0)) + int(prompts)
        if write:
            _write_json_atomic(self.path / MANIFEST, manifest)
        self.manifest = manifest

    # -- reading (the `Source` protocol) --

    def read(self, i: int) -> np.ndarray:
        """Chunk i as a numpy array [rows, d] in the store's dtype."""
        name = self.chunks[i]["name"]
        where = self.path / "chunks" / name
        try:
            array = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(where)}},
                            open=True).result()
        except ValueError as e:
            raise StoreError(f"activation store {self.path}: chunk {name!r} cannot be read ({e})") from None
        if tuple(array.shape) != (self.chunks[i]["rows"], self.d):
            raise StoreError(f"activation store {self.path}: chunk {name!r} has shape {tuple(array.shape)}, "
                             f"manifest says ({self.chunks[i]['rows']}, {self.d})")
        return array.read().result()

    def describe(self, i: int, row: int) -> str:
        return f"activation store {self.path}, chunk {self.chunks[i]['name']!r}, row {row}"


class ArraySource:
    """An array [N, d] split into pieces of `piece_rows` rows. In memory, or a `.npy` file's memory map
    (`NpySource`): a run on an array reads exactly the batches a run on the same array saved as `.npy`
    reads. The array is not copied: it must not change while a run reads it."""

    def __init__(self, array: np.ndarray, piece_rows: int = 65536, name: str = "array"):
        array = np.asarray(array)
        if array.ndim != 2 or array.shape[0] == 0:
            raise StoreError(f"{name}: expected a non-empty [N, d] array, got shape {array.shape}")
        if not (np.issubdtype(array.dtype, np.floating) or array.dtype == DTYPES["bfloat16"]):
            raise StoreError(f"{name}: expected floating-point activations, got dtype {array.dtype}")
        self.array, self.name = array, name
        n = array.shape[0]
        self.bounds = [(a, min(a + piece_rows, n)) for a in range(0, n, piece_rows)]

    def __str__(self) -> str:
        return f"{self.name} [{self.array.shape[0]}, {self.array.shape[1]}] {self.array.dtype} (in memory)"

    @property
    def d(self) -> int:
        return int(self.array.shape[1])

    @property
    def count(self) -> int:
        return int(self.array.shape[0])

    @property
    def pieces(self) -> list[int]:
        return [b - a for a, b in self.bounds]

    def read(self, i: int) -> np.ndarray:
        a, b = self.bounds[i]
        return np.asarray(self.array[a:b])

    def describe(self, i: int, row: int) -> str:
        return f"{self.name}, row {self.bounds[i][0] + row}"


class NpySource(ArraySource):
    """A `.npy` file [N, d] read through a memory map, split into pieces of `piece_rows` rows."""

    def __init__(self, path: str | os.PathLike, piece_rows: int = 65536):
        self.path = Path(path)
        try:
            array = np.load(self.path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise StoreError(f"{self.path}: cannot read as .npy ({e})") from None
        super().__init__(array, piece_rows, name=str(self.path))

    def __str__(self) -> str:
        return str(self.path)


class Source(Protocol):
    """What `BatchStream` reads: pieces of rows, each loadable as a whole."""

    d: int
    pieces: list[int]

    def read(self, i: int) -> np.ndarray: ...

    def describe(self, i: int, row: int) -> str: ...


def open_source(path: "str | os.PathLike | ArraySource") -> ActivationStore | NpySource | ArraySource:
    """An activation store directory or a `.npy` file (an `ArraySource` is returned as it is)."""
    if isinstance(path, ArraySource):
        return path
    path = Path(path)
    if path.is_dir():
        return ActivationStore.open(path)
    if path.suffix == ".npy" and path.is_file():
        return NpySource(path)
    if not path.exists():
        raise FileNotFoundError(f"training data {path} does not exist")
    raise StoreError(f"{path}: expected an activation store directory (with {MANIFEST}) or a .npy file")


class BatchStream:
    """Shuffled batches [batch, d] float32 from a source, a pure function of (seed, position).

    The stream may be one of `parts` streams splitting the source: part k reads only the pieces i with
    i % parts == k (the trainer's global batch is `parts` equal slices, one from each, so that a
    process reads only the parts its devices hold). Epoch e visits this stream's pieces in a seeded
    order, in windows of `window` pieces; the rows of a window are shuffled together, so memory holds at
    most two windows (window * piece rows * d values, plus the tail of the previous one while a batch
    spans them). `position` counts rows consumed; a stream created at a saved position continues exactly.
    """

    def __init__(self, source: Source, batch_size: int, *, seed: int = 0, window: int = 4, position: int = 0,
                 part: int = 0, parts: int = 1):
        if batch_size < 1 or window < 1:
            raise ValueError(f"batch_size and window must be >= 1, got {batch_size}, {window}")
        self.source, self.batch_size, self.seed, self.window = source, batch_size, seed, window
        self.mine = [i for i in range(len(source.pieces)) if i % parts == part]
        if not self.mine:
            raise StoreError(f"the training data has {len(source.pieces)} chunk(s); each of its {parts} data "
                             f"streams needs at least one")
        self.epoch_rows = sum(source.pieces[i] for i in self.mine)
        self.position = position
        self._key = None  # (epoch, window) held in the buffer
        self._rows = self._origin = None

    def _windows(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.mine).tolist()
        return [order[i:i + self.window] for i in range(0, len(order), self.window)]

    def _load(self, epoch: int, w: int) -> None:
        pieces = self._windows(epoch)[w]
        rows = np.concatenate([self.source.read(i) for i in pieces])
        origin = np.concatenate([np.stack([np.full(self.source.pieces[i], i), np.arange(self.source.pieces[i])], 1)
                                 for i in pieces])
        perm = np.random.default_rng([self.seed, epoch, w, 1]).permutation(len(rows))
        self._rows, self._origin, self._key = rows[perm], origin[perm], (epoch, w)

    def _locate(self, position: int) -> tuple[int, int, int]:
        """Stream position -> (epoch, window, row within the shuffled window)."""
        epoch, offset = divmod(position, self.epoch_rows)
        for w, pieces in enumerate(self._windows(epoch)):
            size = sum(self.source.pieces[i] for i in pieces)
            if offset < size:
                return epoch, w, offset
            offset -= size
        raise AssertionError("unreachable: offset beyond the epoch")

    def take(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The next `count` rows (source dtype) and their origins [count, 2] (piece, row)."""
        parts, origins = [], []
        while count:
            epoch, w, offset = self._locate(self.position)
            if self._key != (epoch, w):
                self._load(epoch, w)
            n = min(count, len(self._rows) - offset)
            parts.append(self._rows[offset:offset + n])
            origins.append(self._origin[offset:offset + n])
            self.position += n
            count -= n
        return np.concatenate(parts), np.concatenate(origins)

    def next(self) -> np.ndarray:
        return self.take(self.batch_size)[0].astype(np.float32)

    def describe_nonfinite(self, position: int, count: int) -> str:
        """Where the first NaN/inf row in stream rows [position, position + count) comes from."""
        return self.find_nonfinite(position, count) or "no non-finite row found on re-reading"

    def find_nonfinite(self, position: int, count: int) -> str | None:
        probe = copy.copy(self)  # same pieces and order; its own position and buffer
        probe.position, probe._key = position, None
        rows, origin = probe.take(count)
        bad = np.flatnonzero(~np.isfinite(rows.astype(np.float32)).all(axis=1))
        if not len(bad):
            return None
        piece, row = origin[bad[0]]
        return (f"first at {self.source.describe(int(piece), int(row))}; {len(bad)} of the {count} rows read hold "
                "NaN or inf (rows are read shuffled, from anywhere in the data)")


class SlicedStream:
    """Rows [start, stop) of every global batch [batch_size, d], the batch being `parts` equal slices,
    slice k the next rows of part k's `BatchStream`.

    Which rows a step holds is a function of (seed, parts, position) alone, not of how many processes read
    them or of the mesh: each process builds only the parts its rows overlap (with one part per
    process and the batch split over processes, each reads only its own share of the data). The state is
    still one integer, the rows each part has consumed.
    """

    def __init__(self, source: Source, batch_size: int, rows: tuple[int, int], *, parts: int = 1, seed: int = 0,
                 window: int = 4, position: int = 0):
        start, stop = rows
        if batch_size % parts or not 0 <= start < stop <= batch_size:
            raise ValueError(f"rows {rows} of a batch of {batch_size} in {parts} equal parts")
        self.per, self.rows, self.total_parts = batch_size // parts, rows, parts
        self.first = start // self.per
        self.parts = {k: BatchStream(source, self.per, seed=seed, window=window, position=position, part=k,
                                     parts=parts) for k in range(self.first, (stop - 1) // self.per + 1)}

    @property
    def position(self) -> int:
        return next(iter(self.parts.values())).position

    def next(self) -> np.ndarray:
        """This process's rows of the next global batch, float32 [stop - start, d]."""
        batch = np.concatenate([stream.next() for stream in self.parts.values()])
        offset = self.rows[0] - self.first * self.per
        return batch[offset:offset + self.rows[1] - self.rows[0]]

    def span(self, step: int) -> tuple[int, int]:
        """The positions [start, stop) each part's rows of batch `step` (from 1) were read from."""
        return (step - 1) * self.per, step * self.per

    def describe_nonfinite(self, step: int) -> str:
        """Where the first NaN/inf row among this process's rows of batch `step` (from 1) comes from."""
        start, stop = self.span(step)
        for k, stream in self.parts.items():
            found = stream.find_nonfinite(start, stop - start)
            if found:
                return f"data stream {k}, {found}" if self.total_parts > 1 else found
        return "no non-finite row among this process's rows on re-reading"
