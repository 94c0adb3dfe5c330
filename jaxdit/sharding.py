"""Device mesh, the logical-axis table, and partition specs for every parameter tree.

Mesh axes are ("data", "fsdp", "tensor"). Parameters get logical axes from their path (diffusers
names, so one rule covers FLUX and SD3), and logical axes map to mesh axes through `RULES`. A mesh axis
that does not divide a dimension is dropped for that dimension, so tiny models run on any mesh.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (one place for the whole project)
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "latents": ("tensor",),
    "layers": None,
    "tokens": None,
}

# Linear layers whose output axis is split over heads / MLP units (column-parallel) ...
_COLUMN = {"to_q": "heads", "to_k": "heads", "to_v": "heads", "add_q_proj": "heads", "add_k_proj": "heads",
           "add_v_proj": "heads", "proj_mlp": "mlp", "proj": "mlp", "linear": "mlp"}
# ... and those whose input axis is (row-parallel).
_ROW = {"0": "heads", "to_add_out": "heads", "2": "mlp"}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh; one axis may be -1 (all remaining devices)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("make_mesh: at most one axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"make_mesh: {len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"make_mesh: data*fsdp*tensor = {int(np.prod(sizes))} but there are {len(devices)} devices")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_axes(path: tuple[str, ...], ndim: int, stacked: bool) -> tuple[str | None, ...]:
    """Logical axes of one parameter from its diffusers-style path."""
    lead = ("layers",) if stacked else ()
    leaf, module = path[-1], path[-2] if len(path) > 1 else ""
    rank = ndim - len(lead)
    if leaf == "kernel" and rank == 2:
        if module in _ROW and not (module == "0" and path[-3:-2] == ("net",)):
            return lead + (_ROW[module], "embed")
        if module == "proj_out" and stacked:  # single block: input is [attn heads | mlp]
            return lead + ("mlp", "embed")
        if module in _COLUMN:
            return lead + ("embed", _COLUMN[module])
        return lead + (None, "embed") if module in ("x_embedder", "context_embedder", "linear_1") else lead + ("embed", None)
    if leaf == "bias" and rank == 1 and module in _COLUMN:
        return lead + (_COLUMN[module],)
    return lead + (None,) * rank


def mesh_spec(axes, shape, mesh: Mesh) -> P:
    """PartitionSpec for logical `axes` of an array of `shape` (non-dividing mesh axes dropped)."""
    spec, used = [], set()
    for name, dim in zip(axes, shape):
        mesh_axes = RULES.get(name) if name else None
        if mesh_axes:
            mesh_axes = tuple(a for a in mesh_axes if a not in used)
            size = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
            if not mesh_axes or dim % size:
                mesh_axes = None
        if mesh_axes:
            used.update(mesh_axes)
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        else:
            spec.append(None)
    return P(*spec)


def _is_stacked(name: str, stacks: Sequence[str]) -> bool:
    """A stack, or a segment of one stored as `<stack>_<first layer>` (SD3's blocks of mixed structure)."""
    base, _, first = name.rpartition("_")
    return name in stacks or (first.isdigit() and base in stacks)


def param_specs(params, mesh: Mesh, stacks: Sequence[str] = ("transformer_blocks", "single_transformer_blocks")):
    """PartitionSpec tree for a parameter (or ShapeDtypeStruct) tree."""
    def spec(path, leaf):
        names = tuple(str(getattr(k, "key", k)) for k in path)
        return mesh_spec(logical_axes(names, len(leaf.shape), _is_stacked(names[0], stacks)), leaf.shape, mesh)
    return jax.tree_util.tree_map_with_path(spec, params)


def param_shardings(params, mesh: Mesh, stacks: Sequence[str] = ("transformer_blocks", "single_transformer_blocks")):
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh, stacks),
                                  is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Shard the leading (batch) axis over ("data", "fsdp") where it divides; replicate the rest."""
    return NamedSharding(mesh, mesh_spec(("batch",) + (None,) * (len(shape) - 1), shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
