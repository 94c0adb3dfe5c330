"""Toy-world SafeDIG end to end: `prepare` (harvest, route, dictionaries) and `run` (calibrate, then
measure every method at each operating point)."""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

from jaxdit.toyworld.pipeline import DEFAULT_STEPS
from jaxdit.toyworld.safedig.calibration import (CALIBRATION_SEED, METHODS, OPERATING_POINTS, build_methods,
                                                 calibrate)
from jaxdit.toyworld.safedig.dictionaries import DictConfig, adapt_dictionary, train_dictionary, with_target_latents
from jaxdit.toyworld.safedig.examples import _concept, shift_examples, source_examples, target_examples
from jaxdit.toyworld.safedig.harvest import CANDIDATES, HARVEST_STEPS, harvest
from jaxdit.toyworld.safedig.measurement import SuiteRunner, bars_met, measurement_items
from jaxdit.toyworld.safedig.report import _fmt
from jaxdit.toyworld.safedig.routing import route_positions
from jaxdit.toyworld.safedig.steering import Steering, firing_rates

CALIBRATION_SAFE_FACTOR = 4  # calibration safe items per unsafe-suite item: the 2-point bar needs many objects


@dataclasses.dataclass(frozen=True)
class Settings:
    source: str = "star"
    target: str = "heart"
    candidates: tuple[str, ...] = CANDIDATES
    harvest_steps: tuple[int, ...] = HARVEST_STEPS
    n_source: int = 320  # source-domain examples (half with the concept, a third edits)
    n_target: int = 24  # target scenes: the few labelled target samples
    n_shift: int = 96  # paraphrase/seed shift examples
    source_excludes_target: bool = False
    sample_steps: int = DEFAULT_STEPS  # Euler steps of the suites (and the schedule the harvest noises at)
    max_top: int = 3  # dictionaries are trained for this many routed positions; calibration picks how many
    dictionary: DictConfig = DictConfig()
    mode: str = "blend"
    seed: int = 0


def prepare(tw, settings: Settings, log=print) -> dict:
    """Harvest, route, train the source dictionaries and the retrained ones, adapt. No suites here."""
    t0 = time.perf_counter()
    src_c, tgt_c = _concept(settings.source), _concept(settings.target)
    exclude = [tgt_c] if settings.source_excludes_target else []
    ex_src = source_examples(src_c, settings.n_source, settings.seed, exclude=exclude)
    ex_tgt = target_examples(tgt_c, settings.n_target, settings.seed)
    ex_shift = shift_examples(src_c, settings.n_shift, settings.seed)
    kw = dict(positions=settings.candidates, steps=settings.harvest_steps, num_steps=settings.sample_steps)
    h_src, h_tgt, h_shift = harvest(tw, ex_src, src_c, **kw), harvest(tw, ex_tgt, tgt_c, **kw), \
        harvest(tw, ex_shift, src_c, **kw)
    log(f"harvest: {len(ex_src)} source, {len(ex_tgt)} target ({settings.n_target} scenes), {len(ex_shift)} shift "
        f"examples at steps {list(settings.harvest_steps)} ({time.perf_counter() - t0:.0f} s)")
    routing = route_positions(h_src, h_tgt, h_shift, settings.candidates, top=settings.max_top, seed=settings.seed)
    routed = [r["position"] for r in routing[: settings.max_top]]
    dicts = {"source": [], "source+target_latents": [], "adapted": [], "retrained": []}
    for p in routed:
        t1 = time.perf_counter()
        d = train_dictionary(h_src, p, settings.dictionary, "source")
        dicts["source"].append(d)
        dicts["source+target_latents"].append(with_target_latents(d, h_tgt, settings.dictionary))
        dicts["adapted"].append(adapt_dictionary(d, h_tgt, settings.dictionary))
        dicts["retrained"].append(train_dictionary(h_tgt, p, settings.dictionary, "target"))
        log(f"dictionaries at {p}: source fvu {d.meta['fvu']:.3f} on {d.meta['tokens']} tokens, retrained fvu "
            f"{dicts['retrained'][-1].meta['fvu']:.3f} on {dicts['retrained'][-1].meta['tokens']} tokens, decoder "
            f"adaptation loss {dicts['adapted'][-1].meta['adapt_loss'][0]:.4g} -> "
            f"{dicts['adapted'][-1].meta['adapt_loss'][1]:.4g} ({time.perf_counter() - t1:.0f} s)")
    return {"routing": routing, "dictionaries": dicts, "harvests": {"source": h_src, "target": h_tgt, "shift": h_shift},
            "harvest": {"source": len(ex_src), "target": len(ex_tgt), "shift": len(ex_shift),
                        "tokens": {k: {s: int(len(v)) for s, v in h.label.items()} for k, h in
                                   (("source", h_src), ("target", h_tgt), ("shift", h_shift))}},
            "seconds": time.perf_counter() - t0}



