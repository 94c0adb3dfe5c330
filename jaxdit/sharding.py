"""Device mesh, the one logical-axis table, and partition specs for every parameter tree.

Mesh axes are ("data", "fsdp", "tensor"). Every parameter's logical axes are declared where the model
creates it (`layers.dense(..., axes=(input, output))`, `nn.with_logical_partitioning` on the other
initialisers), as MaxText does; a model module's `logical_axes(config)` reads them off an abstract init
(`jax.eval_shape`: nothing is allocated, so converted checkpoints, loaded without init, get them too).
`RULES` maps logical axes to mesh axes for every model family (FLUX, SD3, the text encoders) and the SAE
trainer. For model parameters a mesh axis that does not divide a dimension is dropped for that dimension
(`mesh_spec`), so tiny models run on any mesh.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (one place for the whole project)
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),  # the model width of weight matrices and embedding tables
    "heads": ("tensor",),  # attention heads x head_dim: q/k/v outputs, attention out-projection inputs
    "mlp": ("tensor",),  # MLP hidden units, AdaLN modulation outputs
    "latents": ("tensor",),  # SAE latents
    "layers": None,  # the leading axis of a scanned stack
    "vocab": None,  # rows of an embedding table (tokens, positions)
    "norm": None,  # the features of a norm's scale and bias
    "sae_in": None,  # an SAE's input width: every latent shard reads every input feature
    "tokens": None,
}

LogicalAxes = tuple  # one logical name (a RULES key) or None per dimension


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


def _rule(name: str | None) -> tuple[str, ...] | None:
    if name is None:
        return None
    if name not in RULES:
        raise ValueError(f"logical axis {name!r} has no rule in jaxdit.sharding.RULES ({sorted(RULES)})")
    return RULES[name]


def logical_spec(axes: LogicalAxes) -> P:
    """PartitionSpec of logical `axes` under `RULES` whatever the shape (the caller checks that the mesh
    divides it, as the SAE trainer does); P() when nothing is split."""
    spec = [_entry(_rule(name)) for name in axes]
    return P(*spec) if any(s is not None for s in spec) else P()


def _entry(mesh_axes: tuple[str, ...] | None):
    """One PartitionSpec entry: None, a mesh axis, or a tuple of them."""
    if not mesh_axes:
        return None
    return mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes


def mesh_spec(axes: LogicalAxes, shape, mesh: Mesh) -> P:
    """PartitionSpec for logical `axes` of an array of `shape` (non-dividing mesh axes dropped)."""
    spec, used = [], set()
    for name, dim in zip(axes, shape):
        mesh_axes = _rule(name)
        if mesh_axes:
            mesh_axes = tuple(a for a in mesh_axes if a not in used)
            size = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
            if not mesh_axes or dim % size:
                mesh_axes = None
        if mesh_axes:
            used.update(mesh_axes)
        spec.append(_entry(mesh_axes))
    return P(*spec)


# --- logical axes declared by the modules -----------------------------------------------------------

def _is_box(x) -> bool:
    return isinstance(x, nn.Partitioned)


def _name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def unboxed(variables):
    """Plain arrays from an init whose parameters carry logical-axis boxes (what users hold)."""
    return jax.tree_util.tree_map(lambda x: x.value if _is_box(x) else x, variables, is_leaf=_is_box)


def declared_axes(boxed) -> Any:
    """Tree of logical-axes tuples from a boxed (abstract) init; every parameter must declare its axes."""
    def axes(path, leaf):
        if not _is_box(leaf):
            raise ValueError(f"parameter {_name(path)} declares no logical axes")
        if len(leaf.names) != len(leaf.value.shape):
            raise ValueError(f"parameter {_name(path)} declares {len(leaf.names)} logical axes {leaf.names} for "
                             f"shape {tuple(leaf.value.shape)}")
        return tuple(leaf.names)
    return jax.tree_util.tree_map_with_path(axes, boxed, is_leaf=_is_box)


def _is_axes(x) -> bool:
    return isinstance(x, tuple)


def _check_tree(params, axes) -> None:
    have = {_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    want = {_name(p): a for p, a in jax.tree_util.tree_flatten_with_path(axes, is_leaf=_is_axes)[0]}
    missing, unexpected = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    if missing or unexpected:
        raise ValueError(f"parameter tree does not match the model's logical axes: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    for name, a in want.items():
        if len(a) != len(have[name].shape):
            raise ValueError(f"parameter {name}: shape {tuple(have[name].shape)} but logical axes {a}")


def param_specs(params, mesh: Mesh, axes):
    """PartitionSpec tree for a parameter (or ShapeDtypeStruct) tree with logical `axes` (the model
    module's `logical_axes(config)`)."""
    _check_tree(params, axes)
    return jax.tree_util.tree_map(lambda a, leaf: mesh_spec(a, leaf.shape, mesh), axes, params, is_leaf=_is_axes)


def param_shardings(params, mesh: Mesh, axes):
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh, axes),
                                  is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Shard the leading (batch) axis over ("data", "fsdp") where it divides; replicate the rest."""
    return NamedSharding(mesh, mesh_spec(("batch",) + (None,) * (len(shape) - 1), shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
