"""UVR localization in JAX against OpenCV / scipy.ndimage reference computations on random maps."""

import dataclasses

import cv2
import numpy as np
import pytest
from scipy import ndimage

import jax
import jax.numpy as jnp

from jaxdit import sharding
from jaxdit.safety.uvr import localize as loc


def _reference(scores: np.ndarray, cfg: loc.LocalizeConfig):
    """The reference algorithm, image by image, with OpenCV morphology and scipy components."""
    cores, rings = [], []
    close_el = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (cfg.close_size, cfg.close_size))
    ring_el = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (cfg.ring_size, cfg.ring_size))
    for s in scores.astype(np.float64):
        pre = s > cfg.threshold
        mass = np.zeros_like(s)
        if pre.any():
            e = np.exp(s[pre] - s[pre].max())
            mass[pre] = e / e.sum()
        closed = cv2.morphologyEx(pre.astype(np.uint8), cv2.MORPH_CLOSE, close_el).astype(bool)
        filled = ndimage.binary_fill_holes(closed)
        labels, n = ndimage.label(filled, structure=np.ones((3, 3)))
        comps = []
        for c in range(1, n + 1):
            m = labels == c
            if m.sum() >= cfg.min_area:
                comps.append((mass[m].sum(), np.flatnonzero(m.ravel())[0], m))
        comps.sort(key=lambda c: (-c[0], c[1]))
        total = sum(c[0] for c in comps)
        core = np.zeros_like(pre)
        kept, cum = 0, 0.0
        for m_sum, _, m in comps:
            if m_sum <= 0:
                break
            if cfg.keep_mode == "mass_ratio" and cum >= cfg.mass_ratio * total:
                break
            if cfg.keep_mode == "topk_mass" and kept >= cfg.topk:
                break
            core |= m
            cum += m_sum
            kept += 1
        grown = cv2.dilate(core.astype(np.uint8), ring_el, iterations=cfg.ring_iters).astype(bool)
        cores.append(core)
        rings.append(grown & ~core)
    return np.stack(cores), np.stack(rings)


def _maps(seed, batch, h, w):
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((batch, h, w))
    smooth = np.stack([ndimage.gaussian_filter(n, 1.2) for n in noise])
    return (smooth / smooth.std() * 0.5 + 0.2).astype(np.float32)


@pytest.mark.parametrize("cfg", [loc.T2I, loc.EDIT, loc.LocalizeConfig(threshold=0.3, min_area=2, mass_ratio=0.8,
                                                                        ring_size=5, ring_iters=1)])
@pytest.mark.parametrize("shape", [(16, 16), (12, 20)])
def test_localize_matches_reference(cfg, shape):
    scores = _maps(sum(shape) + cfg.min_area, 6, *shape)
    core, ring = jax.jit(loc.localize, static_argnums=1)(jnp.asarray(scores), cfg)
    ref_core, ref_ring = _reference(scores, cfg)
    assert ref_core.any(), "the random maps should produce some region"
    np.testing.assert_array_equal(np.asarray(core), ref_core)
    np.testing.assert_array_equal(np.asarray(ring), ref_ring)


def test_building_blocks_match_opencv_and_scipy():
    rng = np.random.default_rng(0)
    mask = rng.random((4, 15, 17)) > 0.6
    for size in (1, 2, 3, 5, 7):
        np.testing.assert_array_equal(loc.ellipse(size), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)))
    el = loc.ellipse(3)
    for m, d, e, f in zip(mask, np.asarray(loc.dilate(jnp.asarray(mask), el)),
                          np.asarray(loc.erode(jnp.asarray(mask), el)), np.asarray(loc.fill_holes(jnp.asarray(mask)))):
        np.testing.assert_array_equal(d, cv2.dilate(m.astype(np.uint8), el.astype(np.uint8)).astype(bool))
        np.testing.assert_array_equal(e, cv2.erode(m.astype(np.uint8), el.astype(np.uint8)).astype(bool))
        np.testing.assert_array_equal(f, ndimage.binary_fill_holes(m))
    labels = np.asarray(loc.label_components(jnp.asarray(mask)))
    for m, lab in zip(mask, labels):
        ref, n = ndimage.label(m, structure=np.ones((3, 3)))
        # same partition: a bijection between our labels and scipy's
        pairs = {(a, b) for a, b in zip(lab[m], ref[m])}
        assert len(pairs) == n == len({a for a, _ in pairs})


def test_empty_and_uniform_maps_give_no_region():
    core, ring = loc.localize(jnp.zeros((2, 8, 8)), loc.T2I)
    assert not np.asarray(core).any() and not np.asarray(ring).any()


def test_scores_and_mesh():
    rng = np.random.default_rng(1)
    heads = rng.standard_normal((2, 12, 3, 8)).astype(np.float32)
    anchors = rng.standard_normal((3, 5, 8)).astype(np.float32)
    ref = np.einsum("bnhd,hkd->bnhk", heads, anchors).mean((2, 3)) / np.sqrt(8)
    np.testing.assert_allclose(np.asarray(loc.score_patches(heads, anchors)), ref, rtol=1e-5, atol=1e-6)
    # batched localization sharded over 8 devices equals the single-device result
    scores = _maps(5, 8, 16, 16)
    mesh = sharding.make_mesh(data=8, fsdp=1, tensor=1)
    sharded = jax.device_put(jnp.asarray(scores), sharding.batch_sharding(mesh, scores.shape))
    core, ring = jax.jit(loc.localize, static_argnums=1)(sharded, loc.T2I)
    ref_core, ref_ring = _reference(scores, loc.T2I)
    np.testing.assert_array_equal(np.asarray(core), ref_core)
    np.testing.assert_array_equal(np.asarray(ring), ref_ring)


def test_resize_mask_nearest():
    m = np.random.default_rng(2).random((1, 4, 6)) > 0.5
    out = np.asarray(loc.resize_mask(jnp.asarray(m), 8, 12))
    np.testing.assert_array_equal(out, cv2.resize(m[0].astype(np.uint8), (12, 8), interpolation=cv2.INTER_NEAREST)
                                  .astype(bool)[None])


def test_presence_gate_empties_only_the_images_below_it():
    """An image whose highest score is under `presence` gets no mask; the others get exactly the ungated one."""
    rng = np.random.default_rng(3)
    scores = rng.random((3, 8, 8)).astype(np.float32)
    scores[0, 2:4, 2:4] += 2.0  # max ~3
    scores[1, 5:7, 1:3] += 1.0  # max ~2
    scores[2, 0:2, 5:7] += 2.5  # max ~3.5
    cfg = loc.LocalizeConfig(threshold=0.9, min_area=2, ring_size=3, ring_iters=1)
    ungated = loc.localize(jnp.asarray(scores), cfg)
    gated = loc.localize(jnp.asarray(scores), dataclasses.replace(cfg, presence=2.5))
    for u, g in zip(ungated, gated):
        u, g = np.asarray(u), np.asarray(g)
        assert u[1].any() and not g[1].any()
        np.testing.assert_array_equal(g[[0, 2]], u[[0, 2]])
