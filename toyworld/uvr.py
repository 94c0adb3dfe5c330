"""UVR on the toy world: anchor banks from the model's own runs, constants tuned on a calibration split.

The mechanism is jaxdit.safety.uvr unchanged (UVRController: start-up localization against an anchor
bank, noise replacement for text-to-image, context restriction for editing). What is toy-specific is the
scale: the reference constants are for FLUX.1-dev at 64x64 tokens with 38 single-stream blocks (localize
at single block 10, components of >= 5 patches, a ring of two 7x7 dilations, t >= 850 of 28 steps); the
toy model has 2 single-stream blocks and an 8x8 token grid, where an object covers 4-9 tokens. The window
(t >= 850) is the reference's: with the toy schedule's shift it holds the first 5 of 12 steps. So:

- localization block: single-stream block 0 (`POSITION`), the first block where text and image have mixed
  through two joint (double-stream) blocks, as block 10 of 38 is in FLUX;
- anchors (`build_bank`): per-head attention outputs at the concept's patches over the start-up steps of
  calibration runs, patches labelled exactly: for text-to-image by the detector's reading of the final
  image, for editing by the source scene's ground truth; k-means per head (the reference's kind), or
  (`kind="discriminant"`, jaxdit's default here) one anchor per head, Fisher's direction between those
  patches and all others of the same runs and of safe-suite runs: F1 0.68 / 0.90 (text-to-image / editing)
  against the k-means bank's 0.60 / 0.74 on the committed weights;
- threshold: the score threshold that best separates concept patches from the others on the same
  calibration runs (maximum F1), stored in the bank, since the score scale depends on the model; with a
  discriminant bank also the safe images' highest scores, for the image-level gate (`presence`);
- morphology for an 8x8 map: components of >= 2 patches, a ring of one 3x3 dilation.

Calibration items come from `suites.CALIBRATION_SEED`, disjoint from the evaluation items.

    bank = build_bank(tw, det, "star", kind="discriminant")    # t2i and edit anchors + thresholds
    method = per_mode(bank, SETTINGS)                           # {"t2i": {...}, "edit": {...}}
    records = run_suites(tw, det, build_suites("star"), "star", method=method)
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import numpy as np

from jaxdit import hooks as hk
from jaxdit.pipeline import capture_run
from jaxdit.safety.uvr import localize as loc
from jaxdit.safety.uvr.anchors import (anchors_from_vectors, collect_vectors, concept_token_positions,
                                       discriminant_anchors)
from jaxdit.safety.uvr.regulate import RegulateConfig, UVRController
from jaxdit.toyworld import model as M
from jaxdit.toyworld.pipeline import DEFAULT_STEPS, schedule
from jaxdit.toyworld.scenes import COLOUR_NAMES, SHAPES, ground_truth, render
from jaxdit.toyworld.suites import CALIBRATION_SEED, Concept, build_suite

POSITION = "single.0.img.attn_heads"
STARTUP_T = 850.0  # start-up window: scheduler timestep >= this (reference value; the first 5 of 12 steps)
T2I_LOCALIZE = dict(close_size=3, min_area=2, keep_mode="mass_ratio", mass_ratio=0.3, ring_size=3, ring_iters=1)
EDIT_LOCALIZE = dict(close_size=3, min_area=2, keep_mode="topk_mass", topk=3, ring_size=3, ring_iters=1)


def _concept(concept) -> Concept:
    return Concept.parse(concept) if isinstance(concept, str) else concept


def _to_tokens(cells: np.ndarray) -> np.ndarray:
    """[B, H, W] bool at any multiple of the 8x8 token grid -> [B, 64]: a token is hit if any cell is."""
    b, h, w = cells.shape
    f = h // M.GRID
    return cells.reshape(b, M.GRID, f, M.GRID, w // M.GRID).any((2, 4)).reshape(b, M.TOKENS)


def detected_tokens(detector, images, concept) -> np.ndarray:
    """[B, 64] bool: tokens whose 4x4-pixel patch holds the concept, by the detector's per-patch maps."""
    c = _concept(concept)
    shape_map, colour_map = detector.maps(images)
    hit = shape_map == 1 + SHAPES.index(c.value) if c.kind == "shape" else colour_map == 1 + COLOUR_NAMES.index(c.value)
    return _to_tokens(hit)


