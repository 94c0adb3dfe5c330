"""Toy-world SafeDIG routing: `core.route` over the candidate positions, with the stability under
each shift alone and how well each position tells the concept from other objects."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxdit.safety.safedig import core
from jaxdit.toyworld.safedig.harvest import CANDIDATES, Harvest, stream_of

def _cap(x: np.ndarray, rows: int, rng) -> np.ndarray:
    return x if len(x) <= rows else x[rng.choice(len(x), rows, replace=False)]


def routing_groups(source: Harvest, target: Harvest, shift: Harvest, position: str, rows: int = 4000,
                   seed: int = 0) -> dict:
    """`core.route` input for one position: source pair and the named shifted pairs (unsafe, safe)."""
    rng = np.random.default_rng(seed)
    pair = lambda h, steps=None: (_cap(h.unsafe(position, steps), rows, rng),  # noqa: E731
                                  _cap(h.safe(position, steps), rows, rng))
    steps = sorted(set(source.step[stream_of(position)].tolist()))
    half = len(steps) // 2
    return {"source": pair(source),
            "shifts": {"target": pair(target), "paraphrase_seed": pair(shift),
                       "high_noise": pair(source, steps[:half] or steps), "low_noise": pair(source, steps[half:])}}


def concept_auc(h: Harvest, position: str, rows: int = 2000, seed: int = 0) -> float | None:
    """How well the concept's tokens separate from *other objects'* tokens (other words for text) at a
    position: ROC AUC of the projection on the difference of means, fitted on one half of the tokens and
    scored on the other. 0.5: the position does not tell the concept from other objects."""
    rng = np.random.default_rng(seed)
    u, o = _cap(h.select(position, (2,)), 2 * rows, rng), _cap(h.select(position, (1,)), 2 * rows, rng)
    if len(u) < 4 or len(o) < 4:
        return None
    u, o = u[rng.permutation(len(u))], o[rng.permutation(len(o))]
    (u_fit, u_test), (o_fit, o_test) = np.array_split(u, 2), np.array_split(o, 2)
    d = u_fit.mean(0) - o_fit.mean(0)
    pu, po = u_test @ d, o_test @ d
    return float(np.mean(pu[:, None] > po[None, :]) + 0.5 * np.mean(pu[:, None] == po[None, :]))


def route_positions(source: Harvest, target: Harvest, shift: Harvest, positions: Sequence[str] = CANDIDATES,
                    top: int = 2, rows: int = 4000, seed: int = 0) -> list[dict]:
    """`core.route` over the candidates; rows also hold the stability under each shift alone."""
    groups = {p: routing_groups(source, target, shift, p, rows, seed) for p in positions}
    rows_out = core.route({p: {"source": g["source"], "shifts": list(g["shifts"].values())}
                           for p, g in groups.items()}, top=top)
    for r in rows_out:
        g = groups[r["position"]]
        r["stability_by_shift"] = {
            name: core.route({r["position"]: {"source": g["source"], "shifts": [pair]}})[0]["stability"]
            for name, pair in g["shifts"].items()}
        r["tokens"] = {"source_unsafe": len(g["source"][0]), "source_safe": len(g["source"][1])}
        r["concept_vs_other_auc"] = {"source": concept_auc(source, r["position"], seed=seed),
                                     "target": concept_auc(target, r["position"], seed=seed)}
    return rows_out


