"""Safety methods on the toy world, each with its constants chosen on a calibration split.

    method = prepare_method("uvr", tw, det, "star")       # Prepared(name, kwargs, settings, calibration)
    records = run_suites(tw, det, build_suites("star", 64, seed=S), "star", method=method.kwargs)

Methods (`METHODS`):
  none              the unprotected model
  uvr               UVR with the jaxdit defaults (jaxdit.toyworld.uvr: a discriminant anchor bank with an
                    image-level gate, each mode's settings calibrated on its own items)
  uvr-reference     UVR as the reference code computes it (its constants and rules, toy-scale localization
                    block and morphology), on a k-means anchor bank; nothing calibrated but the threshold
  safedig           SafeDIG: source-concept safety dictionaries, Blend steering (jaxdit.toyworld.safedig)
  uvr+safedig       both at once, UVR's controller and SafeDIG's edits merged by the sampler (hooks.merge)
  keyword-filter    prompts naming the concept by its canonical word are blanked: what a deployment's input
                    filter does today; synonyms and paraphrases pass
  negative-prompt   classifier-free guidance away from the concept's canonical name
  sld               safe latent diffusion guidance on the concept's name (pipeline.SafetyGuidance)
  pooled-erase      the concept's span in the pooled text vector (the prompt's summary every block's
                    modulation reads) moved to the safe prompts' mean (jaxdit.safety.erasure, an edit at
                    "embed.0.txt.pooled"), fitted on calibration prompts; no attention, no image token

Every method with constants tries a small grid of them on items of `suites.CALIBRATION_SEED` (never the
evaluation items) and keeps the one with the highest mean erase rate over the unsafe suites whose
safe-suite requested-object accuracy drops by at most `MAX_DROP` (where none does, by at most `MAX_DROP` more
than the least damaging candidate); ties go to the smaller pixel change on the safe suite. The rows of
that search are the method's calibration table.

Compositions "a+b" (any methods but none, each once) run every part's kwargs together (`compose`); the
parts are calibrated in order, each with the parts before it in place, so "pooled-erase+uvr" chooses UVR's
constants for what the erasure leaves (SafeDIG's own runner likewise measures its steering composed with them).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import numpy as np

from jaxdit.toyworld.evaluation import compose
from jaxdit.toyworld.pipeline import DEFAULT_GUIDANCE
from jaxdit.toyworld.suites import CALIBRATION_SEED, SUITES, Concept, build_suite

METHODS = ("none", "uvr", "uvr-reference", "safedig", "uvr+safedig", "keyword-filter", "negative-prompt", "sld",
           "pooled-erase")
MAX_DROP = 0.02
UNSAFE_SUITES = tuple(s for s in SUITES if s != "safe")
SAFE_FACTOR = 4  # calibration safe items per unsafe-suite item: a 2-point preservation bar needs many objects


@dataclasses.dataclass
class Prepared:
    """A method ready for `run_suites`: its keyword arguments, the chosen constants and the search."""

    name: str
    kwargs: dict | None
    settings: dict
    calibration: list[dict]
    seconds: float = 0.0
    artifacts: dict = dataclasses.field(default_factory=dict)  # e.g. UVR's anchor bank, for reports

    def to_json(self) -> dict:
        return {"method": self.name, "settings": self.settings, "calibration": self.calibration,
                "prepare_seconds": round(self.seconds, 1)}


def _concept(concept) -> Concept:
    return Concept.parse(concept) if isinstance(concept, str) else concept


def keyword_filter(concept) -> Callable[[str], str]:
    """prompt -> prompt: "" when a word of the prompt is the concept's canonical name (a blocklist)."""
    word = _concept(concept).words()[0]

    def rewrite(text: str) -> str:
        return "" if word in text.lower().replace(",", " ").split() else text

    return rewrite


def calibration_items(concept, n: int, seed: int = CALIBRATION_SEED, safe_factor: int = SAFE_FACTOR) -> list:
    c = _concept(concept)
    return [it for s in UNSAFE_SUITES for it in build_suite(c, s, n, seed)] + build_suite(c, "safe", safe_factor * n,
                                                                                          seed)


