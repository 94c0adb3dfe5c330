"""Diffusers tensor names <-> jaxdit parameter paths, and the streaming fill of a parameter tree.

The rule is the same for every model family: split the diffusers name on dots; a name under one of the
family's stacked module lists (`transformer_blocks.N. ...`) lands at index N of the leading layer axis;
a Linear `weight [out, in]` becomes `kernel [in, out]`, a conv `weight [O, I, kh, kw]` becomes
`kernel [kh, kw, I, O]`, a norm `weight` becomes `scale`; other leaves keep their name.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdit.io import CheckpointError

Path_ = tuple[str, ...]


def to_param(key: str, tensor: np.ndarray, stacks: Iterable[str]) -> tuple[Path_, int | None, np.ndarray]:
    """diffusers (key, tensor) -> (parameter path, layer index or None, array in Flax layout)."""
    parts = key.split(".")
    layer = None
    if parts[0] in stacks:
        if len(parts) < 3 or not parts[1].isdigit():
            raise CheckpointError(f"tensor {key!r}: expected '{parts[0]}.<index>.<name>'")
        layer = int(parts[1])
        parts = [parts[0]] + parts[2:]
    leaf = parts[-1]
    if leaf == "weight":
        if tensor.ndim == 2:
            leaf, tensor = "kernel", tensor.T
        elif tensor.ndim == 4:
            leaf, tensor = "kernel", tensor.transpose(2, 3, 1, 0)
        elif tensor.ndim == 1:
            leaf = "scale"
        else:
            raise CheckpointError(f"tensor {key!r}: a weight of rank {tensor.ndim} has no known layout")
    return tuple(parts[:-1]) + (leaf,), layer, tensor


def to_key(path: Path_, layer: int | None, ndim: int) -> str:
    """Inverse of `to_param` for the name (used in error messages and exports)."""
    parts = list(path)
    leaf = parts[-1]
    if leaf in ("kernel", "scale"):
        leaf = "weight"
    head = parts[:1] + ([str(layer)] if layer is not None else []) + parts[1:-1]
    return ".".join(head + [leaf])


def from_param(path: Path_, layer: int | None, array: np.ndarray) -> tuple[str, np.ndarray]:
    """Flax leaf -> diffusers (key, tensor): the exact inverse of `to_param`."""
    key = to_key(path, layer, array.ndim)
    if path[-1] == "kernel":
        array = array.T if array.ndim == 2 else array.transpose(3, 2, 0, 1)
    return key, array


def _torch_shape(path: Path_, shape) -> tuple[int, ...]:
    """A Flax leaf shape in the PyTorch layout, for messages."""
    shape = tuple(shape)
    if path[-1] == "kernel" and len(shape) == 2:
        return shape[::-1]
    if path[-1] == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return shape


def flatten(tree) -> dict[Path_, object]:
    return {tuple(str(getattr(k, "key", k)) for k in p): v
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: dict[Path_, object]):
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return tree


def fill_params(
    source,  # jaxdit.io.TensorSource-like: keys(), get(key), file_of(key)
    abstract,  # ShapeDtypeStruct tree of the model's parameters
    stacks: dict[str, int],  # stacked module list name -> number of layers
    rename: Callable[[str, np.ndarray], list[tuple[str, np.ndarray]]] = lambda k, t: [(k, t)],
    dtype=None,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
    allow_nonfinite: bool = True,
):
    """Stream tensors from `source` into a numpy parameter tree shaped like `abstract`.

    `rename` maps a source tensor to diffusers-named tensors (identity for diffusers checkpoints; the
    original layouts split fused tensors here). Only the output tree and one source tensor are held
    in memory. Missing, unexpected, duplicated and mis-shaped tensors raise `CheckpointError` naming the
    key, the file, and both shapes; so do tensors that are not floating point. Tensors holding NaN or inf
    raise it too, naming the first, unless `allow_nonfinite`: then one warning names the first and how
    many there are.
    """
    expected = flatten(abstract)
    out: dict[Path_, np.ndarray] = {}
    filled: dict[Path_, np.ndarray] = {}
    nonfinite: list[tuple[str, int]] = []  # (where, count) of tensors holding NaN / inf
    for path, leaf in expected.items():
        stacked = path[0] in stacks
        out[path] = None  # allocated on first write, in the checkpoint's dtype unless `dtype` is given
        filled[path] = np.zeros(stacks[path[0]] if stacked else 1, bool)

    for src_key in progress(source.keys()):
        tensor = source.get(src_key)
        for key, t in rename(src_key, tensor):
            where = f"{key!r}" + (f" (from {src_key!r})" if key != src_key else "") + f" in {source.file_of(src_key)}"
            try:
                path, layer, arr = to_param(key, t, stacks)
            except CheckpointError as e:
                raise CheckpointError(f"{e} in {source.file_of(src_key)}") from None
            if path not in expected:
                raise CheckpointError(f"unexpected tensor {where}: the model has no parameter {'/'.join(path)}")
            want = expected[path].shape
            stacked = path[0] in stacks
            if stacked:
                if layer >= stacks[path[0]]:
                    raise CheckpointError(f"unexpected tensor {where}: {path[0]} has {stacks[path[0]]} layers")
                want_one = want[1:]
            else:
                want_one = want
            if tuple(arr.shape) != tuple(want_one):
                raise CheckpointError(
                    f"shape mismatch for {where}: checkpoint has {tuple(t.shape)}, the model expects "
                    f"{_torch_shape(path, want_one)}")
            slot = layer if stacked else 0
            if filled[path][slot]:
                raise CheckpointError(f"duplicate tensor {where}")
            if not jnp.issubdtype(arr.dtype, jnp.floating):
                raise CheckpointError(f"tensor {where} is {arr.dtype}; weights must be floating point")
            bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
            if bad and not allow_nonfinite:
                raise CheckpointError(f"tensor {where} holds {bad} NaN or inf value(s) of {arr.size} "
                                      "(--allow-nonfinite converts it anyway)")
            if bad:
                nonfinite.append((where, bad))
            if out[path] is None:
                out[path] = np.empty(want, dtype or arr.dtype)
            if stacked:
                out[path][layer] = arr
            else:
                out[path][...] = arr
            filled[path][slot] = True

    missing = []
    for path, done in filled.items():
        stacked = path[0] in stacks
        for i in np.flatnonzero(~done):
            missing.append(to_key(path, int(i) if stacked else None, len(expected[path].shape)))
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise CheckpointError(f"missing tensors in {source.path}: {shown}")
    if nonfinite:
        where, bad = nonfinite[0]
        others = f"; {len(nonfinite)} tensors hold some" if len(nonfinite) > 1 else ""
        warnings.warn(f"tensor {where} holds {bad} NaN or inf value(s){others}: outputs will not be finite")
    return unflatten(out)
