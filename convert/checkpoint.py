"""jaxdit checkpoints: an orbax parameter tree plus the model config, written atomically.

Layout of a checkpoint directory:

    OUT/jaxdit.json     {"format": "jaxdit-checkpoint", "version": 1, "family": ...}
    OUT/config.json     the model config (jaxdit.configs `to_json`)
    OUT/params/         orbax StandardCheckpointer tree

The directory is assembled under a temporary name beside OUT and renamed when complete, so an
interrupted write leaves no OUT behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxdit.configs import config_from_json, dump_config
from jaxdit.convert.safetensors_io import CheckpointError

MARKER = "jaxdit.json"
FORMAT = {"format": "jaxdit-checkpoint", "version": 1}


def is_checkpoint(path) -> bool:
    return (Path(path) / MARKER).is_file()


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory that becomes `out` only if the block completes."""
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
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
        return config_from_json(json.loads((path / "config.json").read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable jaxdit checkpoint ({e})") from None


def restore_checkpoint(path, mesh=None, dtype=None, shardings_fn=None):
    """(config, params) from a jaxdit checkpoint, optionally restored straight onto `mesh`.

    With a mesh, every array is read directly into its shards (`shardings_fn(abstract, mesh)` gives the
    NamedSharding tree); `dtype` casts floating parameters while reading.
    """
    path = Path(path).absolute()
    config = load_config(path)
    ckptr = ocp.StandardCheckpointer()
    meta = ckptr.metadata(path / "params").item_metadata.tree

    def cast(m):
        floating = jax.numpy.issubdtype(m.dtype, jax.numpy.floating)
        return jax.ShapeDtypeStruct(m.shape, dtype if (dtype is not None and floating) else m.dtype)

    abstract = jax.tree_util.tree_map(cast, meta)
    if mesh is not None:
        shardings = shardings_fn(abstract, mesh)
        abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                          abstract, shardings)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                                          abstract)
    params = ckptr.restore(path / "params", abstract)
    return config, params