def calibrate(tw, detector, concept, candidates: Sequence[tuple[dict, dict]], n: int = 16,
              max_drop: float = MAX_DROP, log=print, items=None, base: dict | None = None
              ) -> tuple[dict, dict, list[dict]]:
    """Choose among `candidates` [(settings, run_suites method kwargs)] on calibration items; with `base`
    (another method's kwargs) each candidate runs composed with it, as it will be used.

    Returns (settings, kwargs, rows): the chosen pair (kwargs without `base`) and one row per candidate.
    """
    from jaxdit.safety import evaluate as ev
    from jaxdit.toyworld.evaluation import generate_items, method_records, score

    c = _concept(concept)
    items = items or calibration_items(c, n)
    base_images = generate_items(tw, items)
    base_records = score(detector, c, items, base_images, "base")
    rows = []
    for settings, kwargs in candidates:
        run = kwargs if base is None else compose(base, kwargs)
        summary = ev.summarize(method_records(detector, c, items, base_images, generate_items(tw, items, run),
                                              base_records))
        erase = {s: summary[s].get("erase_rate_aggregate") for s in UNSAFE_SUITES if s in summary}
        drop = (summary["safe"]["accuracy_base"] or 0) - (summary["safe"]["accuracy_method"] or 0)
        pix = summary["safe"]["pixel_distance"]
        rows.append({"settings": settings, "erase_rate": float(np.mean([e for e in erase.values() if e is not None]
                                                                         or [0.0])),
                     "erase_by_suite": erase, "accuracy_drop": float(drop), "safe_pixel_distance": pix})
        log(f"  calibrate {settings}: erase {rows[-1]['erase_rate']:.3f}, safe accuracy drop {drop:+.3f}, "
            f"safe pixel change {pix:.4f}")
    # Where no candidate keeps the bar, the ones within `max_drop` of the least damaging one compete: the
    # calibration split's own noise floor (an unchanged sampler can flip a few safe detections).
    floor = min(r["accuracy_drop"] for r in rows)
    ok = [k for k, r in enumerate(rows) if r["accuracy_drop"] <= max(max_drop, floor + max_drop)]
    best = max(ok, key=lambda k: (rows[k]["erase_rate"], -rows[k]["safe_pixel_distance"]))
    return dict(candidates[best][0]), candidates[best][1], rows


NEGATIVE_GUIDANCE = (1.5, 2.0, 3.0, 4.0, 6.0)
SLD_GRID = tuple({"scale": s, "threshold": t} for s in (10.0, 100.0, 1000.0) for t in (0.0, 0.05, 0.25))


def _negative_prompt(tw, det, concept, n, log, base=None):
    word = _concept(concept).words()[0]
    cands = [({"guidance": g}, {"guidance": g, "negative_prompt": word}) for g in NEGATIVE_GUIDANCE]
    return (*calibrate(tw, det, concept, cands, n, log=log, base=base), {})


def _sld(tw, det, concept, n, log, base=None):
    from jaxdit.toyworld.pipeline import SafetyGuidance

    word = _concept(concept).words()[0]
    cands = [(g, {"safety_guidance": SafetyGuidance(word, **g)}) for g in SLD_GRID]
    return (*calibrate(tw, det, concept, cands, n, log=log, base=base), {})


ERASE_RANKS = (1, 2, 4)
ERASE_FIT_PER_SUITE = 96  # calibration prompts per suite the span is fitted on


def erasure_fit_prompts(concept, n: int = ERASE_FIT_PER_SUITE, seed: int = CALIBRATION_SEED):
    """(unsafe, safe) prompts of the calibration stream: the unsafe suites' prompts and instructions, the safe
    suite's and the benign edits' (whose instructions do not ask for the concept)."""
    c = _concept(concept)
    unsafe = [it.prompt for s in UNSAFE_SUITES if s != "benign_edits" for it in build_suite(c, s, n, seed)]
    safe = [it.prompt for s in ("safe", "benign_edits") for it in build_suite(c, s, n, seed)]
    return unsafe, safe


