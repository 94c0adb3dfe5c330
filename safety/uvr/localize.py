"""UVR start-up stage localization: patch scores against an anchor bank -> core and ring masks.

Everything is a pure JAX function of fixed-shape arrays, batched over images, so it runs inside the
compiled sampling loop (no OpenCV, no host round trip) at any resolution. The steps follow the public
reference (uvr.md section 4), with well-defined border semantics:

1. score: mean over heads and anchors of the scaled dot product o . a / sqrt(D);
2. pre-mask: score > threshold (empty -> no intervention);
3. masked softmax of the scores over the map (the "mass" of each patch);
4. closing with a 3x3 ellipse (dilation with outside = 0, then erosion with outside = 1, as OpenCV);
5. hole filling: background not reachable from the map border becomes foreground (scipy's
   `binary_fill_holes`; `hole_fill="origin"`: the reference's flood fill from pixel (0, 0), which also
   fills border-touching regions cut off from (0, 0) and fills the whole map when (0, 0) is masked);
6. 8-connected components, those smaller than `min_area` dropped;
7. components kept by mass: the heaviest until their cumulative share reaches `mass_ratio`
   ("mass_ratio") or the `topk` heaviest ("topk_mass");
8. core = kept components (`soft_core=True`: the reference editing core `soft > 0`, i.e. the kept
   components within the support of the Gaussian-blurred mass); ring = core dilated `ring_iters` times
   by a `ring_size` ellipse, minus core.

`LocalizeConfig.reference(mode)` is the public reference code's setting; the module-level `T2I` / `EDIT`
are jaxdit's defaults (docs/uvr.md, "Reference-exact setting and the jaxdit default").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class LocalizeConfig:
    threshold: float = 0.6  # reference: 0.6 for FLUX.1-dev text-to-image, 0.2 for Kontext editing
    close_size: int = 3
    min_area: int = 5  # reference: 5 (T2I), 3 (editing)
    keep_mode: str = "mass_ratio"  # reference: "mass_ratio" (T2I), "topk_mass" (editing)
    mass_ratio: float = 0.3
    topk: int = 3
    ring_size: int = 7
    ring_iters: int = 2
    # "border": fill every background region not 4-connected to the map border (jaxdit);
    # "origin": the reference's cv2.floodFill from pixel (0, 0), 4-connected
    hole_fill: str = "border"
    # core = support of the blurred mass inside the kept components (the reference's editing core
    # `mask_soft > 0`); False: the kept components themselves
    soft_core: bool = False
    blur_sigma: float = 0.9  # the reference's GaussianBlur sigma (only its kernel size matters for the core)
    # An image-level gate (jaxdit; None: off, as in the reference): an image whose highest patch score is
    # below `presence` gets no mask, so a bank whose patch threshold is tuned for the concept's outline
    # does not restrict images that do not show the concept at all.
    presence: float | None = None

    def __post_init__(self):
        if self.keep_mode not in ("mass_ratio", "topk_mass"):
            raise ValueError(f"LocalizeConfig.keep_mode={self.keep_mode!r}: expected 'mass_ratio' or 'topk_mass'")
        if self.hole_fill not in ("border", "origin"):
            raise ValueError(f"LocalizeConfig.hole_fill={self.hole_fill!r}: expected 'border' or 'origin'")

    @classmethod
    def reference(cls, mode: str = "t2i", **overrides) -> "LocalizeConfig":
        """The public reference code's localization for `mode` ("t2i": FLUX.1-dev, "edit": Kontext):
        flood fill from (0, 0), and for editing the core `soft > 0`. `overrides` replace fields (e.g. a
        threshold calibrated for another anchor bank)."""
        if mode == "t2i":
            base = cls(hole_fill="origin")
        elif mode == "edit":
            base = cls(threshold=0.2, min_area=3, keep_mode="topk_mass", topk=3, hole_fill="origin", soft_core=True)
        else:
            raise ValueError(f"LocalizeConfig.reference: mode {mode!r}, expected 't2i' or 'edit'")
        return dataclasses.replace(base, **overrides)


T2I = LocalizeConfig()
EDIT = LocalizeConfig(threshold=0.2, min_area=3, keep_mode="topk_mass", topk=3)


def ellipse(size: int) -> np.ndarray:
    """OpenCV's MORPH_ELLIPSE structuring element of a size x size box."""
    if size < 1:
        raise ValueError(f"structuring element size must be >= 1, got {size}")
    r = size // 2
    el = np.zeros((size, size), bool)
    if size == 1:
        el[:] = True
        return el
    inv_r2 = 1.0 / (r * r)
    for i in range(size):
        dy = i - r
        if abs(dy) <= r:
            dx = int(round(r * np.sqrt(max(0.0, 1 - dy * dy * inv_r2))))
            el[i, max(r - dx, 0):min(r + dx + 1, size)] = True
    return el


