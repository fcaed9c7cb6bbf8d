"""The comparison page (``fitcli compare``, ``fitcli.compare/1``): its charts and context for
``templates/compare.html.j2``. The page itself is assembled by ``fitcli.render.html.render_html``."""

from __future__ import annotations

import math
from typing import Any

from fitcli.render.charts import (
    MAP_CELLS,
    TABLE_ROWS,
    Charts,
    grid_chart,
    rounded,
    setting_text,
    vl_spec,
)

STATES = ("died", "revived", "nonfinite", "dead", "alive")  # a binned cell shows the first its group has
STATE_COLOURS = ("#d62728", "#2ca02c", "#ff7f0e", "#555555", "#dfe6ee")


def change_cells(lay: dict, cells: int = MAP_CELLS) -> tuple[list[dict], int]:
    """Cells of a unit-change map: each unit's state (died, revived, became non-finite, dead on
    both sides, alive), grouped past ``cells`` units (a group shows its first state in STATES)."""
    n = lay.get("units") or 0
    died, revived = set(lay.get("died") or []), set(lay.get("revived") or [])
    bad, dead = set(lay.get("became_nonfinite") or []), set(lay.get("dead_new") or [])

    def state(u: int) -> int:
        return 0 if u in died else 1 if u in revived else 2 if u in bad else 3 if u in dead else 4

    g = max(1, math.ceil(n / cells))
    out = []
    for i, start in enumerate(range(0, n, g)):
        members = range(start, min(n, start + g))
        out.append({"i": i, "a": start, "b": members[-1], "s": STATES[min(state(u) for u in members)]})
    return out, g


def change_map_chart(cells: list[dict], group: int, legend: bool) -> dict:
    color = {"field": "s", "type": "nominal", "title": "unit",
             "scale": {"domain": list(STATES), "range": list(STATE_COLOURS)}, **({} if legend else {"legend": None})}
    return grid_chart(cells, group, color, [{"field": "s", "title": "change"}])


def compare_dead_chart(layers: list[dict]) -> dict:
    rows = [{"layer": lay["name"], "side": side, "fraction": rounded(lay[f"dead_fraction_{side}"]),
             "dead": len(lay.get(f"dead_{side}") or [])}
            for lay in layers for side in ("base", "new") if lay.get(f"dead_fraction_{side}") is not None]
    return vl_spec(
        data={"values": rows}, mark={"type": "bar", "tooltip": True}, width=480, height={"step": 12},
        encoding={"y": {"field": "layer", "type": "nominal", "sort": None, "title": None},
                  "yOffset": {"field": "side", "sort": ["base", "new"]},
                  "x": {"field": "fraction", "type": "quantitative", "title": "dead fraction", "axis": {"format": "%"}},
                  "color": {"field": "side", "type": "nominal", "scale": {"domain": ["base", "new"],
                                                                          "range": ["#9ecae1", "#d62728"]}},
                  "tooltip": [{"field": "layer"}, {"field": "side"}, {"field": "dead"},
                              {"field": "fraction", "format": ".1%"}]})


def drift_chart(layers: list[dict]) -> dict | None:
    rows = [{"layer": lay["name"], "metric": m, "drift": rounded(max(d["drift"] for d in ds)),
             "unit": max(ds, key=lambda d: d["drift"])["unit"]}
            for lay in layers for m, ds in (lay.get("drifts") or {}).items() if ds]
    if not rows:
        return None
    return vl_spec(
        data={"values": rows}, mark={"type": "rect", "tooltip": True}, width={"step": 60}, height={"step": 16},
        encoding={"x": {"field": "metric", "type": "nominal", "title": None, "axis": {"labelAngle": -40}},
                  "y": {"field": "layer", "type": "nominal", "sort": None, "title": None},
                  "color": {"field": "drift", "type": "quantitative", "title": "largest drift",
                            "scale": {"type": "symlog", "scheme": "orangered"}},
                  "tooltip": [{"field": "layer"}, {"field": "metric"}, {"field": "unit"},
                              {"field": "drift", "format": ".3g"}]})


def compare_context(data: dict, charts: Charts) -> dict[str, Any]:
    layers = data.get("layers") or []
    maps, grouped = [], []
    for lay in layers:
        if lay.get("status") != "compared" or lay.get("died") is None or not lay.get("units"):
            continue
        cells, g = change_cells(lay)
        maps.append({"layer": lay, "chart": charts.add(change_map_chart(cells, g, legend=not maps)), "group": g})
        if g > 1:
            grouped.append(lay["name"])
    rows = [{"layer": lay["name"], "metric": m, **d} for lay in layers for m, ds in (lay.get("drifts") or {}).items()
            for d in ds]
    rows.sort(key=lambda r: (-r["drift"], r["layer"], r["metric"], r["unit"]))
    chart = drift_chart(layers)
    sides = data.get("base") or {}, data.get("new") or {}
    prov = []
    for key, get in (("input", lambda x: f"{x.get('kind')}: {x.get('source')}"),
                     ("model", lambda x: (x.get("model") or {}).get("path")),
                     ("sha256", lambda x: (x.get("model") or {}).get("sha256")),
                     ("architecture", lambda x: (x.get("model") or {}).get("arch")),
                     ("data", lambda x: (x.get("data") or {}).get("spec")),
                     ("created", lambda x: x.get("created"))):
        prov.append((key, str(get(sides[0])), str(get(sides[1]))))
    for k in sorted(set(sides[0].get("settings") or {}) | set(sides[1].get("settings") or {})):
        prov.append((f"settings.{k}", *(setting_text((x.get("settings") or {}).get(k, "")) for x in sides)))
    return {"dead_chart": charts.add(compare_dead_chart(layers)), "maps": maps, "grouped": grouped,
            "drift_chart": charts.add(chart) if chart else None, "rows": rows[:TABLE_ROWS],
            "total_rows": len(rows), "provenance": prov}