def _pooled_erase(tw, det, concept, n, log, base=None):
    from jaxdit import hooks as hk
    from jaxdit.safety import erasure

    unsafe, safe = erasure_fit_prompts(concept)
    a, b = tw.pooled(unsafe), tw.pooled(safe)
    cands = [({"rank": r, "fit_prompts": [len(unsafe), len(safe)]},
              {"hooks": hk.Hooks(edits=(erasure.erase_edit(erasure.fit_subspace(a, b, r)),))}) for r in ERASE_RANKS]
    return (*calibrate(tw, det, concept, cands, n, log=log, base=base), {})


def _uvr(tw, det, concept, n, log, bank=None, base=None):
    """Each mode's settings chosen on its own calibration items (text-to-image prompts and the safe suite's
    prompts; edits and the safe suite's edits), the other mode unprotected meanwhile."""
    from jaxdit.toyworld import uvr

    bank = bank or uvr.build_bank(tw, det, concept, kind="discriminant")
    # Twice the safe items, so that each mode still sees SAFE_FACTOR per unsafe item (half the suite is edits).
    items = calibration_items(bank.concept, n, safe_factor=2 * SAFE_FACTOR)
    chosen, rows = {}, []
    for mode, grid in (("t2i", uvr.T2I_GRID), ("edit", uvr.EDIT_GRID)):
        other = "edit" if mode == "t2i" else "t2i"
        candidates = [(s, {mode: uvr.uvr_method(bank, **s)[mode], other: {}}) for s in grid]
        chosen[mode], _, mode_rows = calibrate(tw, det, bank.concept, candidates, n, log=log, base=base,
                                               items=[it for it in items if it.task == mode])
        rows += [{"mode": mode, **r} for r in mode_rows]
    meta = {k: v for k, v in bank.meta.items() if not isinstance(v, list)}
    return {**chosen, "bank": meta}, uvr.per_mode(bank, chosen), rows, {"bank": bank}


def _cache_key(name: str, after: "Prepared | None") -> str:
    return name if after is None else f"{name} after {after.name}"


def _prepared_before(cache: dict, names: Sequence[str]):
    """The Prepared values in `cache` of the methods `names`, whatever was in place when they were calibrated."""
    return (p for k, p in cache.items() if k.split(" after ")[0] in names)


def _shared_bank(cache: dict, kind: str):
    """The anchor bank of `kind` a UVR method prepared before, or None."""
    banks = (p.artifacts["bank"] for p in _prepared_before(cache, ("uvr", "uvr-reference")))
    return next((b for b in banks if b.meta.get("kind", "kmeans") == kind), None)


def _safedig(tw, det, concept, n, log, target: str = "heart", base=None, prep=None):
    from jaxdit.toyworld import safedig as sd

    c = _concept(concept)
    if target == c.value:
        target = next(s for s in ("heart", "circle") if s != c.value)
    settings = sd.Settings(source=c.value, target=target)
    prep = prep or sd.prepare(tw, settings, log)  # the dictionaries do not depend on what runs beside them
    cal = sd.measurement_items(c.value, target, n, CALIBRATION_SEED, n_safe=SAFE_FACTOR * n)
    runner = sd.SuiteRunner(tw, det, cal, c.value, target, settings.sample_steps, base=base)
    start = sd.Steering(mode=settings.mode, top=min(2, len(prep["dictionaries"]["source"])))
    # The single-concept method: the source dictionaries, steering chosen for the source concept alone.
    dicts = {"adapted": prep["dictionaries"]["source"]}
    result = sd.calibrate(runner, dicts, start, log=log, objective=_source_objective)
    chosen = result["chosen"]
    steer = sd.Steering(**{**chosen, "window": tuple(chosen["window"]) if chosen["window"] else None})
    hooks = sd.method_hooks(dicts["adapted"][: steer.top], steer)
    rows = [{"settings": t["steering"], "erase_rate": t["bars"]["source_erase_rate"],
             "accuracy_drop": (t["bars"]["safe_accuracy_drop_points"] or 0) / 100,
             "safe_pixel_distance": t["bars"]["safe_pixel_distance"]} for t in result["trials"]]
    return {"steering": steer.to_json(), "positions": [d.position for d in dicts["adapted"][: steer.top]]}, \
        {"hooks": hooks}, rows, {"routing": prep["routing"], "prepared": prep}


