"""The reference-exact UVR setting against the public reference code's localization and restriction paths.

`_reference_masks` re-implements the reference's mask construction (build_continuous_mask_multi with the
arguments of its FLUX.1-dev and Kontext call sites, then its patch lists) from the published steps, on
OpenCV and numpy: threshold, masked softmax, cv2.morphologyEx close (3x3 ellipse), cv2.floodFill from
(0, 0) with "unreached zeros become 1", cv2.connectedComponentsWithStats (8-connectivity) with the area
and mass rules, and for editing the soft mask cv2.GaussianBlur(sigma 0.9) x hard x edge from
cv2.distanceTransform(DIST_L2, 3), core = soft > 0, ring = cv2.dilate(core, 7x7 ellipse, 2 iterations)
minus core. The reference asserts a 64x64 map; the steps are the same at any size. The timestep the
reference tests is computed with PyTorch in bfloat16, as its pipeline and transformer do.
"""

import dataclasses

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage

import jax
import jax.numpy as jnp

from jaxdit import hooks as hk, sampling
from jaxdit.attention import joint_attention
from jaxdit.hooks import Geometry
from jaxdit.safety.uvr import anchors as anc, localize as loc
from jaxdit.safety.uvr.regulate import RegulateConfig, UVRController, reference_timestep

SHAPES = [(16, 16), (24, 40), (64, 64)]
SCALES = dict(core=0.2, ring=0.4, amplify=1.05)
# the reference's call-site arguments: threshold, min area, keep mode, k, mass ratio
CALL_SITES = {"t2i": (0.6, 5, "mass_ratio", 3, 0.3), "edit": (0.2, 3, "topk_mass", 3, 0.8)}


# --- the reference's code paths --------------------------------------------------------------------

def _ellipse(size):
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def _reference_masks(score: np.ndarray, mode: str, fill: str = "flood"):
    """One map [h, w] -> (hard, core, ring) as the reference builds them (module docstring); text-to-image
    uses the hard mask alone (no ring). fill="scipy": scipy's binary_fill_holes in place of the flood."""
    thr, min_area, keep_mode, k, ratio = CALL_SITES[mode]
    x = score.astype(np.float32)
    pre = x > np.float32(thr)
    empty = np.zeros(x.shape, bool)
    if not pre.any():
        return empty, empty, empty
    logits = np.where(pre, x, np.finfo(np.float32).min)
    e = np.exp(logits - logits.max())
    mass = (e / e.sum()).astype(np.float32)
    m = cv2.morphologyEx(pre.astype(np.uint8), cv2.MORPH_CLOSE, _ellipse(3), iterations=1)
    if fill == "scipy":
        m = ndimage.binary_fill_holes(m).astype(np.uint8)
    else:
        flood = m.copy()
        cv2.floodFill(flood, np.zeros((x.shape[0] + 2, x.shape[1] + 2), np.uint8), (0, 0), 2)
        m = np.clip(m + (flood == 0), 0, 1).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    comps = [(float(mass[labels == c].sum()), c) for c in range(1, n) if stats[c, cv2.CC_STAT_AREA] >= min_area]
    comps.sort(key=lambda c: c[0], reverse=True)  # stable: equal masses keep label order
    if keep_mode == "topk_mass":
        kept = comps[:k]
    else:
        total, acc, kept = sum(c[0] for c in comps) + 1e-12, 0.0, []
        for c in comps:
            kept.append(c)
            acc += c[0]
            if acc / total >= ratio:
                break
    hard = np.isin(labels, [c for _, c in kept])
    if mode == "t2i":
        return hard, hard, empty
    soft = cv2.GaussianBlur(mass, (0, 0), 0.9) * hard.astype(np.float32)
    dist = cv2.distanceTransform(hard.astype(np.uint8), cv2.DIST_L2, 3)
    dist = dist / (dist.max() + 1e-6)
    soft = soft * (1.0 - np.exp(-(dist ** 2) / (2 * 1.2 ** 2))).astype(np.float32)
    if soft.max() > 0:
        soft = soft / (soft.max() + 1e-8)
    core = soft > 0
    ring = cv2.dilate(core.astype(np.uint8), _ellipse(7), iterations=2).astype(bool) & ~core
    return hard, core, ring