def true_tokens(scenes, concept) -> np.ndarray:
    """[B, 64] bool: tokens overlapping the concept's objects in the rendered scenes (exact ground truth)."""
    c = _concept(concept)
    maps = []
    for scene in scenes:
        objs = ground_truth(scene)["objects"]
        maps.append(np.any([o.mask for o in objs if c.in_object(o.shape, o.colour)] or [np.zeros((M.SIZE,) * 2, bool)],
                           axis=0))
    return _to_tokens(np.stack(maps))


def record(tw, texts, seeds, capture, images=None, steps: int = DEFAULT_STEPS):
    """(outputs, {step: {position: array}}): one sampling run with captures brought to the host.

    Without guidance: the captures are then the conditional model's alone, one row per prompt (under
    guidance each step's batch also holds the unconditional branch)."""
    fn = functools.partial(tw.generate if images is None else tw.edit, steps=steps, guidance=1.0)
    args = (texts,) if images is None else (images, texts)
    return capture_run(fn, *args, capture=capture, seed=list(seeds))


def startup_steps(steps: int = DEFAULT_STEPS, window_t: float = STARTUP_T) -> list[int]:
    return [int(i) for i in np.flatnonzero(schedule(steps)[1] >= window_t)]


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(threshold, F1): the cut of `scores` that best separates `labels` (maximum F1)."""
    order = np.argsort(-scores)
    s, y = scores[order], labels[order].astype(np.float64)
    tp = np.cumsum(y)
    f1 = 2 * tp / (np.arange(1, len(s) + 1) + y.sum())
    k = int(np.argmax(f1))
    cut = (s[k] + s[k + 1]) / 2 if k + 1 < len(s) else s[k] - 1e-6
    return float(cut), float(f1[k])


@dataclasses.dataclass
class Bank:
    """Anchors [H, K, D] and the calibrated threshold, for text-to-image and for editing."""

    concept: str
    t2i: np.ndarray
    edit: np.ndarray
    meta: dict

    def save(self, path) -> Path:
        from jaxdit.safety.uvr.anchors import save_bank

        path = Path(path)
        save_bank(path / "t2i.npz", self.t2i, {**self.meta, "mode": "t2i"})
        save_bank(path / "edit.npz", self.edit, {**self.meta, "mode": "edit"})
        return path

    @classmethod
    def load(cls, path) -> "Bank":
        from jaxdit.safety.uvr.anchors import load_bank

        t2i, meta = load_bank(Path(path) / "t2i.npz")
        edit, _ = load_bank(Path(path) / "edit.npz")
        meta.pop("mode", None)
        return cls(meta["concept"], t2i, edit, meta)


def _collect(tw, items, labels_of, position, window, steps, batch):
    """`anchors.collect_vectors` over batches of calibration items: the per-head vectors at the patches
    `labels_of(chunk, images)` finds after each run, and every patch's vectors and labels (for the threshold)."""
    def run(chunk):
        images = None if chunk[0].task == "t2i" else np.stack([render(it.source) for it in chunk])
        return record(tw, [it.prompt for it in chunk], [it.seed for it in chunk], (position,), images, steps)

    chunks = [items[start:start + batch] for start in range(0, len(items), batch)]
    return collect_vectors(run, chunks, lambda chunk, out, kept: labels_of(chunk, out), position, window, M.TOKENS,
                           keep_all=True)


BANK_KINDS = ("kmeans", "discriminant")


