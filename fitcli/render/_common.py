"""Helpers shared by the renderers."""

from __future__ import annotations


def fmt(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "non-finite"
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}"


def pct(fraction: float) -> str:
    return f"{100.0 * fraction:.1f}%"


def key_metrics(report: dict) -> list[str]:
    """The ranking metric, then the computed metrics with the highest declared rank priority."""
    present = set(report["settings"].get("metrics", []))
    info = report.get("metric_info") or {}
    by_priority = sorted(present, key=lambda m: (-(info.get(m) or {}).get("rank_priority", 0), m))
    top = [m for m in by_priority if (info.get(m) or {}).get("rank_priority", 0) > 0]
    keys = [m for m in (report["settings"].get("rank_by"), *top) if m in present]
    return list(dict.fromkeys(keys))[:3]