def _reference_restriction(q, k, v, n_txt, n_gen, core, ring, amplify=True):
    """The reference's Kontext attention for one image: explicit P, in-place scaling, no renormalisation."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))  # [T, H, D]
    logits = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ctx0 = n_txt + n_gen
    for j in np.flatnonzero(core):
        p[:, :ctx0, ctx0 + j] *= SCALES["core"]
    for j in np.flatnonzero(ring):
        p[:, :ctx0, ctx0 + j] *= SCALES["ring"]
    if amplify:
        p[:, n_txt:ctx0, :ctx0] *= SCALES["amplify"]
    return np.einsum("hqk,khd->qhd", p, v)


def _torch_timestep(t: float):
    """The timestep tensor (bf16) the reference's attention code compares, for scheduler value t."""
    tb = torch.tensor([t], dtype=torch.float32).to(torch.bfloat16)
    return (tb / 1000).to(torch.bfloat16) * 1000


# --- random score maps -----------------------------------------------------------------------------

def _maps(seed, n, h, w, mode):
    """Smooth random maps around the mode's threshold, a third crossed by a high band (regions cut off at
    the border) and a third with a high blob at pixel (0, 0)."""
    rng = np.random.default_rng(seed)
    thr = CALL_SITES[mode][0]
    out = []
    for i in range(n):
        s = ndimage.gaussian_filter(rng.standard_normal((h, w)), rng.uniform(0.8, 2.0))
        s = s / s.std() * 0.5 + thr - rng.uniform(0.2, 0.6)
        if i % 3 == 1:
            if rng.random() < 0.5:
                s[:, rng.integers(1, w - 1)] += 2.0
            else:
                s[rng.integers(1, h - 1), :] += 2.0
        elif i % 3 == 2:
            s[:3, :3] += 2.0
        out.append(s)
    return np.stack(out).astype(np.float32)


_localize = jax.jit(loc.localize, static_argnums=1)


def _same(core, ring, ref, mode):
    """Masks equal to the reference's (text-to-image uses the core alone)."""
    return np.array_equal(core, ref[1]) and (mode == "t2i" or np.array_equal(ring, ref[2]))


@pytest.mark.parametrize("mode", ["t2i", "edit"])
def test_reference_setting_localizes_exactly(mode):
    """Exact equality with the reference on every map. The jaxdit default differs on some (at 24x40);
    for text-to-image it equals the reference with scipy's hole filling swapped in, on every map."""
    ref_cfg = loc.LocalizeConfig.reference(mode)
    exact = total = 0
    for shape in SHAPES:
        scores = _maps(shape[0] * shape[1] + len(mode), 20, *shape, mode)
        core, ring = (np.asarray(a) for a in _localize(jnp.asarray(scores), ref_cfg))
        refs = [_reference_masks(s, mode) for s in scores]
        for i, ref in enumerate(refs):
            np.testing.assert_array_equal(core[i], ref[1], err_msg=f"core {mode} {shape} map {i}")
            if mode == "edit":
                np.testing.assert_array_equal(ring[i], ref[2], err_msg=f"ring {mode} {shape} map {i}")
            exact += _same(core[i], ring[i], ref, mode)
            total += 1
        if shape == (24, 40):
            d_core, d_ring = (np.asarray(a) for a in _localize(jnp.asarray(scores), loc.T2I if mode == "t2i" else
                                                                loc.EDIT))
            default_same = sum(_same(d_core[i], d_ring[i], ref, mode) for i, ref in enumerate(refs))
            if mode == "t2i":
                for i, s in enumerate(scores):
                    np.testing.assert_array_equal(d_core[i], _reference_masks(s, mode, "scipy")[1])
    print(f"{mode}: reference setting {exact}/{total} exact; jaxdit default {default_same}/20 at 24x40")
    assert exact == total and default_same < 20


def test_each_localization_item_switches_alone():
    """Editing: the flood alone gives the reference's hard mask; the soft core alone gives the reference's
    core and ring with scipy's hole filling swapped in."""
    scores = _maps(7, 12, 24, 40, "edit")
    hard_only = np.asarray(_localize(jnp.asarray(scores), loc.LocalizeConfig.reference("edit", soft_core=False))[0])
    soft_only = [np.asarray(a) for a in _localize(jnp.asarray(scores), dataclasses.replace(loc.EDIT, soft_core=True))]
    for i, s in enumerate(scores):
        np.testing.assert_array_equal(hard_only[i], _reference_masks(s, "edit")[0])
        _, core, ring = _reference_masks(s, "edit", "scipy")
        np.testing.assert_array_equal(soft_only[0][i], core)
        np.testing.assert_array_equal(soft_only[1][i], ring)
    assert loc.LocalizeConfig.reference("t2i") == loc.LocalizeConfig(hole_fill="origin")
    # the new options default to the previous behaviour
    assert (loc.T2I.hole_fill, loc.T2I.soft_core, loc.EDIT.hole_fill, loc.EDIT.soft_core) == (
        "border", False, "border", False)


