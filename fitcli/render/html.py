"""HTML: one self-contained page for a report (``--format html``, ``fitcli render``).

The page is a Jinja2 template (``templates/report.html.j2``) with its stylesheet and script
(``assets/``) and the Vega/Vega-Lite/vega-embed runtime inlined once, so it opens offline in any
current browser. The runtime comes from the installed ``vl-convert-python`` package (the ``html``
extra) at render time; it costs about 0.9 MB per page. Charts are Vega-Lite specs built here from
the report dict; the page embeds each chart when it scrolls into view, so large reports stay
smooth. Unit-level plots are binned past a threshold (and the page says so):

- unit maps show at most ``MAP_CELLS`` cells per layer (consecutive units grouped, the least-fit
  unit of a group colours its cell);
- the ranked table lists the ``TABLE_ROWS`` least-fit units;
- the validation scatter plots show at most ``SCATTER_POINTS`` units per metric (an even sample);
- each metric's distributions are one heatmap per kind of unit (layers x value bins), however
  many layers the model has.

When ``redundancy`` was computed the page has a redundancy section (its R² per layer and the
units the rest of their layer rebuilds); with ``--validate``, each metric's Spearman per unit kind
(residual blocks: Block Influence and angular distance against exact removal).
"""

from __future__ import annotations

import bisect
import functools
import json
import math
from importlib import resources
from typing import Any

from fitcli.discovery.kinds import entry_kind
from fitcli.errors import UsageError
from fitcli.render._common import coverage_line, key_metrics, kind_validation_rows
from fitcli.render.browser import BROWSERS, browser_check, find_chromium  # noqa: F401  (tests and bench)
from fitcli.render.charts import (
    MAP_CELLS,
    TABLE_ROWS,
    Charts,
    grid_chart,
    rounded,
    setting_text,
    vl_spec,
)

_r, _spec, _grid_chart, _text, _Charts = rounded, vl_spec, grid_chart, setting_text, Charts

DEAD_COLOUR, CONSTANT_COLOUR = "#d62728", "#ff7f0e"
SCATTER_POINTS = 2000
HIST_BINS = 30
LOG_SPAN = 1e3  # a metric whose nonzero |values| span more than this many times gets a log (symlog) axis
# the kinds of unit whose values are drawn apart (their scales differ); every other kind is a neuron or channel
UNIT_KINDS = {"heads": "attention heads", "weights": "embedding rows", "gated": "gated units",
              "recurrent": "recurrent units"}
NEURONS = "neurons and channels"


# ---- runtime and assets ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def vega_bundle() -> str:
    """Vega, Vega-Lite and vega-embed as one offline script (from vl-convert-python)."""
    try:
        import vl_convert
    except ImportError as e:
        raise UsageError("the HTML report needs the 'html' extra: pip install 'fitcli[html]'") from e
    return vl_convert.javascript_bundle().replace("</script", "<\\/script")