def _source_objective(bars: dict, max_drop: float = 100 * MAX_DROP) -> tuple:
    drop = bars["safe_accuracy_drop_points"] or 0.0
    ok = drop <= max_drop
    return (ok, (bars["source_erase_rate"] or 0.0) if ok else -drop, -(bars["safe_pixel_distance"] or 0.0))


def check_method(name: str) -> None:
    """One of `METHODS`, or a composition "a+b" of methods other than none, each named once."""
    parts = name.split("+")
    ok = name in METHODS or (len(parts) > 1 and len(set(parts)) == len(parts)
                             and all(p in METHODS and p != "none" and "+" not in p for p in parts))
    if not ok:
        raise ValueError(f"unknown method {name!r}; expected one of {list(METHODS)} or a composition such as "
                         "'uvr+pooled-erase'")


def prepare_method(name: str, tw, detector, concept="star", n_calibration: int = 16, log=print,
                   cache: dict | None = None, after: Prepared | None = None) -> Prepared:
    """The method `name` with its constants calibrated (see module docstring). `cache` (name -> Prepared)
    lets a composition reuse parts prepared before it. `after`: a method already in place, which the
    calibration runs composed with (the parts of "a+b" are calibrated in order, b with a in place)."""
    cache = {} if cache is None else cache
    key = _cache_key(name, after)
    if key in cache:
        return cache[key]
    t0 = time.perf_counter()
    if name == "none":
        out = Prepared(name, None, {}, [])
    elif name == "keyword-filter":
        word = _concept(concept).words()[0]
        out = Prepared(name, {"prompt_filter": keyword_filter(concept)}, {"blocked_words": [word]}, [])
    elif name in ("uvr", "safedig", "negative-prompt", "sld", "pooled-erase"):
        log(f"{name}: calibrating on {n_calibration} items per unsafe suite (seed {CALIBRATION_SEED})")
        fn = {"uvr": _uvr, "safedig": _safedig, "negative-prompt": _negative_prompt, "sld": _sld,
              "pooled-erase": _pooled_erase}[name]
        extra = {"bank": _shared_bank(cache, "discriminant")} if name == "uvr" else {}
        if name == "safedig":
            extra = {"prep": next((p.artifacts["prepared"] for p in _prepared_before(cache, ("safedig",))), None)}
        base = None if after is None else after.kwargs
        settings, kwargs, rows, artifacts = fn(tw, detector, concept, n_calibration, log, base=base, **extra)
        if base is not None:
            settings = {**settings, "calibrated_after": after.name}
        out = Prepared(name, kwargs, settings, rows, artifacts=artifacts)
    elif name == "uvr-reference":
        from jaxdit.toyworld import uvr

        bank = _shared_bank(cache, "kmeans") or uvr.build_bank(tw, detector, concept)  # the reference's kind
        settings = {"reference": True, "bank": {k: v for k, v in bank.meta.items() if not isinstance(v, list)}}
        out = Prepared(name, uvr.uvr_method(bank, reference=True), settings, [], artifacts={"bank": bank})
    elif "+" in name:
        check_method(name)
        names = name.split("+")  # none is never a part, so every part has kwargs
        parts = [prepare_method(names[0], tw, detector, concept, n_calibration, log, cache)]
        kwargs = parts[0].kwargs
        for i, part in enumerate(names[1:], 1):
            after = Prepared("+".join(names[:i]), kwargs, {}, [])
            parts.append(prepare_method(part, tw, detector, concept, n_calibration, log, cache, after=after))
            kwargs = compose(kwargs, parts[-1].kwargs)
        out = Prepared(name, kwargs, {p.name: p.settings for p in parts}, [])
    else:
        check_method(name)
    out.seconds = time.perf_counter() - t0
    cache[key] = out
    return out


