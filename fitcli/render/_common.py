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


def coverage_line(report: dict) -> str:
    """'coverage: 64 units in 2 layers audited, 97.4% of the model's 2,212 parameters; 1 module not audited'."""
    c = report.get("coverage") or {}
    if "units" not in c:
        return "coverage: not recorded (a report from an older fitcli)"
    text = (f"coverage: {c['units']} units in {c['layers']} layers audited, {100.0 * c['fraction']:.1f}% of the "
            f"model's {c['model_parameters']:,} parameters")
    n = len(c.get("not_audited") or [])
    return text + (f"; {n} module{'s' if n != 1 else ''} not audited" if n else "")


def key_metrics(report: dict) -> list[str]:
    """The ranking metric, then the computed metrics with the highest declared rank priority."""
    present = set(report["settings"].get("metrics", []))
    info = report.get("metric_info") or {}
    by_priority = sorted(present, key=lambda m: (-(info.get(m) or {}).get("rank_priority", 0), m))
    top = [m for m in by_priority if (info.get(m) or {}).get("rank_priority", 0) > 0]
    keys = [m for m in (report["settings"].get("rank_by"), *top) if m in present]
    return list(dict.fromkeys(keys))[:3]