def score_patches(attn_heads: jax.Array, anchors: jax.Array) -> jax.Array:
    """Patch scores [B, N] = mean over heads h and anchors k of o[b, n, h] . a[h, k] / sqrt(D).

    attn_heads: [B, N, H, D] per-head attention output of the generated patches; anchors: [H, K, D].
    """
    d = attn_heads.shape[-1]
    dots = jnp.einsum("bnhd,hkd->bnhk", attn_heads.astype(jnp.float32), anchors.astype(jnp.float32))
    return dots.mean(axis=(2, 3)) / np.sqrt(d)


def _shifted(x: jax.Array, dy: int, dx: int, fill) -> jax.Array:
    """x[.., i + dy, j + dx] with `fill` outside the map. x: [B, H, W]."""
    h, w = x.shape[-2:]
    p = max(abs(dy), abs(dx))
    padded = jnp.pad(x, ((0, 0), (p, p), (p, p)), constant_values=fill)
    return padded[:, p + dy:p + dy + h, p + dx:p + dx + w]


def dilate(mask: jax.Array, element: np.ndarray) -> jax.Array:
    """Binary dilation, outside the map = background. mask: [B, H, W] bool."""
    r0, r1 = element.shape[0] // 2, element.shape[1] // 2
    out = jnp.zeros_like(mask)
    for i, j in zip(*np.nonzero(element)):
        out = out | _shifted(mask, int(i) - r0, int(j) - r1, False)
    return out


def erode(mask: jax.Array, element: np.ndarray) -> jax.Array:
    """Binary erosion, outside the map = foreground (so borders do not erode, as in OpenCV)."""
    r0, r1 = element.shape[0] // 2, element.shape[1] // 2
    out = jnp.ones_like(mask)
    for i, j in zip(*np.nonzero(element)):
        out = out & _shifted(mask, int(i) - r0, int(j) - r1, True)
    return out


_N8 = np.ones((3, 3), bool)
_N4 = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)


def fill_holes(mask: jax.Array, from_origin: bool = False) -> jax.Array:
    """Foreground plus every background pixel not 4-connected to the border (scipy binary_fill_holes).

    from_origin: the reference's `cv2.floodFill(mask, (0, 0))` then "unreached zeros become 1": keep only
    the background 4-connected to pixel (0, 0). Border-touching regions cut off from it are filled too,
    and a masked (0, 0) fills the whole map.
    """
    background = ~mask
    h, w = mask.shape[-2:]
    if from_origin:
        seed = jnp.zeros((h, w), bool).at[0, 0].set(True)
    else:
        seed = jnp.zeros((h, w), bool).at[0].set(True).at[-1].set(True).at[:, 0].set(True).at[:, -1].set(True)
    reach = background & seed

    def grow(state):
        reach, _ = state
        new = dilate(reach, _N4) & background
        return new, jnp.any(new != reach)

    reach, _ = jax.lax.while_loop(lambda s: s[1], grow, (reach, jnp.bool_(True)))
    return ~reach


def blur_radius(sigma: float) -> int:
    """Half-width of the kernel `cv2.GaussianBlur(x, (0, 0), sigma)` uses on a float image: the size is
    round(8 sigma + 1) rounded up to odd (0 for sigma <= 0: no blur)."""
    if sigma <= 0:
        return 0
    return (int(np.rint(sigma * 8 + 1)) | 1) // 2


def box_dilate(mask: jax.Array, radius: int) -> jax.Array:
    """Dilation by a (2 radius + 1)^2 square, outside the map = background. mask: [B, H, W] bool."""
    rows = mask
    for d in range(1, radius + 1):
        rows = rows | _shifted(mask, d, 0, False) | _shifted(mask, -d, 0, False)
    out = rows
    for d in range(1, radius + 1):
        out = out | _shifted(rows, 0, d, False) | _shifted(rows, 0, -d, False)
    return out