def test_flood_and_blur_support_match_opencv():
    rng = np.random.default_rng(3)
    masks = rng.random((24, 9, 13)) > 0.55
    masks[::3, 0, 0] = True  # (0, 0) masked: the flood fills everything
    masks[1::3, :, 4] = True  # a band cutting off the border-touching regions right of it
    filled = np.asarray(loc.fill_holes(jnp.asarray(masks), from_origin=True))
    for m, f in zip(masks, filled):
        flood = m.astype(np.uint8)
        cv2.floodFill(flood, np.zeros((11, 15), np.uint8), (0, 0), 2)
        np.testing.assert_array_equal(f, m | (flood == 0))
    dilate = jax.jit(loc.box_dilate, static_argnums=1)
    for sigma, shape in [(0.5, (20, 17)), (0.9, (20, 17)), (1.3, (20, 17)), (2.2, (20, 17)), (0.9, (3, 5)),
                         (0.9, (8, 8))]:
        impulses = np.zeros((4, *shape), np.float32)
        for j, (y, x) in enumerate([(0, 0), (shape[0] // 2, shape[1] // 2), (shape[0] - 1, 1), (1, shape[1] - 1)]):
            impulses[j, y, x] = 1e-3
        support = np.asarray(dilate(jnp.asarray(impulses > 0), loc.blur_radius(sigma)))
        for imp, sup in zip(impulses, support):
            np.testing.assert_array_equal(sup, cv2.GaussianBlur(imp, (0, 0), sigma) > 0)


# --- restriction and timing ------------------------------------------------------------------------

def _geometry(h, w, n_txt, ctx=True):
    n = h * w
    return Geometry(hk.TokenLayout(n_txt, n, n if ctx else 0), (h, w), (h, w) if ctx else None)


def _captures(scores):
    """Per-head attention output [B, N, 1, 1] whose score against a unit anchor bank is `scores`."""
    return {"single.10.img.attn_heads": jnp.asarray(scores.reshape(scores.shape[0], -1, 1, 1))}


@pytest.mark.parametrize("shape", [(12, 20)])
def test_reference_restriction_from_scores_to_attention(shape):
    """Editing, end to end: scores -> reference-setting controller -> attention, against the reference's
    localization and in-place scaling; at t = 1000 (no mask yet) the x1.05 alone."""
    h, w = shape
    n_txt, heads, d, b = 5, 2, 8, 2
    geo = _geometry(h, w, n_txt)
    ctl = UVRController.reference(jnp.ones((1, 1, 1)), jax.random.key(0), "edit")
    scores = _maps(h + w, b, h, w, "edit") + 0.2
    state = jax.jit(lambda c: ctl.update(ctl.init(b, geo), c, jnp.int32(0), jnp.float32(1000.0), geo))(
        _captures(scores))
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((b, geo.layout.total, heads, d)).astype(np.float32) for _ in range(3))

    @jax.jit
    def attend(state, step, t, q, k, v):
        hooks = ctl.hooks(state, step, t, geo)
        return joint_attention(q, k, v, hk.combine_masks([(hooks.attention[0], jnp.bool_(True))]), "xla")

    first = np.asarray(attend(ctl.init(b, geo), jnp.int32(0), jnp.float32(1000.0), q, k, v))
    later = np.asarray(attend(state, jnp.int32(1), jnp.float32(988.4), q, k, v))
    for i in range(b):
        _, core, ring = _reference_masks(scores[i], "edit")
        assert core.any()
        ref_first = _reference_restriction(q[i], k[i], v[i], n_txt, h * w, core * 0, ring * 0)
        ref_later = _reference_restriction(q[i], k[i], v[i], n_txt, h * w, core.ravel(), ring.ravel())
        assert np.abs(first[i] - ref_first).max() <= 1e-5
        assert np.abs(later[i] - ref_later).max() <= 1e-5


def test_reference_noise_covers_first_2000_patches():
    h = w = 64
    geo = _geometry(h, w, 4, ctx=False)
    ctl = UVRController.reference(jnp.ones((1, 1, 1)), jax.random.key(1), "t2i")
    scores = _maps(11, 3, h, w, "t2i")
    scores[0] += 1.0  # a region of more than 2000 patches
    hard = np.stack([_reference_masks(s, "t2i")[0] for s in scores])  # the localization is tested above
    state = {"core": jnp.asarray(hard), "ring": jnp.zeros_like(jnp.asarray(hard))}
    (edit, _) = ctl.hooks(state, jnp.int32(1), jnp.float32(988.4), geo).edits
    x = jnp.asarray(np.random.default_rng(5).standard_normal((3, h * w, 2, 4)).astype(np.float32))
    ctx = hk.HookContext(layer=jnp.int32(3), step=jnp.int32(1), key=jax.random.key(9), stack="double",
                         stream="img", site="attn_heads", layout=geo.layout)
    out = np.asarray(edit.fn(edit.params, x, ctx))
    noise = np.asarray(jax.random.normal(jax.random.key(9), x.shape))
    sizes = []
    for i in range(3):
        rows = np.flatnonzero(hard[i].ravel())[:2000]
        sizes.append(hard[i].sum())
        expect = np.asarray(x[i]).copy()
        expect[rows] = 0.001 * expect[rows] + 0.999 * noise[i, rows]
        np.testing.assert_array_equal(np.any(out[i] != np.asarray(x[i]), axis=(1, 2)),
                                      np.isin(np.arange(h * w), rows))
        assert np.abs(out[i] - expect).max() <= 1e-6
    assert max(sizes) > 2000


def test_reference_timestep_is_torch_bf16():
    special = [1000.0, 988.4, 850.4, 852.0, 850.0, 849.9, 848.0, 830.0, 104.7, 104.5, 104.0]
    grid = np.concatenate([np.linspace(0, 1000, 4001), special]).astype(np.float32)
    ours = np.asarray(reference_timestep(grid))
    ref = ((torch.tensor(grid).to(torch.bfloat16) / 1000).to(torch.bfloat16) * 1000).float().numpy()
    np.testing.assert_array_equal(ours, ref)
    cfg = RegulateConfig.reference()
    for t in np.concatenate([grid[::200], special]).astype(np.float32):
        tr = _torch_timestep(float(t))
        assert bool(cfg.in_window(t)) == bool(tr >= 850)
        assert bool(cfg.first_step(t)) == bool(tr == 1000)
        assert bool(cfg.relocalize(t)) == (int(tr) > 850)


def test_reference_timeline_in_the_compiled_loop(steps=28):
    """Over FLUX's 28-step 1024^2 schedule, under lax.scan, batch 2: the masks and switches the reference-setting
    controller hands each step equal those the reference's global state holds for the blocks before its
    localization block (text-to-image: noise rows; editing: x0.2 / x0.4 labels and the x1.05)."""
    _, timesteps = sampling.flux_schedule(sampling.FLUX_DEV_SCHEDULER, steps, 4096)
    h, w, b, n_txt = 8, 8, 2, 3
    maps = np.stack([_maps(s, b, h, w, "t2i") for s in range(steps)])  # [S, B, h, w]
    maps_edit = maps - 0.4

    def run(mode, maps):
        geo = _geometry(h, w, n_txt, ctx=mode == "edit")
        ctl = UVRController.reference(jnp.ones((1, 1, 1)), jax.random.key(0), mode)

        def body(state, xs):
            i, t, m = xs
            hooks = ctl.hooks(state, i, t, geo)
            if mode == "t2i":
                p = hooks.edits[0].params
                out = (p["mask"] & p["active"], jnp.zeros((b,), bool))
            else:
                mask = hooks.attention[0]
                ctx_groups = mask.token_groups[:, n_txt + h * w:]  # 2 + context label (0, core 1, ring 2)
                on = jnp.any(mask.scale != 1.0, axis=(1, 2, 3))
                out = (ctx_groups, on)
            return ctl.update(state, _captures(m), i, t, geo), out

        xs = (jnp.arange(steps, dtype=jnp.int32), jnp.asarray(timesteps), jnp.asarray(maps))
        _, out = jax.jit(lambda s, xs: jax.lax.scan(body, s, xs))(ctl.init(b, geo), xs)
        return [np.asarray(a) for a in out]

    rows, _ = run("t2i", maps)
    groups, on = run("edit", maps_edit)
    for i in range(b):
        noise_rows = np.zeros(h * w, bool)  # reference T2I global state (batch 1 per image)
        labels = {}
        for s, t in enumerate(timesteps):
            tr = _torch_timestep(float(t))
            # t2i: blocks before single-10 use the current list while t >= 850; single-10 may refresh it
            if int(tr) == 1000:
                noise_rows[:] = False
            np.testing.assert_array_equal(rows[s, i], noise_rows & bool(tr >= 850), err_msg=f"t2i step {s}")
            if int(tr) > 850:
                hard = _reference_masks(maps[s, i], "t2i")[0].ravel()
                noise_rows = np.isin(np.arange(h * w), np.flatnonzero(hard)[:2000])
            # edit: the explicit path runs while t >= 850 and (t == 1000 or the dict is non-empty)
            if bool(tr == 1000):
                labels = {}
            path = bool(tr >= 850) and (bool(tr == 1000) or len(labels) > 0)
            assert on[s, i] == path, f"edit step {s}"
            if path:
                expect = np.zeros(h * w, int)
                for j, val in labels.items():
                    expect[j] = 1 if val == 2 else 2
                np.testing.assert_array_equal(groups[s, i] - 2, expect, err_msg=f"edit step {s}")
            if bool(tr == 1000):
                _, core, ring = _reference_masks(maps_edit[s, i], "edit")
                labels = {**{int(j): 1 for j in np.flatnonzero(ring.ravel())},
                          **{int(j): 2 for j in np.flatnonzero(core.ravel())}}
    assert on[0].all() and on[1:].any()  # the first step always, later steps where a mask was found


def test_each_timing_item_switches_alone():
    ref = RegulateConfig.reference()
    assert (ref.amplify_first_step, ref.max_noise_patches, ref.relocalize_above, ref.bf16_timestep) == (
        True, 2000, True, True)
    default = RegulateConfig()
    assert (default.amplify_first_step, default.max_noise_patches, default.relocalize_above,
            default.bf16_timestep) == (False, None, False, False)
    t = np.float32(850.4)  # step 10 of 28 at 1024^2
    assert not bool(RegulateConfig(relocalize_above=True).relocalize(t))  # float32: int(850.4) = 850
    assert bool(RegulateConfig(relocalize_above=True, bf16_timestep=True).relocalize(t))  # bf16: 852
    assert bool(default.relocalize(t)) and bool(default.in_window(t))


def test_anchor_collection_steps():
    for steps in (28, 50, 30, 12):
        _, t = sampling.flux_schedule(sampling.FLUX_DEV_SCHEDULER, steps, 4096)
        ref_t2i = [s for s, x in enumerate(t) if bool(_torch_timestep(float(x)) == 104)]
        np.testing.assert_array_equal(anc.collection_steps(t, "reference"), ref_t2i)
        np.testing.assert_array_equal(anc.collection_steps(t, "reference", editing=True), np.arange(steps))
        np.testing.assert_array_equal(anc.collection_steps(t, "window", 850.0), np.flatnonzero(t >= 850))
    _, t = sampling.flux_schedule(sampling.FLUX_DEV_SCHEDULER, 28, 4096)
    assert len(anc.collection_steps(t, "reference")) == 0  # the reference's 28-step T2I run never saves
    with pytest.raises(ValueError, match="timing"):
        anc.collection_steps(t, "sometimes")


def test_localize_t_keeps_the_start_up_mask_for_the_rest_of_the_window():
    """RegulateConfig.localize_t: text-to-image regulates at every step of the window but re-localizes only
    while t >= localize_t; without it the mask follows the scores to the last step."""
    from jaxdit.safety.uvr.localize import LocalizeConfig

    h, w, b = 8, 8, 1
    geo = _geometry(h, w, 3, ctx=False)
    early, late = np.zeros((b, h, w), np.float32), np.zeros((b, h, w), np.float32)
    early[0, 1:4, 1:4], late[0, 4:7, 4:7] = 1.0, 1.0
    masks = {}
    for localize_t in (None, 850.0):
        ctl = UVRController(jnp.ones((1, 1, 1)), jax.random.key(0), "t2i", LocalizeConfig(threshold=0.5, min_area=1),
                            RegulateConfig(window_t=0.0, localize_t=localize_t, t2i="restrict"))
        state = ctl.update(ctl.init(b, geo), _captures(early), jnp.int32(0), jnp.float32(900.0), geo)
        assert np.asarray(state["core"])[0, 1:4, 1:4].all()
        state = ctl.update(state, _captures(late), jnp.int32(6), jnp.float32(400.0), geo)
        masks[localize_t] = np.asarray(state["core"])[0]
    assert masks[850.0][1:4, 1:4].all() and not masks[850.0][4:7, 4:7].any()
    assert masks[None][4:7, 4:7].all() and not masks[None][1:4, 1:4].any()
    cfg = RegulateConfig(window_t=0.0, localize_t=850.0)
    assert [bool(cfg.relocalize(jnp.float32(t))) for t in (1000, 850, 849, 0)] == [True, True, False, False]
