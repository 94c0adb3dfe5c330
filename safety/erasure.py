"""Linear concept erasure of conditioning vectors (a FLUX / SD3 pooled text vector, or text token states).

    sub = fit_subspace(unsafe, safe, rank=1)      # unsafe [N, D], safe [M, D] conditioning vectors
    pooled = erase(pooled, sub)                   # [..., D]: the concept's span moved to the safe mean
    hooks = Hooks(edits=(erase_edit(sub),))       # the same, inside the model ("embed.0.txt.pooled")
    save_subspace("star.safetensors", sub, meta)  # `jaxdit safety erase` writes these; --erase FILE reads them

A concept that a model reads from one vector (the pooled prompt embedding FLUX and SD3 add to every
block's modulation) is out of reach of any attention transformation; where it lies along a few directions
of that vector, projecting those directions onto the safe prompts' values removes it and leaves the
rest of the vector as it was. The span is the difference of the class means, then (rank > 1) the
leading principal directions of each vector's offset from the other class's mean, orthogonal to it:
the directions along which the two sets of prompts differ most. Pure functions of arrays.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdit import hooks as hk

POOLED = "embed.0.txt.pooled"  # the hook position of the pooled text vector (FLUX, SD3)


@struct.dataclass
class Subspace:
    basis: jax.Array  # [D, r], orthonormal columns
    anchor: jax.Array  # [D], where the span is moved to: the safe vectors' mean

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])


def fit_subspace(unsafe, safe, rank: int = 1) -> Subspace:
    """The rank-`rank` span separating `unsafe` [N, D] from `safe` [M, D] vectors (float64 fit)."""
    a, b = np.asarray(unsafe, np.float64), np.asarray(safe, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"fit_subspace: unsafe {a.shape} and safe {b.shape} must be [N, D] and [M, D]")
    if len(a) < 1 or len(b) < 1:
        raise ValueError(f"fit_subspace: needs vectors of both kinds, got {len(a)} unsafe and {len(b)} safe")
    if not 1 <= rank <= a.shape[1]:
        raise ValueError(f"fit_subspace: rank {rank} must be in [1, {a.shape[1]}]")
    diff = a.mean(0) - b.mean(0)
    norm = np.linalg.norm(diff)
    if not norm > 0:
        raise ValueError("fit_subspace: the unsafe and safe vectors have the same mean; nothing separates them")
    first = diff / norm
    dirs = [first]
    if rank > 1:
        offsets = np.concatenate([a - b.mean(0), b - a.mean(0)])
        offsets = offsets - np.outer(offsets @ first, first)
        _, _, vt = np.linalg.svd(offsets - offsets.mean(0), full_matrices=False)
        dirs += list(vt[: rank - 1])
    basis, _ = np.linalg.qr(np.stack(dirs, 1))
    return Subspace(jnp.asarray(basis, jnp.float32), jnp.asarray(b.mean(0), jnp.float32))


def erase(x: jax.Array, sub: Subspace) -> jax.Array:
    """x [..., D] with its component in the span replaced by the anchor's: x - P (x - anchor), P = U U^T."""
    u = sub.basis.astype(x.dtype)
    return x - ((x - sub.anchor.astype(x.dtype)) @ u) @ u.T


def erase_edit(sub: Subspace, position: str = POOLED) -> hk.Edit:
    """A `jaxdit.hooks.Edit` erasing the span at `position` (every sampling step and batch row; composes
    with UVR's and SafeDIG's hooks through `hooks.merge`)."""
    return hk.Edit(position, lambda p, x, ctx: erase(x, p), sub)


FORMAT = "concept-erasure"


def save_subspace(path, sub: Subspace, meta: dict) -> Path:
    """Write `sub` atomically: safetensors with `basis` [D, r] and `anchor` [D], JSON metadata (position, ...)."""
    from jaxdit.io import save_safetensors

    tensors = {"basis": np.asarray(sub.basis, np.float32), "anchor": np.asarray(sub.anchor, np.float32)}
    return save_safetensors(path, tensors,
                            {"jaxdit": json.dumps({"format": FORMAT, "version": 1, "position": POOLED, **meta})})


def load_subspace(path) -> tuple[Subspace, dict]:
    """(Subspace, metadata) of a file `save_subspace` wrote; one-line errors naming the file and the key."""
    from jaxdit.io import CheckpointError, SafetensorsFile

    f = SafetensorsFile(path)
    meta = json.loads(f.metadata.get("jaxdit", "{}"))
    if meta.get("format") != FORMAT or not {"basis", "anchor"} <= set(f.keys()):
        raise CheckpointError(f"{path}: not a concept erasure (needs 'basis' and 'anchor' tensors and jaxdit "
                              f"metadata of format {FORMAT!r})")
    basis, anchor = np.asarray(f.get("basis"), np.float32), np.asarray(f.get("anchor"), np.float32)
    if basis.ndim != 2 or anchor.shape != (basis.shape[0],):
        raise CheckpointError(f"{path}: basis must be [D, r] and anchor [D], got {basis.shape} and {anchor.shape}")
    if not np.allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-4):
        raise CheckpointError(f"{path}: basis: the columns are not orthonormal")
    return Subspace(jnp.asarray(basis), jnp.asarray(anchor)), meta


def pooled_vectors(pipe, prompts, batch: int = 16) -> np.ndarray:
    """The pooled text vectors [N, D] a FLUX or SD3 pipeline conditions on for `prompts` (its CLIP encoders;
    the T5 sequence, which the pooled vector does not depend on, is kept short)."""
    prompts = list(prompts)
    out = [np.asarray(pipe.encode_prompt(prompts[i:i + batch], max_sequence_length=16)[1], np.float32)
           for i in range(0, len(prompts), batch)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