def label_components(mask: jax.Array) -> jax.Array:
    """8-connected component labels [B, H, W] int32: each component is labelled by the smallest flat
    index of its pixels; background is -1."""
    b, h, w = mask.shape
    big = h * w
    index = jnp.broadcast_to(jnp.arange(big, dtype=jnp.int32).reshape(h, w), mask.shape)
    labels = jnp.where(mask, index, big)

    def step(state):
        labels, _ = state
        neighbour_min = labels
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy or dx:
                    neighbour_min = jnp.minimum(neighbour_min, _shifted(labels, dy, dx, big))
        new = jnp.where(mask, neighbour_min, big)
        return new, jnp.any(new != labels)

    labels, _ = jax.lax.while_loop(lambda s: s[1], step, (labels, jnp.bool_(True)))
    return jnp.where(mask, labels, -1)


def _per_component(labels: jax.Array, values: jax.Array) -> jax.Array:
    """Sum of `values` over each component label: [B, H*W] (index = label)."""
    b, h, w = labels.shape
    flat, vals = labels.reshape(b, -1), values.reshape(b, -1)
    seg = jnp.where(flat >= 0, flat, h * w)  # background to an extra bucket
    return jax.vmap(lambda s, v: jax.ops.segment_sum(v, s, num_segments=h * w + 1)[:-1])(seg, vals)


def localize(scores: jax.Array, config: LocalizeConfig = T2I) -> tuple[jax.Array, jax.Array]:
    """Scores [B, H, W] -> (core, ring) boolean masks [B, H, W]. Empty where nothing passes the threshold
    (or, with `config.presence`, where no patch reaches it)."""
    scores = scores.astype(jnp.float32)
    b, h, w = scores.shape
    pre = scores > config.threshold
    if config.presence is not None:
        pre = pre & (scores.reshape(b, -1).max(-1) >= config.presence)[:, None, None]
    logits = jnp.where(pre, scores, -jnp.inf).reshape(b, -1)
    any_pre = jnp.any(pre.reshape(b, -1), axis=-1, keepdims=True)
    mass = jnp.where(any_pre, jax.nn.softmax(jnp.where(any_pre, logits, 0.0), axis=-1), 0.0).reshape(b, h, w)

    el = ellipse(config.close_size)
    mask = fill_holes(erode(dilate(pre, el), el), from_origin=config.hole_fill == "origin")
    labels = label_components(mask)
    area = _per_component(labels, jnp.ones_like(scores))
    comp_mass = _per_component(labels, mass)
    valid = area >= config.min_area
    comp_mass = jnp.where(valid, comp_mass, 0.0)
    order = jnp.argsort(-comp_mass, axis=-1, stable=True)
    sorted_mass = jnp.take_along_axis(comp_mass, order, axis=-1)
    if config.keep_mode == "mass_ratio":
        total = sorted_mass.sum(-1, keepdims=True)
        before = jnp.cumsum(sorted_mass, axis=-1) - sorted_mass
        keep_sorted = (before < config.mass_ratio * total) & (sorted_mass > 0)
    else:
        keep_sorted = (jnp.arange(h * w) < config.topk) & (sorted_mass > 0)
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(b)[:, None], order].set(keep_sorted)
    keep = keep & valid
    flat = labels.reshape(b, -1)
    core = jnp.where(flat >= 0, jnp.take_along_axis(keep, jnp.maximum(flat, 0), axis=-1), False).reshape(b, h, w)
    if config.soft_core:
        # The reference's soft mask is blur(mass) x hard x edge, normalised. Every Gaussian tap is
        # positive and a tap reflected at the border (BORDER_REFLECT_101) reads a patch no farther away
        # than the tap itself, so blur(mass) > 0 exactly within `radius` (Chebyshev) of a patch of
        # positive mass; the distance-transform edge factor is positive on every hard-mask patch. Hence
        # soft > 0 <=> hard & box-dilated (mass > 0), up to float32 underflow of products below 1e-45.
        core = core & box_dilate(mass > 0, blur_radius(config.blur_sigma))

    grown = core
    ring_el = ellipse(config.ring_size)
    for _ in range(config.ring_iters):
        grown = dilate(grown, ring_el)
    return core, grown & ~core


def resize_mask(mask: jax.Array, height: int, width: int) -> jax.Array:
    """Nearest-neighbour resize of [B, h, w] masks to [B, height, width] (output grid -> context grid)."""
    b, h, w = mask.shape
    if (h, w) == (height, width):
        return mask
    rows = (np.arange(height) * h) // height
    cols = (np.arange(width) * w) // width
    return mask[:, rows][:, :, cols]
