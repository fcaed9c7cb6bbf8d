"""A training history (``fitcli.tracker.history_summary``) as a table, markdown or CSV: dead
fraction per layer over steps, and the step each unit died at."""

from __future__ import annotations

import csv
import io

from rich.console import Group
from rich.table import Table

from fitcli.render._common import pct

MAX_COLUMNS = 12  # steps shown side by side; more are thinned evenly (first and last kept)


def shown_steps(n: int, most: int = MAX_COLUMNS) -> list[int]:
    """Indices of the records shown as columns: all of them, or ``most`` spread evenly."""
    if n <= most:
        return list(range(n))
    return sorted({round(i * (n - 1) / (most - 1)) for i in range(most)})


def _cell(v: float | None) -> str:
    return "-" if v is None else pct(v)


def _died_text(died: dict[str, int]) -> str:
    return ", ".join(f"{u}@{s}" for u, s in died.items()) or "-"


def render_history(summary: dict) -> Group:
    cols = shown_steps(len(summary["steps"]))
    t = Table(title=f"dead fraction per layer over {summary['records']} records (tau {summary.get('tau')})",
              title_justify="left")
    t.add_column("layer")
    t.add_column("units", justify="right")
    for i in cols:
        t.add_column(f"step {summary['steps'][i]}", justify="right")
    for lay in summary["layers"]:
        name = lay["name"] + (" (final)" if lay["final"] else "")
        t.add_row(name, str(lay["units"]), *(_cell(lay["dead_fraction"][i]) for i in cols))
    d = Table(title="units dead from a step on, through the last record (unit@step)", title_justify="left")
    d.add_column("layer")
    d.add_column("died (unit@step)")
    for lay in summary["layers"]:
        if lay["died_at"]:
            d.add_row(lay["name"], _died_text(lay["died_at"]))
    parts = [t]
    if len(cols) < len(summary["steps"]):
        parts.append(f"{len(summary['steps'])} records; {len(cols)} shown (--format csv or json has them all)")
    parts.append(d if d.row_count else "no unit is dead in the last record")
    return Group(*parts)


def render_history_markdown(summary: dict) -> str:
    cols = shown_steps(len(summary["steps"]))
    head = ["layer", "units", *(f"step {summary['steps'][i]}" for i in cols)]
    lines = [f"### Dead fraction per layer ({summary['records']} records, tau {summary.get('tau')})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lay in summary["layers"]:
        name = lay["name"] + (" (final)" if lay["final"] else "")
        lines.append("| " + " | ".join([f"`{name}`", str(lay["units"]),
                                        *(_cell(lay["dead_fraction"][i]) for i in cols)]) + " |")
    lines += ["", "### Died (dead from this step through the last record)", ""]
    died = [lay for lay in summary["layers"] if lay["died_at"]]
    if died:
        lines += ["| layer | unit@step |", "|---|---|"]
        lines += [f"| `{lay['name']}` | {_died_text(lay['died_at'])} |" for lay in died]
    else:
        lines.append("No unit is dead in the last record.")
    return "\n".join(lines) + "\n"


def render_history_csv(summary: dict) -> str:
    """One row per (record, layer): step, layer, units, dead count, dead fraction."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["step", "layer", "units", "final", "dead", "dead_fraction"])
    for i, step in enumerate(summary["steps"]):
        for lay in summary["layers"]:
            dead, frac = lay["dead"][i], lay["dead_fraction"][i]
            w.writerow([step, lay["name"], lay["units"], int(lay["final"]), "" if dead is None else len(dead),
                        "" if frac is None else repr(float(frac))])
    return buf.getvalue()


__all__ = ["render_history", "render_history_markdown", "render_history_csv", "shown_steps"]
