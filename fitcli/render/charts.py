"""Vega-Lite building blocks shared by the report page (``html.py``) and the comparison page
(``html_compare.py``): rounding, the common spec config, the unit grid, the chart registry."""

from __future__ import annotations

import math
from typing import Any

MAP_CELLS = 1024  # most cells of a unit map; past it, consecutive units share a cell
MAP_COLUMNS = 64
TABLE_ROWS = 2000  # most rows of a page's table


def rounded(v: float | None, digits: int = 4) -> float | None:
    """Round to ``digits`` significant digits (the page shows no more; the JSON report keeps all)."""
    if v is None or not math.isfinite(v):
        return None
    return float(f"{v:.{digits}g}")


def vl_spec(**kw: Any) -> dict:
    return {"config": {"view": {"stroke": None}, "axis": {"labelLimit": 240}}, **kw}


def grid_chart(cells: list[dict], group: int, color: dict, tooltip: list[dict]) -> dict:
    """Units as a grid of squares, MAP_COLUMNS wide (a cell is ``group`` units past the threshold)."""
    cols = min(MAP_COLUMNS, len(cells))
    tip = {"field": "a", "title": "unit"} if group == 1 else {"field": "units", "title": "units"}
    return vl_spec(
        data={"values": cells},
        transform=[{"calculate": f"datum.i % {cols}", "as": "x"}, {"calculate": f"floor(datum.i / {cols})", "as": "y"},
                   {"calculate": "datum.a + '-' + datum.b", "as": "units"}],
        width={"step": 11}, height={"step": 11},
        mark={"type": "rect", "tooltip": True, "stroke": "white", "strokeWidth": 0.5},
        encoding={"x": {"field": "x", "type": "ordinal", "axis": None},
                  "y": {"field": "y", "type": "ordinal", "axis": None},
                  "color": color, "tooltip": [tip, *tooltip]})


class Charts:
    def __init__(self) -> None:
        self.specs: dict[str, dict] = {}

    def add(self, spec: dict) -> str:
        cid = f"c{len(self.specs)}"
        self.specs[cid] = spec
        return cid


def setting_text(v: Any) -> str:
    return ", ".join(map(str, v)) if isinstance(v, list) else str(v)
