"""Helpers shared by the renderers."""

from __future__ import annotations

import heapq
import re


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


def common_prefix(names: list[str]) -> str:
    """The dotted prefix every name shares (``'transformer.h.'``), leaving each name at least one
    component of its own; '' when there is none (or a single name)."""
    parts = [n.split(".") for n in names]
    if len(parts) < 2:
        return ""
    k = 0
    while all(len(p) > k + 1 and p[k] == parts[0][k] for p in parts):
        k += 1
    return ".".join(parts[0][:k]) + "." if k else ""


def strip_prefix(text: str, prefix: str) -> str:
    """``text`` with ``prefix`` dropped wherever a name starts with it (``gelu(blocks.0.fc)``)."""
    return re.sub(r"(?<![\w.])" + re.escape(prefix), "", text) if prefix else text


def wrap_name(name: str, width: int | None) -> str:
    """``name`` in lines of at most ``width`` characters, broken after a ``.``, ``/``, ``(`` or
    space (inside a component only when the component alone is wider): never cut short."""
    if not width or width < 1 or len(name) <= width:
        return name
    lines, cur = [], ""
    for piece in re.findall(r"[^./(\s]*[./(\s]*", name):
        if not piece:
            continue
        if len((cur + piece).rstrip()) <= width:
            cur += piece
            continue
        if cur.strip():
            lines.append(cur.rstrip())
        cur = piece
        while len(cur.rstrip()) > width:
            lines.append(cur[:width])
            cur = cur[width:]
    if cur.strip():
        lines.append(cur.rstrip())
    return "\n".join(lines)


def name_widths(width: int | None, fixed: list[int], longest: list[int], least: int = 8) -> list[int] | None:
    """Widths for the name columns of a table ``width`` characters wide whose other columns need
    ``fixed`` characters: each name column its longest entry when all fit, else a share of what
    is left (at least ``least``); None when even that does not fit (or no width is known)."""
    if not width:
        return None
    n = len(fixed) + len(longest)
    free = width - sum(fixed) - 3 * n
    if sum(longest) <= free:
        return list(longest)
    if free < least * len(longest):
        return None
    out = [max(least, free * w // max(1, sum(longest))) for w in longest]
    while sum(out) > free:
        i = out.index(max(out))
        out[i] -= 1
    return out


def not_audited_groups(missing: list[dict]) -> list[dict]:
    """The modules left out of an audit grouped by type and reason: ``{type, reason, names,
    parameters}``, in the order each group first appears."""
    groups: dict[tuple[str, str], dict] = {}
    for x in missing:
        g = groups.setdefault((x["type"], x["reason"]), {"type": x["type"], "reason": x["reason"], "names": [],
                                                         "parameters": 0})
        g["names"].append(x["name"])
        g["parameters"] += x.get("parameters") or 0
    return list(groups.values())


def not_audited_text(g: dict, shown: int = 8) -> str:
    """'LayerNorm x 13: not an auditable layer type (ln1, ln2, ..., and 5 more)', or 'fc3 (Linear):
    not among the layers asked for': one line per reason, naming the first ``shown`` modules."""
    names = g["names"]
    if len(names) == 1:
        return f"{names[0]} ({g['type']}): {g['reason']}" if g["type"] else f"{names[0]}: {g['reason']}"
    head = f"{g['type']} x {len(names)}" if g["type"] else f"{len(names)} modules"
    more = f", and {len(names) - shown} more" if len(names) > shown else ""
    return f"{head}: {g['reason']} ({', '.join(names[:shown])}{more})"


def ablation_rows(report: dict, n: int | None = None) -> list[dict]:
    """The ``n`` units of an ablate report whose exact loss change is smallest in magnitude
    (|Δloss|: exact changes share one scale across layers), with their accuracy change; ``n``
    defaults to the report's ranked rows."""
    n = len(report.get("ranked") or []) if n is None else n
    rows = []
    for li, lay in enumerate(report["layers"]):
        deltas = lay["metrics"].get("ablation") or []
        acc = lay["metrics"].get("ablation_accuracy")
        for u, v in enumerate(deltas):
            if v is not None:
                rows.append((abs(v), li, u, lay["name"], v, acc[u] if acc is not None and u < len(acc) else None))
    return [{"layer": name, "unit": u, "value": v, "accuracy_change": a}
            for _, _, u, name, v, a in heapq.nsmallest(n, rows)]


def ablation_counts(report: dict) -> tuple[int, int]:
    """(units removable, units ablated) of an ablate report."""
    rem = sum(len(lay.get("removable") or []) for lay in report["layers"])
    tot = sum(sum(v is not None for v in lay["metrics"].get("ablation") or []) for lay in report["layers"])
    return rem, tot


KIND_TITLES = {"heads": "attention heads", "kv_groups": "key-value groups", "mlp": "MLP channels", "hidden": "hidden channels",
               "rows": "projection rows and other layers"}


def by_kind(ranked: list[dict]) -> list[tuple[str | None, list[dict]]]:
    """The ranked rows as one table per unit kind (rows without a kind: one table)."""
    out: dict[str | None, list[dict]] = {}
    for r in ranked:
        out.setdefault(r.get("kind"), []).append(r)
    return list(out.items())


def kind_validation_rows(v: dict) -> tuple[list[str], list[dict]]:
    """A validation's per-kind summary (``v["kinds"]``) as a metric x kind grid: the kinds, and one
    row per metric (``{"metric", "cells": {kind: (spearman, best)}}``; a kind the metric does not
    apply to has no cell: block scores are for blocks only), then the random order's row."""
    kinds = list(v.get("kinds") or {})
    metrics = list(dict.fromkeys(m for k in kinds for m in sorted(v["kinds"][k]["metrics"])))
    rows = []
    for m in metrics:
        cells = {k: (c["spearman"], v["kinds"][k].get("best") == m) for k in kinds
                 if (c := v["kinds"][k]["metrics"].get(m)) is not None}
        rows.append({"metric": m, "cells": cells})
    rnd = {k: ((v["kinds"][k].get("random") or {}).get("spearman"), False) for k in kinds
           if v["kinds"][k].get("random")}
    if rnd:
        rows.append({"metric": "(random order)", "cells": rnd})
    return kinds, rows
