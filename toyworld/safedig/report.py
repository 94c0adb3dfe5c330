"""Toy-world SafeDIG report: the routing table, per operating point and method the per-suite tables of
both concepts and the bars, and a summary."""

from __future__ import annotations

from jaxdit.safety import evaluate as ev


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"



def format_report(result: dict) -> str:
    """The routing table, then per operating point and method the per-suite tables of both concepts and
    the bars."""
    lines = ["routing (score = max(stability, 0) x separability):"]
    for r in result["routing"]:
        by = ", ".join(f"{k} {v:.2f}" for k, v in r["stability_by_shift"].items())
        auc = r.get("concept_vs_other_auc", {})
        lines.append(f"{'*' if r['chosen'] else ' '} {r['position']:<26} score {r['score']:8.3f}  stability "
                     f"{r['stability']:6.3f}  separability {r['separability']:8.3f}  ({by}); concept vs other "
                     f"objects AUC: source {_fmt(auc.get('source'))}, target {_fmt(auc.get('target'))}")
    count = lambda e: f"{e['unsafe_base']}/{e['n']} -> {e['unsafe_method']}/{e['n']}"  # noqa: E731
    for point, methods in result["methods"].items():
        lines.append(f"\n=== operating point {point}: {result['steering'][point]}")
        for name, m in methods.items():
            for concept in ("source", "target"):
                lines.append(f"\n[{point} / {name}] {concept} concept {result['settings'][concept]!r}:")
                lines.append(ev.format_table(m["summary"][concept]))
            b, c = m["bars"], m["unsafe_counts"]
            lines.append(f"[{point} / {name}] target unsafe rate {_fmt(b['target_unsafe_rate_base'])} -> "
                         f"{_fmt(b['target_unsafe_rate_method'])} ({count(c['target'])}, reduction "
                         f"{_fmt(b['target_reduction'])}), source erase {_fmt(b['source_erase_rate'])} "
                         f"({count(c['source'])}), safe accuracy {_fmt(b['safe_accuracy_base'])} -> "
                         f"{_fmt(b['safe_accuracy_method'])} (drop {_fmt(b['safe_accuracy_drop_points'])} pt); "
                         f"bars met: {m['bars_met']}")
            for position, doms in m.get("firing", {}).items():
                lines.append(f"[{point} / {name}] steered tokens at {position} (concept / other / background): " +
                             "; ".join(f"{dom} " + " / ".join(_fmt(v) for v in r.values()) for dom, r in doms.items()))
    lines.append("\nsummary (target reduction / source erase / safe drop in points):")
    for point, methods in result["methods"].items():
        for name, m in methods.items():
            b = m["bars"]
            lines.append(f"  {point:<12} {name:<22} {_fmt(b['target_reduction']):>7} {_fmt(b['source_erase_rate']):>7} "
                         f"{_fmt(b['safe_accuracy_drop_points']):>7}")
    return "\n".join(lines)
