"""jaxdit checkpoints: an orbax parameter tree plus the model config, written atomically.

Layout of a checkpoint directory:

    OUT/jaxdit.json     {"format": "jaxdit-checkpoint", "version": 1, "family": ...}
    OUT/config.json     the model config (jaxdit.configs `to_json`)
    OUT/params/         orbax StandardCheckpointer tree

The directory is assembled under a temporary name beside OUT (`.OUT.tmp-PID-HEX`) and renamed when
complete, so an interrupted write leaves no OUT behind; the next write of the same OUT removes such
leftovers (with a warning). Every writer here checks first that its output can be written at all.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxdit.configs import config_from_json, dump_config
from jaxdit.convert.safetensors_io import CheckpointError

MARKER = "jaxdit.json"
FORMAT = {"format": "jaxdit-checkpoint", "version": 1}


def is_checkpoint(path) -> bool:
    return (Path(path) / MARKER).is_file()


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


def save_checkpoint(out, config, params, overwrite: bool = False) -> Path:
    """Write `params` (numpy or jax arrays, sharded or not) and `config` to `out`."""
    with atomic_directory(out, overwrite) as tmp:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / "params", params)
        ckptr.wait_until_finished()
        dump_config(config, tmp / "config.json")
        (tmp / MARKER).write_text(json.dumps({**FORMAT, "family": config.family}, indent=2))
    return Path(out)


def load_config(path):
    path = Path(path)
    try:
        meta = json.loads((path / MARKER).read_text())
        if meta.get("format") != FORMAT["format"]:
            raise ValueError(f"format {meta.get('format')!r}")
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a readable jaxdit checkpoint ({e})") from None
    try:
        return config_from_json(json.loads((path / "config.json").read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None


def restore_checkpoint(path, mesh=None, dtype=None, shardings_fn=None):
    """(config, params) from a jaxdit checkpoint, optionally restored straight onto `mesh`.

    With a mesh, every array is read directly into its shards (`shardings_fn(abstract, mesh)` gives the
    NamedSharding tree); `dtype` casts floating parameters while reading.
    """
    path = Path(path).absolute()
    config = load_config(path)
    ckptr = ocp.StandardCheckpointer()
    meta = ckptr.metadata(path / "params").item_metadata.tree

    def cast(key_path, m):
        if not jax.numpy.issubdtype(m.dtype, jax.numpy.floating):
            raise CheckpointError(f"{path}: parameter {jax.tree_util.keystr(key_path, simple=True, separator='/')} "
                                  f"is {m.dtype}; weights must be floating point")
        return jax.ShapeDtypeStruct(m.shape, dtype if dtype is not None else m.dtype)

    abstract = jax.tree_util.tree_map_with_path(cast, meta)
    if mesh is not None:
        shardings = shardings_fn(abstract, mesh)
        abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                          abstract, shardings)
    else:
        # this process's first device: jax.devices()[0] belongs to process 0 in a multi-process run
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                                          abstract)
    params = ckptr.restore(path / "params", abstract)
    return config, params
