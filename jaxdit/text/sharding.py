"""Partition specs for text-encoder parameter trees.

`jaxdit.sharding.logical_axes` keys on diffusers module names (to_q, proj_mlp, ...); CLIP's and T5's
transformers names are not in its tables, so they would get only the generic ("embed", None) split.
This table gives them the Megatron layout under the project's one `RULES` table: q/k/v and the FFN
input column-parallel over heads / MLP units, the output projections row-parallel, the model width over
`fsdp`. A T5-XXL (4.7 G parameters, 19 GB in float32) is therefore split across devices, never replicated.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdit.sharding import mesh_spec

STACKS = ("layers", "block")  # CLIP encoder layers, T5 blocks

# Linear layers whose output axis is split (column-parallel) ...
_COLUMN = {"q_proj": "heads", "k_proj": "heads", "v_proj": "heads", "fc1": "mlp",  # CLIP
           "q": "heads", "k": "heads", "v": "heads", "wi": "mlp", "wi_0": "mlp", "wi_1": "mlp"}  # T5
# ... and those whose input axis is (row-parallel).
_ROW = {"out_proj": "heads", "fc2": "mlp", "o": "heads", "wo": "mlp"}
_EMBEDDINGS = ("token_embedding", "position_embedding", "shared")  # [rows, width]: width over fsdp


def logical_axes(path: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
    """Logical axes of one text-encoder parameter from its path (see jaxdit.text.clip / t5)."""
    lead = ("layers",) if path[0] in STACKS else ()
    leaf, module = path[-1], path[-2] if len(path) > 1 else ""
    rank = ndim - len(lead)
    if leaf == "kernel" and rank == 2:
        if module in _COLUMN:
            return lead + ("embed", _COLUMN[module])
        if module in _ROW:
            return lead + (_ROW[module], "embed")
        return lead + ("embed", None)  # text_projection
    if leaf == "bias" and rank == 1 and module in _COLUMN:
        return lead + (_COLUMN[module],)
    if leaf == "embedding" and module in _EMBEDDINGS:
        return lead + (None, "embed")
    return lead + (None,) * rank  # norms, row-parallel biases, the small relative-position table


def text_param_specs(params, mesh: Mesh):
    """PartitionSpec tree for a CLIP or T5 parameter (or ShapeDtypeStruct) tree."""
    def spec(path, leaf):
        names = tuple(str(getattr(k, "key", k)) for k in path)
        return mesh_spec(logical_axes(names, len(leaf.shape)), leaf.shape, mesh)
    return jax.tree_util.tree_map_with_path(spec, params)


def text_param_shardings(params, mesh: Mesh):
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), text_param_specs(params, mesh),
                                  is_leaf=lambda x: isinstance(x, P))