def _asset(name: str) -> str:
    return resources.files("fitcli").joinpath(f"render/assets/{name}").read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def _template():
    try:
        import jinja2
    except ImportError as e:
        raise UsageError("the HTML report needs the 'html' extra: pip install 'fitcli[html]'") from e
    env = jinja2.Environment(loader=jinja2.PackageLoader("fitcli", "render/templates"),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _num_text
    env.filters["pct"] = lambda x: "" if x is None else f"{100.0 * x:.1f}%"
    return env


def script_json(obj: Any) -> str:
    """JSON safe inside a <script> element (no '<', '>' or '&' left to end it early)."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# ---- numbers --------------------------------------------------------------------------------------

def _num_text(v: float | None) -> str:
    from fitcli.render._common import fmt

    return "" if v is None else fmt(v)


def _finite(values) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _symlog_constant(values: list[float]) -> float | None:
    """A symlog constant when the nonzero |values| span more than LOG_SPAN, else None (linear)."""
    nz = sorted(abs(v) for v in values if v != 0)
    if len(nz) < 2 or nz[-1] / nz[0] <= LOG_SPAN:
        return None
    return nz[max(0, len(nz) // 20)]  # the 5th percentile: the linear zone around 0 stays narrow


def _fwd(v: float, c: float | None) -> float:
    return v if c is None else math.copysign(math.log1p(abs(v) / c), v)


def _back(t: float, c: float | None) -> float:
    return t if c is None else math.copysign(c * math.expm1(abs(t)), t)


def histogram(values: list[float], lo: float, hi: float, bins: int, c: float | None) -> list[tuple[float, float, int]]:
    """Counts of ``values`` in ``bins`` equal bins of [lo, hi] (in symlog space when ``c``): (start, end, n)."""
    tl, th = _fwd(lo, c), _fwd(hi, c)
    if th <= tl:
        return [(lo, hi, len(values))] if values else []
    width = (th - tl) / bins
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int((_fwd(v, c) - tl) / width)))] += 1
    return [(_back(tl + k * width, c), _back(tl + (k + 1) * width, c), n) for k, n in enumerate(counts) if n]


def percentile_fitness(fit: list[float | None]) -> list[float | None]:
    """Each unit's place among its layer's finite fitness values: 0 the least fit, 1 the fittest
    (ties share the lower place)."""
    finite = sorted(v for v in fit if v is not None)
    if not finite:
        return [None] * len(fit)
    top = max(1, len(finite) - 1)
    return [None if v is None else bisect.bisect_left(finite, v) / top for v in fit]


# ---- charts ---------------------------------------------------------------------------------------

def dead_fraction_chart(layers: list[dict]) -> dict:
    rows = [{"layer": lay["name"], "dead": len(lay["dead"]), "units": lay["units"], "fraction": _r(lay["dead_fraction"])}
            for lay in layers if not lay.get("final") and not entry_kind(lay).weight_only]
    return _spec(
        data={"values": rows}, mark={"type": "bar", "tooltip": True},
        width=480, height={"step": 16},
        encoding={"y": {"field": "layer", "type": "nominal", "sort": None, "title": None},
                  "x": {"field": "fraction", "type": "quantitative", "title": "dead fraction",
                        "axis": {"format": "%"}},
                  "color": {"value": "#d62728"},
                  "tooltip": [{"field": "layer"}, {"field": "dead"}, {"field": "units"},
                              {"field": "fraction", "format": ".1%", "title": "dead fraction"}]})


def unit_kind(layer: dict) -> str:
    return UNIT_KINDS.get(layer.get("activation_point_kind"), NEURONS)


def distribution_chart(layers: list[dict], metric: str, kind: str = "") -> tuple[dict, str]:
    """One heatmap of ``metric``: a row per layer, HIST_BINS value bins shared by every row
    (symlog when the values span decades), each cell coloured by the share of the layer's units
    whose value falls in it. Returns the spec and a caption ({} when no value is finite)."""
    series = {lay["name"]: _finite(lay["metrics"][metric]) for lay in layers if metric in lay["metrics"]}
    series = {name: vals for name, vals in series.items() if vals}
    every = [v for vals in series.values() for v in vals]
    if not every:
        return {}, f"{metric}: no finite values"
    lo, hi = min(every), max(every)
    c = _symlog_constant(every)
    rows = [{"layer": name, "a": _r(a, 6), "b": _r(b, 6), "n": n, "share": _r(n / len(vals), 4)}
            for name, vals in series.items() for a, b, n in histogram(vals, lo, hi, HIST_BINS, c)]
    scale = {"type": "symlog", "constant": _r(c, 6)} if c else {"type": "linear", "zero": False}
    what = f"{metric}{f' ({kind})' if kind else ''}, {len(series)} layer{'' if len(series) == 1 else 's'}"
    caption = (f"{what}: symlog axis (nonzero values span {_decades(every)} decades)" if c
               else f"{what}: linear axis")
    step = 14 if len(series) <= 40 else max(3, 560 // len(series))
    return _spec(
        usermeta={"chart": "distribution", "metric": metric, "kind": kind},
        data={"values": rows}, width=520, height={"step": step},
        mark={"type": "rect", "tooltip": True},
        encoding={"x": {"field": "a", "type": "quantitative", "scale": scale, "title": metric},
                  "x2": {"field": "b"},
                  "y": {"field": "layer", "type": "nominal", "sort": list(series), "title": None,
                        "axis": {"labelOverlap": "greedy", "labelFontSize": 11 if step >= 10 else 8}},
                  "color": {"field": "share", "type": "quantitative", "title": "share of the layer's units",
                            "scale": {"type": "sqrt", "scheme": "blues", "zero": True}},
                  "tooltip": [{"field": "layer"}, {"field": "a", "title": "from", "format": ".4g"},
                              {"field": "b", "title": "to", "format": ".4g"}, {"field": "n", "title": "units"},
                              {"field": "share", "title": "share", "format": ".1%"}]}), caption


def _decades(values: list[float]) -> str:
    nz = [abs(v) for v in values if v != 0]
    return f"{math.log10(max(nz) / min(nz)):.0f}"


def unit_cells(fit: list[float | None], raw: list[float | None], dead: set[int], cells: int = MAP_CELLS,
               constant: set[int] | frozenset[int] = frozenset()) -> tuple[list[dict], int]:
    """Cells of a unit map: one per unit, or per group of ``g`` consecutive units past ``cells``
    (the group's least-fit unit gives its colour and value; ``d`` counts its dead units, ``k``,
    when there are any, its constant ones)."""
    pct = percentile_fitness(fit)
    n = len(fit)
    g = max(1, math.ceil(n / cells))
    out = []
    for i, start in enumerate(range(0, n, g)):
        members = range(start, min(n, start + g))
        finite = [u for u in members if pct[u] is not None]
        worst = min(finite, key=lambda u: pct[u]) if finite else None
        out.append({"i": i, "a": start, "b": members[-1], "f": None if worst is None else _r(pct[worst], 3),
                    "v": None if worst is None else _r(raw[worst]), "d": sum(1 for u in members if u in dead)})
        k = sum(1 for u in members if u in constant)
        if k:  # absent = 0: most layers have none, and a page may hold a million cells
            out[-1]["k"] = k
    return out, g


def unit_map_chart(cells: list[dict], metric: str, group: int, legend: bool = True) -> dict:
    color = {"condition": [{"test": "datum.d > 0", "value": DEAD_COLOUR},
                           {"test": "datum.k > 0", "value": CONSTANT_COLOUR},
                           {"test": "datum.f === null", "value": "#bbbbbb"}],
             "field": "f", "type": "quantitative", "title": f"{metric} fitness (0 = least fit)",
             "scale": {"scheme": "viridis", "domain": [0, 1]}, **({} if legend else {"legend": None})}
    return _grid_chart(cells, group, color, [{"field": "v", "title": metric, "format": ".4g"},
                                             {"field": "f", "title": "fitness place", "format": ".2f"},
                                             {"field": "d", "title": "dead"}, {"field": "k", "title": "constant"}])


def constant_units(layer: dict) -> list[int]:
    """Units with the same value on every observation that are not dead: ``act_entropy`` is 0
    exactly when the unit's range is within float32 rounding (0 for no other unit), else, without
    it, ``act_var`` is 0. ``fitcli prune`` folds such a unit into its consumers' bias."""
    m, dead = layer.get("metrics") or {}, set(layer.get("dead") or [])
    probe = m.get("act_entropy") or m.get("act_var")
    if probe is None or layer.get("final"):
        return []
    return [u for u, v in enumerate(probe) if v == 0 and u not in dead]


def heads_chart(layers: list[dict], metric: str, fit: dict[str, list[float | None]]) -> dict:
    rows = []
    for lay in layers:
        pct = percentile_fitness(fit.get(lay["name"], [None] * lay["units"]))
        raw = lay["metrics"].get(metric, [None] * lay["units"])
        dead = set(lay["dead"])
        rows += [{"layer": lay["name"], "head": h, "f": _r(pct[h], 3), "v": _r(raw[h]), "d": int(h in dead)}
                 for h in range(lay["units"])]
    return _spec(
        data={"values": rows}, width={"step": 22}, height={"step": 18},
        mark={"type": "rect", "tooltip": True, "stroke": "white"},
        encoding={"x": {"field": "head", "type": "ordinal"},
                  "y": {"field": "layer", "type": "nominal", "sort": None, "title": None},
                  "color": {"condition": [{"test": "datum.d > 0", "value": "#d62728"},
                                          {"test": "datum.f === null", "value": "#bbbbbb"}],
                            "field": "f", "type": "quantitative", "title": f"{metric} fitness (0 = least fit)",
                            "scale": {"scheme": "viridis", "domain": [0, 1]}},
                  "tooltip": [{"field": "layer"}, {"field": "head"}, {"field": "v", "title": metric, "format": ".4g"},
                              {"field": "d", "title": "dead"}]})


def _normalised(vals: list[float | None]) -> list[float | None]:
    norm = math.sqrt(sum(v * v for v in vals if v is not None))
    return [None if v is None else (v / norm if norm > 0 else 0.0) for v in vals]


def validation_points(report: dict) -> tuple[dict[str, list[dict]], str, bool]:
    """Per validated metric, points (per-layer ℓ2-normalised fitness, |ablation| normalised the same
    way) for the validated units; where the ablation values came from ('' when the report has none);
    whether the points were sampled (more than SCATTER_POINTS units)."""
    from fitcli.report import direction, fitness_values

    v = report["validation"]
    by_name = {lay["name"]: lay for lay in report["layers"]}
    oracle: dict[str, tuple[list[int], list[float | None]]] = {}
    source = ""
    for name, entry in v["layers"].items():
        units = entry.get("units") or []
        if isinstance(entry.get("ablation"), list):
            oracle[name], source = (units, [None if x is None else abs(x) for x in entry["ablation"]]), "validation"
        elif "ablation" in by_name.get(name, {}).get("metrics", {}):
            full = by_name[name]["metrics"]["ablation"]
            oracle[name], source = (units, [None if full[u] is None else abs(full[u]) for u in units]), source or "metrics"
    points: dict[str, list[dict]] = {}
    sampled = False
    for metric in v["across_layers"]:
        fit = fitness_values(report["layers"], metric, direction(metric, report.get("metric_info")))
        rows = []
        for name, (units, ab) in oracle.items():
            if name not in fit:
                continue
            xs, ys = _normalised([fit[name][u] for u in units]), _normalised(ab)
            rows += [{"layer": name, "unit": u, "x": _r(x), "y": _r(y)}
                     for u, x, y in zip(units, xs, ys, strict=True) if x is not None and y is not None]
        step = max(1, math.ceil(len(rows) / SCATTER_POINTS))
        points[metric] = rows[::step]
        sampled = sampled or step > 1
    return points, source, sampled


LEGEND_LAYERS = 20  # up to this many layers a scatter plot's legend names each; past it, colour is depth


def scatter_chart(points: list[dict], metric: str, corr: dict) -> dict:
    """A metric's fitness against |ablation|, one point per validated unit, coloured by layer:
    a legend entry per layer up to LEGEND_LAYERS layers, else a colour ramp over the layers'
    order in the model (``depth``, 0 = the first)."""
    rho = corr.get("spearman")
    title = f"{metric}: Spearman {'n/a' if rho is None else f'{rho:+.2f}'} ({corr.get('units', 0)} units)"
    layers = list(dict.fromkeys(p["layer"] for p in points))
    if len(layers) <= LEGEND_LAYERS:
        color = {"field": "layer", "type": "nominal", "sort": layers,
                 "scale": {"scheme": "tableau10" if len(layers) <= 10 else "tableau20"},
                 "legend": {"title": "layer", "orient": "bottom", "columns": 2, "symbolLimit": len(layers),
                            "labelLimit": 150}}
    else:
        depth = {name: i for i, name in enumerate(layers)}
        points = [{**p, "depth": depth[p["layer"]]} for p in points]
        color = {"field": "depth", "type": "quantitative", "scale": {"scheme": "viridis"},
                 "legend": {"title": f"layer: 0 = {layers[0]}, {len(layers) - 1} = {layers[-1]}", "orient": "bottom",
                            "titleLimit": 400}}
    return _spec(
        title={"text": title, "fontSize": 12}, data={"values": points}, width=230, height=170,
        mark={"type": "point", "tooltip": True, "filled": True, "size": 28, "opacity": 0.7},
        encoding={"x": {"field": "x", "type": "quantitative", "title": f"{metric} (fitness, ℓ2-normalised)"},
                  "y": {"field": "y", "type": "quantitative", "title": "|ablation| (ℓ2-normalised)"},
                  "color": color,
                  "tooltip": [{"field": "layer"}, {"field": "unit"}, {"field": "x", "format": ".3g"},
                              {"field": "y", "format": ".3g"}]})


def correlation_chart(v: dict) -> dict:
    rows = [{"metric": m, "scope": "across layers", "rho": _r(c.get("spearman"))} for m, c in v["across_layers"].items()]
    rows += [{"metric": m, "scope": name, "rho": _r(c.get("spearman"))}
             for name, entry in v["layers"].items() for m, c in entry["metrics"].items()]
    rows = [r for r in rows if r["rho"] is not None]
    return _spec(
        data={"values": rows}, width=420, height={"step": 14},
        mark={"type": "point", "tooltip": True, "filled": True, "size": 50},
        encoding={"y": {"field": "metric", "type": "nominal", "title": None,
                        "sort": {"field": "rho", "op": "max", "order": "descending"}},
                  "x": {"field": "rho", "type": "quantitative", "title": "Spearman with exact ablation",
                        "scale": {"domain": [-1, 1]}},
                  "color": {"condition": {"test": "datum.scope === 'across layers'", "value": "#d62728"},
                            "value": "#6baed6"},
                  "size": {"condition": {"test": "datum.scope === 'across layers'", "value": 90}, "value": 40},
                  "tooltip": [{"field": "metric"}, {"field": "scope"}, {"field": "rho", "format": "+.2f"}]})


def blocks_chart(blocks: list[dict]) -> dict:
    fields = [k for k in ("block_influence", "angular_distance", "ablation", "ablation_accuracy")
              if any(b.get(k) is not None for b in blocks)]
    rows = [{"block": b["name"], **{k: _r(b.get(k)) for k in fields}} for b in blocks]
    return _spec(
        data={"values": rows}, repeat=fields, columns=2,
        spec={"width": 300, "height": {"step": 16}, "mark": {"type": "bar", "tooltip": True},
              "encoding": {"y": {"field": "block", "type": "nominal", "sort": None, "title": None},
                           "x": {"field": {"repeat": "repeat"}, "type": "quantitative"},
                           "tooltip": [{"field": "block"}, {"field": {"repeat": "repeat"}, "type": "quantitative",
                                                            "format": ".4g"}]}})


# ---- page -----------------------------------------------------------------------------------------

def _provenance(report: dict) -> list[tuple[str, str]]:
    m, d, s = report.get("model") or {}, report.get("data") or {}, report.get("settings") or {}
    rows = [("command", str(report.get("command", ""))),
            ("fitcli", f"{(report.get('tool') or {}).get('version', '')}, report created {report.get('created', '')}"),
            ("model", str(m.get("path"))), ("format", str(m.get("format"))), ("sha256", str(m.get("sha256"))),
            ("architecture", str(m.get("arch"))),
            ("data", f"{d.get('spec')} ({d.get('samples')} samples in {d.get('batches')} batches)"),
            ("discovery", str((report.get("discovery") or {}).get("method", "")))]
    for k, v in s.items():
        rows.append((f"settings.{k}", _text(v)))
    return rows


def _ranked_rows(report: dict, rank_by: str | None, metrics: list[str],
                 constant: dict[str, list[int]]) -> tuple[list[dict], int]:
    from fitcli.report import direction, rank_units

    layers = report["layers"]
    if not rank_by or not any(rank_by in lay["metrics"] for lay in layers):
        return [], 0
    include_final = report.get("command") == "ablate"
    total = sum(1 for lay in layers if rank_by in lay["metrics"] and (include_final or not lay.get("final"))
                for v in lay["metrics"][rank_by] if v is not None)
    rows = rank_units(layers, rank_by, TABLE_ROWS, direction(rank_by, report.get("metric_info")), include_final)
    by_name = {lay["name"]: lay for lay in layers}
    for i, r in enumerate(rows, 1):
        lay = by_name[r["layer"]]
        r["rank"] = i
        r["constant"] = r["unit"] in constant.get(r["layer"], ())
        r["values"] = [lay["metrics"][m][r["unit"]] if m in lay["metrics"] else None for m in metrics]
    return rows, total


def _dead_context(report: dict, charts: _Charts) -> dict[str, Any]:
    """The dead-units section: bars when some unit is dead; in words when none is (or unknown)."""
    layers, summary = report["layers"], report.get("summary") or {}
    known = summary.get("dead_known", True)
    dead = known and any(lay["dead"] for lay in layers if not lay.get("final"))
    constant = {lay["name"]: units for lay in layers if (units := constant_units(lay))}
    return {"dead_chart": charts.add(dead_fraction_chart(layers)) if dead else None,
            "no_dead": known and not dead, "constant": constant,
            "constant_count": sum(len(v) for v in constant.values())}


def _distributions(layers: list[dict], keys: list[str], charts: _Charts) -> list[tuple[str, str]]:
    """One heatmap per key metric and kind of unit (neurons and channels first)."""
    kinds = sorted({unit_kind(lay) for lay in layers}, key=lambda k: (k != NEURONS, k))
    out = []
    for metric in keys:
        for kind in kinds:
            group = [lay for lay in layers if unit_kind(lay) == kind]
            spec, caption = distribution_chart(group, metric, kind if len(kinds) > 1 else "")
            if spec:
                out.append((charts.add(spec), caption))
    return out


def _maps(report: dict, map_metric: str | None, constant: dict[str, list[int]], charts: _Charts) -> dict[str, Any]:
    from fitcli.report import direction, fitness_values

    layers = report["layers"]
    maps, grouped, heads_chart_id = [], [], None
    if map_metric:
        fit = fitness_values(layers, map_metric, direction(map_metric, report.get("metric_info")),
                             include_final=report.get("command") == "ablate")
        for lay in layers:
            if lay["name"] not in fit or entry_kind(lay).is_head:
                continue
            cells, g = unit_cells(fit[lay["name"]], lay["metrics"][map_metric], set(lay["dead"]),
                                  constant=set(constant.get(lay["name"], ())))
            maps.append({"layer": lay, "chart": charts.add(unit_map_chart(cells, map_metric, g, legend=not maps)),
                         "group": g, "constant": constant.get(lay["name"], [])})
            if g > 1:
                grouped.append(lay["name"])
        heads = [lay for lay in layers if entry_kind(lay).is_head and lay["name"] in fit]
        heads_chart_id = charts.add(heads_chart(heads, map_metric, fit)) if heads else None
    return {"map_metric": map_metric, "maps": maps, "grouped": grouped, "heads_chart": heads_chart_id}


def _audit_sections(report: dict, charts: _Charts) -> dict[str, Any]:
    layers = report["layers"]
    rank_by = report["settings"].get("rank_by")
    keys = key_metrics(report) or sorted({m for lay in layers for m in lay["metrics"]})[:3]
    ctx: dict[str, Any] = {"keys": keys, "rank_by": rank_by, **_dead_context(report, charts)}
    if report.get("command") == "ablate":
        ab = [v for lay in layers for v in (lay["metrics"].get("ablation") or []) if v is not None]
        ctx["ablated"] = {"units": len(ab), "layers": sum(1 for lay in layers if "ablation" in lay["metrics"]),
                          "removable": sum(len(lay.get("removable") or []) for lay in layers)}
    ctx["distributions"] = _distributions(layers, keys, charts)
    map_metric = rank_by if any(rank_by in lay["metrics"] for lay in layers) else (keys[0] if keys else None)
    ctx.update(_maps(report, map_metric, ctx["constant"], charts))
    ctx["rows"], ctx["total_units"] = _ranked_rows(report, rank_by, keys, ctx["constant"])
    ctx["redundancy"] = redundancy_context(layers, charts)
    ctx["validation"] = _validation_context(report, charts) if report.get("validation") else None
    return ctx


REBUILT = 0.99  # R² from which the redundancy section counts a unit as rebuilt by the rest of its layer


def redundancy_rows(layers: list[dict]) -> list[dict]:
    """Per layer with ``redundancy`` values: its units, the mean R², how many units the other units
    rebuild (R² ≥ REBUILT) and the most redundant unit."""
    rows = []
    for lay in layers:
        vals = lay["metrics"].get("redundancy")
        if vals is None:
            continue
        finite = [(v, u) for u, v in enumerate(vals) if v is not None]
        top = max(finite) if finite else (None, None)
        rows.append({"layer": lay["name"], "units": lay["units"], "finite": len(finite),
                     "mean": sum(v for v, _ in finite) / len(finite) if finite else None,
                     "rebuilt": sum(1 for v, _ in finite if v >= REBUILT), "top_unit": top[1], "top": top[0]})
    return rows


def redundancy_context(layers: list[dict], charts: _Charts) -> dict[str, Any] | None:
    """The redundancy section (only when the metric was computed): the distribution of R² per layer
    and a row per layer."""
    rows = redundancy_rows(layers)
    if not rows:
        return None
    return {"rows": rows, "threshold": REBUILT,
            "charts": _distributions([lay for lay in layers if "redundancy" in lay["metrics"]], ["redundancy"], charts)}


def _validation_context(report: dict, charts: _Charts) -> dict[str, Any]:
    v = report["validation"]
    points, source, sampled = validation_points(report)
    scatters = [charts.add(scatter_chart(pts, m, v["across_layers"][m]))
                for m, pts in sorted(points.items(), key=lambda kv: -(v["across_layers"][kv[0]].get("spearman") or -2))
                if pts]
    kinds, kind_rows = kind_validation_rows(v)
    return {"v": v, "scatters": scatters, "source": source,
            "corr_chart": charts.add(correlation_chart(v)) if v["layers"] else None,
            "capped": sampled, "kinds": kinds, "kind_rows": kind_rows}


COMPARE_SCHEMA = "fitcli.compare/1"


def file_name(path: Any) -> str:
    """What the page calls a model: the checkpoint's file (or folder) name, not the local path
    it was read from (that path is in the provenance table)."""
    text = str(path or "").rstrip("/\\")
    return text.replace("\\", "/").rsplit("/", 1)[-1] or "model"


def render_html(data: dict) -> str:
    """The page for a report dict (``AuditReport.to_dict()``, a block report, or a comparison)."""
    charts = _Charts()
    report = data
    env = _template()
    common = {"r": data, "css": _asset("report.css"), "js": _asset("report.js"), "vega": vega_bundle(),
              "limits": {"cells": MAP_CELLS, "table": TABLE_ROWS, "scatter": SCATTER_POINTS},
              "name": file_name((data.get("model") or {}).get("path")),
              "names": [file_name(((data.get(side) or {}).get("model") or {}).get("path")) for side in ("base", "new")]}
    if data.get("schema") == COMPARE_SCHEMA:
        from fitcli.render.html_compare import compare_context

        cmp = compare_context(data, charts)
        return env.get_template("compare.html.j2").render(**common, **cmp, charts_json=script_json(charts.specs))
    ctx: dict[str, Any] = {"coverage": coverage_line(report) if report.get("layers") else "",
                           "provenance": _provenance(report), "kind": "audit"}
    if report.get("command") == "blocks":
        ctx["kind"] = "blocks"
        ctx["blocks_chart"] = charts.add(blocks_chart(report.get("blocks") or []))
    else:
        ctx.update(_audit_sections(report, charts))
    return env.get_template("report.html.j2").render(**common, **ctx, charts_json=script_json(charts.specs))
