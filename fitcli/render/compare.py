"""A comparison (``fitcli.compare/1`` dict) for the terminal (Rich) and as Markdown (CI job
summaries: compact, the per-layer table and the units that died)."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from fitcli.render._common import fmt, pct

LIST_LIMIT = 20  # unit ids shown per layer before "..."


def _ids(units: list[int] | None, limit: int = LIST_LIMIT) -> str:
    if units is None:
        return "-"
    if not units:
        return ""
    return ", ".join(map(str, units[:limit])) + (f" ... (+{len(units) - limit})" if len(units) > limit else "")


def _frac(x: float | None) -> str:
    return "-" if x is None else pct(x)


def _change(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{100.0 * x:+.1f} pt" if x else "0"


def _side(side: dict) -> str:
    m = side.get("model") or {}
    d = side.get("data") or {}
    return f"{side.get('source') or m.get('path')} ({side['kind']}; data {d.get('spec')})"


def _headline(c: dict) -> str:
    s = c["summary"]
    if not s["dead_known"]:
        return "dead units not known on both sides: no unit compared for deaths"
    return (f"{s['died']} of {s['units_compared']} compared units died ({s['died_percent']:.2f}%), "
            f"{s['revived']} revived; dead {s['dead_base']} -> {s['dead_new']} "
            f"({_frac(s['dead_fraction_base'])} -> {_frac(s['dead_fraction_new'])})")


def _gate_line(g: dict) -> str:
    return "gate passed" if g["passed"] else "gate FAILED: " + "; ".join(g["failures"])


def _dead_cell(lay: dict) -> tuple[str, str, str]:
    if lay["final"]:
        return "final", "final", ""
    return (_frac(lay["dead_fraction_base"]), _frac(lay["dead_fraction_new"]), _change(lay["dead_fraction_change"]))


def _units(lay: dict) -> str:
    b, n = lay["units_base"], lay["units_new"]
    return str(b) if b == n else f"{'-' if b is None else b} -> {'-' if n is None else n}"


def render_compare(c: dict) -> Group:
    """The terminal view: both sides, the headline, per-layer table, died/revived, largest drifts."""
    head = Text()
    head.append("fitcli compare\n", style="bold")
    head.append(f"base {_side(c['base'])}\nnew  {_side(c['new'])}\n")
    s = c["summary"]
    head.append(_headline(c), style="bold red" if s["died"] else "bold green" if s["dead_known"] else "yellow")
    t = Table(show_edge=False)
    for col, just in (("layer", "left"), ("status", "left"), ("units", "right"), ("dead base", "right"),
                      ("dead new", "right"), ("Δ dead", "right"), ("died", "left"), ("revived", "left")):
        t.add_column(col, justify=just)
    for lay in c["layers"]:
        t.add_row(Text(lay["name"]), lay["status"].replace("_", " "), _units(lay), *_dead_cell(lay),
                  Text(_ids(lay["died"])), Text(_ids(lay["revived"])), style="red" if lay["died"] else None)
    parts: list = [head, Text("Layers", style="bold"), t]
    drifts = s.get("largest_drifts") or []
    if drifts:
        d = Table(show_edge=False)
        for col in ("layer", "metric", "unit", "base", "new", "change", "drift"):
            d.add_column(col, justify="left" if col in ("layer", "metric") else "right")
        for r in drifts:
            d.add_row(Text(r["layer"]), r["metric"], str(r["unit"]), fmt(r["base"]), fmt(r["new"]), fmt(r["change"]),
                      fmt(r["drift"]))
        parts += [Text("Largest drift of each metric (|change| / the layer's base spread)", style="bold"), d]
    nonfinite = [(lay["name"], lay["became_nonfinite"]) for lay in c["layers"] if lay["became_nonfinite"]]
    if nonfinite:
        parts.append(Text("became non-finite: " + "; ".join(f"{n} units {_ids(u, 10)}" for n, u in nonfinite),
                          style="yellow"))
    for note in c.get("notes") or []:
        parts.append(Text(f"note: {note}", style="dim"))
    if c.get("gate"):
        g = c["gate"]
        parts.append(Text(_gate_line(g), style="bold green" if g["passed"] else "bold red"))
    return Group(*parts)


def render_compare_markdown(c: dict) -> str:
    """Markdown for a CI job summary: headline, gate, per-layer table, died units, drifts folded."""
    s = c["summary"]
    base, new = c["base"], c["new"]
    lines = [f"## fitcli compare: `{base.get('source') or base['model'].get('path')}` → "
             f"`{new.get('source') or new['model'].get('path')}`", "", f"**{_headline(c)}**"]
    if c.get("gate"):
        g = c["gate"]
        lines += ["", "Gate: **passed**" if g["passed"] else "Gate: **FAILED** — " + "; ".join(g["failures"])]
    lines += ["", "| layer | status | units | dead base | dead new | Δ dead | died | revived |",
              "|---|---|---:|---:|---:|---:|---|---|"]
    for lay in c["layers"]:
        lines.append(f"| {lay['name']} | {lay['status'].replace('_', ' ')} | {_units(lay)} | "
                     + " | ".join(_dead_cell(lay)) + f" | {_ids(lay['died'])} | {_ids(lay['revived'])} |")
    died = [(lay["name"], lay["died"]) for lay in c["layers"] if lay["died"]]
    if died:
        lines += ["", "Units that died:", ""]
        lines += [f"- `{name}`: {', '.join(map(str, units))}" for name, units in died]
    drifts = s.get("largest_drifts") or []
    if drifts:
        lines += ["", "<details><summary>Largest drift of each metric</summary>", "",
                  "| layer | metric | unit | base | new | change | drift |", "|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['layer']} | {r['metric']} | {r['unit']} | {fmt(r['base'])} | {fmt(r['new'])} | "
                  f"{fmt(r['change'])} | {fmt(r['drift'])} |" for r in drifts]
        lines += ["", f"Drift: {c['drift_measure']}.", "", "</details>"]
    notes = c.get("notes") or []
    if notes:
        lines += [""] + [f"> note: {n}" for n in notes]
    return "\n".join(lines) + "\n"
