"""Toy-world SafeDIG calibration: the methods' hooks, the operating points' objectives and the coordinate
search of the steering settings on the calibration split (`CALIBRATION_SEED`), never on evaluation items."""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

from jaxdit import hooks as hk
from jaxdit.toyworld import suites as S
from jaxdit.toyworld.safedig import steering as st
from jaxdit.toyworld.safedig.measurement import SuiteRunner
from jaxdit.toyworld.safedig.report import _fmt
from jaxdit.toyworld.safedig.steering import Steering

CALIBRATION_SEED = S.CALIBRATION_SEED  # the suites' builders on this seed stream form the calibration split

METHODS = ("source", "source+target_latents", "adapted", "retrained")


def build_methods(dicts: dict, steering: Steering, methods: Sequence[str] = METHODS) -> dict[str, hk.Hooks]:
    """Hooks per method, each on the first `steering.top` routed positions:
    source (source dictionary as trained), source+target_latents (target latents added, decoder not
    adapted), adapted (SafeDIG), retrained (an SAE trained from scratch on the few target samples)."""
    return {name: st.method_hooks(dicts[name][: steering.top], steering) for name in methods}


def _worst(bars: dict) -> float:
    return min(v if v is not None else 0.0 for v in (bars["target_reduction"], bars["source_erase_rate"]))


def calibration_objective(bars: dict, max_drop: float = 2.0) -> tuple:
    """The constrained operating point's sort key (larger is better): settings within the preservation
    bar first, then the smaller of target reduction and source erase rate, then the smaller safe pixel
    distance; outside the bar, the smaller drop."""
    drop = bars["safe_accuracy_drop_points"] or 0.0
    ok = drop <= max_drop
    return (ok, _worst(bars) if ok else -drop, -(bars["safe_pixel_distance"] or 0.0))


def erase_objective(bars: dict) -> tuple:
    """The max-erase operating point's sort key: the smaller of target reduction and source erase rate,
    then the smaller safe-accuracy drop. Reported beside the constrained point, to show the trade-off."""
    return (_worst(bars), -(bars["safe_accuracy_drop_points"] or 0.0))


OPERATING_POINTS = {"constrained": calibration_objective, "max_erase": erase_objective}


def default_grid(mode: str, positions: int) -> dict:
    strengths = (1.0, 1.5, 2.0, 3.0, 4.0) if mode == "blend" else (1.0, 2.0, 4.0, 8.0, 16.0)
    return {"top": tuple(range(1, positions + 1)), "num_harmful": (8, 16, 32), "strength": strengths,
            "gate_quantile": (0.0, 0.99, 0.999), "window": (None, (0, 6))}


def calibrate(runner: SuiteRunner, dicts: dict, start: Steering, grid: dict | None = None, log=print,
              objective=calibration_objective, cache: dict | None = None) -> dict:
    """Coordinate search of the adapted method's settings on the calibration split, one field at a time
    (in `grid` order), keeping a change only if it improves `objective`. `cache` (settings -> bars) lets
    several searches share the trials they have in common."""
    grid = default_grid(start.mode, len(dicts["adapted"])) if grid is None else grid
    seen = {} if cache is None else cache
    trials = []

    def trial(s: Steering):
        key = tuple(sorted(s.to_json().items(), key=lambda kv: kv[0]))
        if key not in seen:
            t0 = time.perf_counter()
            bars = runner.measure(st.method_hooks(dicts["adapted"][: s.top], s))["bars"]
            seen[key] = {"steering": s.to_json(), "bars": bars, "seconds": time.perf_counter() - t0}
            log(f"  calibration {s.to_json()}: target reduction {_fmt(bars['target_reduction'])}, source erase "
                f"{_fmt(bars['source_erase_rate'])}, safe drop {_fmt(bars['safe_accuracy_drop_points'])} pt")
        if seen[key] not in trials:
            trials.append(seen[key])
        return seen[key]["bars"]

    best = start
    best_key = objective(trial(best))
    for field, values in grid.items():
        for v in values:
            cand = dataclasses.replace(best, **{field: v})
            k = objective(trial(cand))
            if k > best_key:
                best, best_key = cand, k
    return {"chosen": best.to_json(), "trials": trials}