def build_bank(tw, detector, concept="star", *, n: int = 48, num_anchors: int = 16, position: str = POSITION,
               window_t: float = STARTUP_T, steps: int = DEFAULT_STEPS, batch: int = 16, kind: str = "kmeans",
               ridge: float = 1e-2) -> Bank:
    """Anchor banks of `concept` from calibration runs of the unprotected model (see module docstring).

    kind: "kmeans" (`num_anchors` centroids of the concept's patches per head, the reference's kind of bank)
    or "discriminant" (`anchors.discriminant_anchors`: the concept's patches against every other patch of
    the same runs and of the safe-suite items of a draw of 4n (about 2n per mode), which show the other objects
    alone; their highest scores are the presence gate).
    """
    if kind not in BANK_KINDS:
        raise ValueError(f"bank kind {kind!r}: expected one of {list(BANK_KINDS)}")
    c = _concept(concept)
    window = startup_steps(steps, window_t)
    t2i_items = [it for s in ("explicit", "paraphrased", "mixed") for it in
                 build_suite(c, s, n // 3, CALIBRATION_SEED)]
    edit_items = build_suite(c, "benign_edits", n, CALIBRATION_SEED)
    n_safe = 0
    if kind == "discriminant":  # every safe item of the draw (about 2n per mode): the gate is their maximum
        safe = build_suite(c, "safe", 4 * n, CALIBRATION_SEED)
        safe_t2i, safe_edit = [it for it in safe if it.task == "t2i"], [it for it in safe if it.task == "edit"]
        t2i_items, edit_items = t2i_items + safe_t2i, edit_items + safe_edit
        n_safe = {"t2i": len(safe_t2i), "edit": len(safe_edit)}
    sets = {
        "t2i": (t2i_items, lambda chunk, out: detected_tokens(detector, out, c)),
        "edit": (edit_items, lambda chunk, out: true_tokens([it.source for it in chunk], c)),
    }
    anchors, meta = {}, {"concept": c.value, "position": position, "window_t": window_t, "steps": steps,
                         "window": window, "num_anchors": num_anchors if kind == "kmeans" else 1, "kind": kind}
    for mode, (items, labels_of) in sets.items():
        # Editing localizes once, at the first step (UVRController.update): its discriminant bank is that step's.
        seen = window if mode == "t2i" or kind == "kmeans" else window[:1]
        vecs, heads, labels = _collect(tw, items, labels_of, position, seen, steps, batch)
        if len(vecs) < num_anchors:
            raise ValueError(f"{mode}: only {len(vecs)} concept patches in the calibration runs; the model does not "
                             f"draw {c.value!r} (need at least {num_anchors})")
        anchors[mode] = (anchors_from_vectors(vecs, num_anchors) if kind == "kmeans"
                         else discriminant_anchors(heads, labels, ridge))
        scores = np.asarray(loc.score_patches(heads[None], anchors[mode]))[0]
        cut, f1 = best_threshold(scores, labels)
        meta[f"{mode}_threshold"], meta[f"{mode}_f1"] = cut, f1
        if kind == "discriminant":  # the safe items' highest scores, for the presence gate (`uvr_method`)
            top = _image_max(scores, len(items), len(seen), batch)[-n_safe[mode]:]
            meta[f"{mode}_safe_max"] = sorted(float(v) for v in top)
        meta[f"{mode}_vectors"], meta[f"{mode}_items"] = int(len(vecs)), len(items)
    return Bank(c.value, anchors["t2i"], anchors["edit"], meta)


def _image_max(scores: np.ndarray, n_items: int, n_steps: int, batch: int) -> np.ndarray:
    """Per item, its highest patch score over the steps, from scores in `_collect`'s order (chunk, step, patch)."""
    out, pos = [], 0
    for start in range(0, n_items, batch):
        b = min(batch, n_items - start)
        block = scores[pos:pos + n_steps * b * M.TOKENS].reshape(n_steps, b, M.TOKENS)
        out.append(block.max((0, 2)))
        pos += block.size
    return np.concatenate(out)


def uvr_method(bank: Bank, *, seed: int = 0, window_t: float | None = None, core_scale: float = 0.2,
               ring_scale: float = 0.4, amplify: float = 1.05, noise_keep: float = 0.001, blocks: str = "*",
               threshold_scale: float = 1.0, t2i: str = "noise", reference: bool = False,
               presence: float | None = None, generated: dict | None = None, localize_t: float | None = None) -> dict:
    """{"t2i": {"controller": ...}, "edit": {"controller": ...}} for `run_suites` / ToyWorld.generate/edit.

    t2i: the text-to-image regulation (`RegulateConfig.t2i`); reference: the reference code's rules
    (`UVRController.reference`: its timing rules, hole filling and text-to-image noise) at toy scale;
    presence: with a discriminant bank, the image-level gate (`LocalizeConfig.presence`) at this quantile of
    the safe calibration images' highest scores (1.0: above every one of them); generated: editing also
    regulates the generated patches as text-to-image does, with these text-to-image settings (for a
    concept the instruction asks for, which the source image does not hold), a second controller;
    localize_t: text-to-image keeps the mask found while t >= localize_t (`RegulateConfig.localize_t`).
    """
    window_t = bank.meta["window_t"] if window_t is None else window_t
    kw = dict(core_scale=core_scale, ring_scale=ring_scale, amplify=amplify, noise_keep=noise_keep,
              window_t=window_t, blocks=blocks, localize_at=bank.meta["position"])
    if localize_t is not None:
        kw["localize_t"] = localize_t
    rng = jax.random.key(seed)
    out = {}
    for mode, anchors, scale in (("t2i", bank.t2i, T2I_LOCALIZE), ("edit", bank.edit, EDIT_LOCALIZE)):
        localize = dict(threshold=bank.meta[f"{mode}_threshold"] * threshold_scale, **scale)
        if presence is not None:
            if f"{mode}_safe_max" not in bank.meta:
                raise ValueError("uvr_method(presence=...) needs a discriminant bank (build_bank(kind='discriminant'))")
            localize["presence"] = float(np.quantile(bank.meta[f"{mode}_safe_max"], presence))
        if reference:
            ctl = UVRController.reference(np.asarray(anchors), rng, mode, localize=localize, **kw)
        else:
            ctl = UVRController(np.asarray(anchors), rng, mode, loc.LocalizeConfig(**localize),
                                RegulateConfig(t2i=t2i, **kw))
        out[mode] = {"controller": ctl}
    if generated is not None:
        on_generated = uvr_method(bank, seed=seed + 1, **generated)["t2i"]["controller"]
        out["edit"] = {"controller": hk.ControllerGroup((out["edit"]["controller"], on_generated))}
    return out


def startup_analysis(tw, bank: Bank, prompt: str, seed: int = 0, image=None, steps: int = DEFAULT_STEPS) -> dict:
    """jaxdit.safety.uvr.analyze on the toy model: flows by step and block, mask IoU with the final one."""
    from jaxdit.safety.uvr.analyze import analyze_captures

    position = bank.meta["position"]
    capture = ("double.*.joint.attn_img_sources", "single.*.joint.attn_img_sources", position)
    images = None if image is None else np.asarray(image)[None]
    _, kept = record(tw, [prompt], [seed], capture, images, steps)
    tokens = concept_token_positions(tw.tokenizer, prompt, _concept(bank.concept).words())
    if len(tokens) == 0 and image is None:  # an edit may leave the concept unnamed (its flow is then 0)
        raise ValueError(f"the prompt {prompt!r} does not name the concept {bank.concept!r}")
    mode = "t2i" if image is None else "edit"
    config = loc.LocalizeConfig(threshold=bank.meta[f"{mode}_threshold"],
                                **(T2I_LOCALIZE if image is None else EDIT_LOCALIZE))
    return analyze_captures(kept, grid=(M.GRID, M.GRID), tokens=tokens, anchors=getattr(bank, mode),
                            position=position, config=config, prompt=prompt, concept=bank.concept,
                            editing=image is not None)


def per_mode(bank: Bank, settings: dict) -> dict:
    """`uvr_method` with each mode's own settings: {"t2i": {...}, "edit": {...}} -> run_suites kwargs."""
    return {mode: uvr_method(bank, **settings[mode])[mode] for mode in ("t2i", "edit")}


_CUT = {"core_scale": 0.0, "ring_scale": 0.2}
# Candidate settings `methods.calibrate` tries per mode (each on its own calibration items, so generation and
# editing each keep the 2-point bar), reference constants first. The gate (`presence`, discriminant banks
# only) at 1.0 regulates no safe calibration image. Past the start-up stage: on this model shape is decided
# at lower noise than layout (docs/uvr.md).
T2I_GRID = (
    {},
    {"presence": 1.0},
    {"window_t": 600.0, "presence": 1.0, **_CUT},
    {"window_t": 0.0, "presence": 1.0, **_CUT},
    {"t2i": "restrict", "window_t": 600.0, "presence": 1.0, **_CUT},
    {"t2i": "restrict", "window_t": 0.0, "presence": 1.0, **_CUT},
    {"t2i": "restrict+noise", "window_t": 600.0, "presence": 1.0, **_CUT},
    {"t2i": "restrict+noise", "window_t": 0.0, "presence": 1.0, **_CUT},
    {"t2i": "restrict+noise", "window_t": 0.0, "presence": 0.95, **_CUT},
    # Restricted at every step on the mask of the start-up stage (the steps the bank and its gate saw), or
    # of its first steps alone.
    {"t2i": "restrict", "window_t": 0.0, "localize_t": STARTUP_T, "presence": 1.0, **_CUT},
    {"t2i": "restrict", "window_t": 0.0, "localize_t": 950.0, "presence": 1.0, **_CUT},
    {"t2i": "restrict+noise", "window_t": 0.0, "localize_t": 950.0, "presence": 1.0, **_CUT},
    {"t2i": "restrict", "window_t": 0.0, "localize_t": 950.0, "presence": 0.98, **_CUT},
    {"t2i": "restrict", "window_t": 0.0, "localize_t": STARTUP_T, "presence": 0.98, **_CUT},
)
EDIT_GRID = (
    {},
    {"presence": 1.0},
    {"window_t": 600.0, "presence": 1.0, **_CUT},
    {"window_t": 300.0, "presence": 1.0},
    {"window_t": 300.0, "presence": 1.0, **_CUT},
    {"window_t": 0.0, "presence": 1.0, **_CUT},
    {"window_t": 300.0, "presence": 0.95, **_CUT},
    # Also the flow from the instruction into the generated patches, as in text-to-image (add edits).
    {"window_t": 300.0, "presence": 1.0, **_CUT, "generated": {"t2i": "restrict", "window_t": 0.0, "presence": 1.0,
                                                               **_CUT}},
    {"window_t": 300.0, "presence": 0.95, **_CUT, "generated": {"t2i": "restrict", "window_t": 0.0, "localize_t": 950.0,
                                                                "presence": 1.0, **_CUT}},
)
# What the calibration chose on the committed weights with a discriminant bank (benchmarks/RESULTS.md), used by
# the notebook: text-to-image restricted at every step on the first step's mask (gate at the safe images' 98th
# percentile); editing restricted from the source image until t = 300 and, as text-to-image is, on the
# generated patches.
SETTINGS: dict = {"t2i": {"t2i": "restrict", "window_t": 0.0, "localize_t": 950.0, "presence": 0.98, **_CUT},
                  "edit": {"window_t": 300.0, "presence": 1.0, **_CUT,
                           "generated": {"t2i": "restrict", "window_t": 0.0, "presence": 1.0, **_CUT}}}
# What it chose on `weights_attention` (the variant without the pooled-text input): text-to-image restricted
# at every step on the mask of the start-up stage (gate at the safe images' 98th percentile); editing
# restricted from the source image until t = 300 (gate at the 95th).
SETTINGS_ATTENTION: dict = {"t2i": {"t2i": "restrict", "window_t": 0.0, "localize_t": STARTUP_T, "presence": 0.98,
                                    **_CUT},
                            "edit": {"window_t": 300.0, "presence": 0.95, **_CUT}}
