"""Files in and out, for every layer: atomic writes and the safetensors reader.

Atomic writes: `atomic_file(OUT)` / `atomic_directory(OUT)` yield a temporary path beside OUT
(`.OUT.tmp-PID-HEX`) that is renamed onto OUT only when the block completes, so an interrupted write
leaves no OUT behind; the next write of the same OUT removes such leftovers of processes no longer
running (with a warning). `check_writable` refuses, before any work, an output that cannot be created.

The safetensors reader reads the header itself and maps each tensor lazily (one tensor in host memory at a
time), so bfloat16 and float8 tensors load without torch, and every malformed file fails with its name: a
truncated file, a header that is not safetensors, offsets outside the file. Pickle-based formats are
refused outright (`UnsafeFormatError`). `CheckpointError` is the error of any unusable checkpoint file.

This module imports nothing from jaxdit: the models, the conversion and the layers above all use it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import struct
import uuid
import warnings
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file or its contents cannot be used; the message names the file and key."""


class UnsafeFormatError(CheckpointError):
    """A pickle-based checkpoint: never unpickled."""


def refuse_pickle(path: Path) -> None:
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeFormatError(
            f"{path}: refusing to load a pickle-based checkpoint ({path.suffix}); unpickling can run arbitrary "
            "code. Convert it to safetensors with the tool that wrote it and pass the .safetensors file.")
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(9)
        # A safetensors file is an 8-byte little-endian header length then a JSON object: "{" at byte 8
        # (its length may well start with 0x80, so check this before the pickle magics).
        if len(head) == 9 and head[8:9] == b"{" and 8 + struct.unpack("<Q", head[:8])[0] <= path.stat().st_size:
            return
        if (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or head[:4] == b"PK\x03\x04":
            raise UnsafeFormatError(f"{path}: this is a pickle / torch.save archive, not safetensors; refusing to load")


class SafetensorsFile:
    """One `.safetensors` file: `keys()`, `shape(key)`, `dtype(key)`, `get(key)` (memory-mapped)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        refuse_pickle(self.path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{self.path}: not a safetensors file or truncated "
                                      f"(header length {n} but file has {size} bytes)")
            raw = f.read(n)
        try:
            header = json.loads(raw)
            if not isinstance(header, dict):
                raise ValueError("header is not an object")
        except ValueError as e:
            raise CheckpointError(f"{self.path}: not a safetensors file (header is not JSON: {e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries = {}
        for key, e in header.items():
            try:
                dtype = _DTYPES[e["dtype"]]
                shape = tuple(int(s) for s in e["shape"])
                start, end = (int(o) for o in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: malformed header entry for {key!r}: {e}") from None
            expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if end - start != expected:
                raise CheckpointError(f"{self.path}: tensor {key!r} has {end - start} bytes for shape {shape} "
                                      f"{e['dtype']} ({expected} expected)")
            if self._data_start + end > size:
                raise CheckpointError(f"{self.path}: file is truncated: tensor {key!r} ends at byte "
                                      f"{self._data_start + end} but the file has {size} bytes")
            self._entries[key] = (dtype, shape, start)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(self._entries[key][0])

    def get(self, key: str) -> np.ndarray:
        if key not in self._entries:
            raise CheckpointError(f"{self.path}: no tensor named {key!r}")
        dtype, shape, start = self._entries[key]
        if int(np.prod(shape)) == 0:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + start, shape=shape)


class TensorSource:
    """All tensors of a checkpoint: one safetensors file, a sharded index, or a folder holding either."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        refuse_pickle(path)
        self.files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        if path.is_dir():
            index = sorted(path.glob("*.safetensors.index.json"))
            singles = sorted(path.glob("*.safetensors"))
            if index:
                path = index[0]
            elif len(singles) == 1:
                path = singles[0]
            elif singles:
                raise CheckpointError(f"{path}: several .safetensors files and no *.safetensors.index.json: "
                                      f"{[p.name for p in singles]}")
            else:
                pickles = [p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
                if pickles:
                    raise UnsafeFormatError(f"{path}: only pickle-based weights here ({pickles}); refusing to "
                                            "unpickle. Provide safetensors weights.")
                raise CheckpointError(f"{path}: no .safetensors weights found")
        self.path = path
        if path.name.endswith(".index.json"):
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{path}: not a safetensors index (needs a 'weight_map'): {e}") from None
            for key, fname in weight_map.items():
                if fname not in self.files:
                    shard = path.parent / fname
                    if not shard.exists():
                        raise CheckpointError(f"{path}: shard {fname!r} (holding {key!r}) is missing")
                    self.files[fname] = SafetensorsFile(shard)
                if key not in self.files[fname]._entries:
                    raise CheckpointError(f"{path.parent / fname}: index lists {key!r} but the shard lacks it")
                self._where[key] = fname
        else:
            f = SafetensorsFile(path)
            self.files[path.name] = f
            self._where = {k: path.name for k in f.keys()}

    def keys(self) -> list[str]:
        return list(self._where)

    def file_of(self, key: str) -> Path:
        return self.files[self._where[key]].path

    def shape(self, key: str) -> tuple[int, ...]:
        return self.files[self._where[key]].shape(key)

    def get(self, key: str) -> np.ndarray:
        return self.files[self._where[key]].get(key)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for key in self.keys():
            yield key, self.get(key)


# Atomic writes

def check_writable(out: str | os.PathLike, flag: str | None = None) -> Path:
    """`out` as an absolute path, once it is known that it can be created: its nearest existing parent is
    a directory this process can write in (missing parents are created when writing). Refused in one
    line naming `flag` (e.g. "--out") and the path, so a command fails before doing any work."""
    out = Path(out).absolute()
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    where = f"{flag} {out}" if flag else str(out)
    if not parent.is_dir():
        raise NotADirectoryError(f"{where}: cannot be written, {parent} is not a directory")
    probe = parent / f".{out.name}.probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"{where}: cannot be written, {parent} is not writable ({e.strerror})") from None
    return out


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def temporary_beside(out: str | os.PathLike) -> Path:
    """A fresh temporary path beside `out` (`.NAME.tmp-PID-HEX`, renamed onto `out` when complete).
    Temporaries of the same `out` left by processes no longer running (a killed run) are removed first,
    each with a warning."""
    out = Path(out).absolute()
    for stale in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        pid = stale.name.rpartition(".tmp-")[2].partition("-")[0]
        if pid.isdigit() and _running(int(pid)):
            continue
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        warnings.warn(f"removed {stale}, left behind by an interrupted run")
    return out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_file(out: str | os.PathLike):
    """Yield a temporary path beside `out` that becomes `out` only if the block completes (its parent
    folder is created); on failure nothing is left behind."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(out)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def save_safetensors(out: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> Path:
    """Write a safetensors file atomically (`atomic_file`), readable as the umask allows any other output
    (safetensors itself writes 0600)."""
    from safetensors.numpy import save_file

    out = Path(out)
    with atomic_file(out) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    return out


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory that becomes `out` only if the block completes."""
    out = check_writable(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (--overwrite replaces it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(out)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
