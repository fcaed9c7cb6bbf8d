"""Helpers shared by the renderers."""

from __future__ import annotations

KEY_AGGREGATES = ("taylor", "act_mean", "weight_norm")


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
    present = set(report["settings"].get("metrics", []))
    keys = [m for m in (report["settings"].get("rank_by"), *KEY_AGGREGATES) if m in present]
    return list(dict.fromkeys(keys))[:3]
