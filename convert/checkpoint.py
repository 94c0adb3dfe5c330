"""jaxdit checkpoints: an orbax parameter tree plus the model config, written atomically.

Layout of a checkpoint directory:

    OUT/jaxdit.json     {"format": "jaxdit-checkpoint", "version": 1, "family": ...}
    OUT/config.json     the model config (jaxdit.configs `to_json`)
    OUT/params/         orbax StandardCheckpointer tree

The directory is assembled under a temporary name beside OUT and renamed when complete
(`jaxdit.io.atomic_directory`, whose names stay importable from here), so an interrupted write leaves no
OUT behind. Every writer here checks first that its output can be written at all.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxdit.configs import config_from_json, dump_config
from jaxdit.io import (CheckpointError, atomic_directory, atomic_file, check_writable,  # noqa: F401
                       temporary_beside)

MARKER = "jaxdit.json"
FORMAT = {"format": "jaxdit-checkpoint", "version": 1}


def is_checkpoint(path) -> bool:
    return (Path(path) / MARKER).is_file()


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

    With a mesh, every array is read directly into its shards (`shardings_fn(config, abstract, mesh)` gives
    the NamedSharding tree); `dtype` casts floating parameters while reading.
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
        shardings = shardings_fn(config, abstract, mesh)
        abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                          abstract, shardings)
    else:
        # this process's first device: jax.devices()[0] belongs to process 0 in a multi-process run
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                                          abstract)
    params = ckptr.restore(path / "params", abstract)
    return config, params