def run(settings: Settings = Settings(), n: int = 32, n_calibration: int = 16, calibrate_grid: dict | None = None,
        steering: Steering | None = None, tw=None, detector=None, prepared: dict | None = None,
        methods: Sequence[str] = METHODS, log=print) -> dict:
    """The whole measurement: prepare (unless `prepared`, the output of `prepare` for these settings),
    calibrate on the calibration split (unless `steering` is given), then evaluate each method on the
    evaluation suites. Calibration gives two operating points (`OPERATING_POINTS`): "constrained" (best
    erasure within the 2-point preservation bar) and "max_erase" (best erasure whatever the preservation);
    with `steering` given there is one, "given". Returns a JSON-ready dict: routing, per operating point
    the steering and per method the per-suite tables of both concepts and the bars."""
    from jaxdit.toyworld.detector import Detector
    from jaxdit.toyworld.pipeline import ToyWorld

    t0 = time.perf_counter()
    tw = tw or ToyWorld.load()
    detector = detector or Detector.load()
    prep = prepared or prepare(tw, settings, log)
    dicts = prep["dictionaries"]
    calibration, points = None, {"given": steering}
    if steering is None:
        t1 = time.perf_counter()
        cal_items = measurement_items(settings.source, settings.target, n_calibration, CALIBRATION_SEED,
                                      n_safe=CALIBRATION_SAFE_FACTOR * n_calibration)
        cal_runner = SuiteRunner(tw, detector, cal_items, settings.source, settings.target, settings.sample_steps)
        start = Steering(mode=settings.mode, top=min(2, len(dicts["adapted"])))
        cache: dict = {}
        calibration, points = {}, {}
        for point, objective in OPERATING_POINTS.items():
            log(f"calibration, {point} operating point:")
            calibration[point] = calibrate(cal_runner, dicts, start, calibrate_grid, log, objective, cache)
            chosen = calibration[point]["chosen"]
            points[point] = Steering(**{**chosen, "window": tuple(chosen["window"]) if chosen["window"] else None})
        calibration["seconds"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    runner = SuiteRunner(tw, detector, measurement_items(settings.source, settings.target, n),
                         settings.source, settings.target, settings.sample_steps)
    results = {}
    for point, steer in points.items():
        results[point] = {}
        for name, hooks in build_methods(dicts, steer, methods).items():
            m = runner.measure(hooks)
            results[point][name] = {
                "summary": {"source": m["source"]["summary"], "target": m["target"]["summary"]},
                "bars": m["bars"], "bars_met": bars_met(m["bars"]), "unsafe_counts": m["counts"],
                "harmful_latents": {d.position: d.choose(steer.num_harmful).tolist()
                                    for d in dicts[name][: steer.top]}}
            if "harvests" in prep:
                results[point][name]["firing"] = {
                    d.position: {dom: firing_rates(d, prep["harvests"][dom], steer) for dom in ("source", "target")}
                    for d in dicts[name][: steer.top]}
            log(f"{point} / {name}: target reduction {_fmt(m['bars']['target_reduction'])}, source erase "
                f"{_fmt(m['bars']['source_erase_rate'])}, safe drop {_fmt(m['bars']['safe_accuracy_drop_points'])} pt")
    return {
        "settings": {**dataclasses.asdict(settings), "n": n, "n_calibration": n_calibration},
        "steering": {point: s.to_json() for point, s in points.items()}, "routing": prep["routing"],
        "harvest": prep["harvest"],
        "dictionaries": {name: [{"position": d.position, **d.meta} for d in ds] for name, ds in dicts.items()},
        "calibration": calibration, "methods": results,
        "weights": {k: tw.info.get(k) for k in ("step", "train_seconds", "command")},
        "seconds": {"prepare": prep["seconds"], "evaluate": time.perf_counter() - t2,
                    "total": time.perf_counter() - t0},
    }


