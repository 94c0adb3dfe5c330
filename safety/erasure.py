"""Linear concept erasure of conditioning vectors (a FLUX / SD3 pooled text vector, or text token states).

    sub = fit_subspace(unsafe, safe, rank=1)      # unsafe [N, D], safe [M, D] conditioning vectors
    pooled = erase(pooled, sub)                   # [..., D]: the concept's span moved to the safe mean
    hooks = Hooks(edits=(erase_edit(sub),))       # the same, inside the model ("embed.0.txt.pooled")

A concept that a model reads from one vector (the pooled prompt embedding FLUX and SD3 add to every
block's modulation) is out of reach of any attention transformation; where it lies along a few directions
of that vector, projecting those directions onto the safe prompts' values removes it and leaves the
rest of the vector as it was. The span is the difference of the class means, then (rank > 1) the
leading principal directions of each vector's offset from the other class's mean, orthogonal to it:
the directions along which the two sets of prompts differ most. Pure functions of arrays.
"""

from __future__ import annotations

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