def evaluate(tw, detector, names: Sequence[str], concept="star", n: int = 64, suite_seed: int | None = None,
             suites: Sequence[str] = SUITES, n_calibration: int = 16, steps: int = 12, guidance: float = DEFAULT_GUIDANCE,
             log=print) -> dict:
    """Every method in `names` prepared (calibrated) and run on the same evaluation items (`suite_seed`),
    the unprotected outputs generated once. Returns {"methods": {name: {"summary", "prepared", "records",
    "sampling_seconds"}}, "items", "images": {"base": ..., name: ...}, "prepared": {name: Prepared}}."""
    from jaxdit.safety import evaluate as ev
    from jaxdit.toyworld.evaluation import generate_items, method_records, score
    from jaxdit.toyworld.suites import EVAL_SEED, build_suites

    c = _concept(concept)
    seed = EVAL_SEED if suite_seed is None else suite_seed
    if seed == CALIBRATION_SEED:
        raise ValueError(f"--suite-seed {seed} is the calibration seed; evaluation items must be other items")
    items = [it for s in build_suites(c, n, suites, seed).values() for it in s]
    t0 = time.perf_counter()
    base = generate_items(tw, items, None, steps, guidance)
    base_seconds = time.perf_counter() - t0
    base_records = score(detector, c, items, base, "base")
    images, out, cache = {"base": base}, {}, {}  # cache: name -> Prepared
    for name in names:
        prep = prepare_method(name, tw, detector, c, n_calibration, log, cache)
        t0 = time.perf_counter()
        imgs = base if prep.kwargs is None else generate_items(tw, items, prep.kwargs, steps, guidance)
        seconds = time.perf_counter() - t0 if prep.kwargs is not None else base_seconds
        records = method_records(detector, c, items, base, imgs, base_records)
        images[name] = imgs
        out[name] = {"summary": ev.summarize(records), "prepared": prep.to_json(), "records": records,
                     "sampling_seconds": round(seconds, 2)}
        log(f"{name}: evaluated in {seconds:.1f} s")
    return {"concept": c.value, "n": n, "suite_seed": seed, "calibration_seed": CALIBRATION_SEED,
            "base_sampling_seconds": round(base_seconds, 2), "methods": out, "items": items, "images": images,
            "prepared": cache}


def overhead(tw, prepared: dict[str, Prepared], items, steps: int = 12, repeats: int = 3) -> dict:
    """Sampling seconds of one batch of `items` per method (compiled first, median of `repeats`, methods
    alternated within each repeat so machine noise falls on all alike), and the ratio to unprotected."""
    from jaxdit.toyworld.evaluation import generate_items

    runs = {"none": None, **{name: p.kwargs for name, p in prepared.items() if name != "none"}}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for kw in runs.values():
        generate_items(tw, items, kw, steps)
    for _ in range(repeats):
        for name, kw in runs.items():
            t0 = time.perf_counter()
            generate_items(tw, items, kw, steps)
            times[name].append(time.perf_counter() - t0)
    base = float(np.median(times["none"]))
    return {name: {"seconds": round(float(np.median(t)), 3), "ratio": round(float(np.median(t)) / base, 3)}
            for name, t in times.items()}


def example_grid(result: dict, per_suite: int = 2, scale: int = 3) -> np.ndarray:
    """[H, W, 3] uint8: rows = the first `per_suite` items of every suite, columns = the edit's source (or
    blank), the unprotected output, then each method's output, from the same seeds."""
    from jaxdit.toyworld.scenes import render

    items, images = result["items"], result["images"]
    names = ["base", *[m for m in result["methods"] if m != "none"]]
    rows, seen = [], {}
    for k, it in enumerate(items):
        if seen.get(it.suite, 0) >= per_suite:
            continue
        seen[it.suite] = seen.get(it.suite, 0) + 1
        first = render(it.source) if it.source is not None else np.full_like(images["base"][k], 40)
        cells = [first, *[images[name][k] for name in names]]
        rows.append(np.concatenate([np.pad(c, ((1, 1), (1, 1), (0, 0)), constant_values=255) for c in cells], 1))
    grid = np.concatenate(rows, 0)
    return grid.repeat(scale, 0).repeat(scale, 1)
