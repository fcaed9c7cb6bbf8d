"""The HTML report (``--format html``, ``fitcli render``): one offline page per report.

Each sample model's report (with ``--validate``), an ``ablate`` report, a block report and a
report with attention heads are rendered once. The page is parsed (every section there, no
external URL in any src/href, the chart data checked against values worked out here from the
report and from ``truth.json``), then loaded in headless Chromium with the network cut off: no
console error, every chart drawn, a screenshot under ``build/html/``. Where Chromium is missing,
the browser test says so and checks by parsing only.
"""

from __future__ import annotations

import html
import importlib.util
import json
import math
import re
import sys
import warnings
from html.parser import HTMLParser
from pathlib import Path

import pytest

import fitcli
from fitcli.render import html as H

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build" / "html"
SAMPLES = ("mlp", "cnn", "resmlp")
AUDIT_SECTIONS = {"summary", "dead-fraction", "distributions", "unit-map", "ranked", "provenance"}
METRICS = ["taylor", "act_mean", "weight_norm", "apoz", "dormant", "act_entropy", "ablation"]


class Page(HTMLParser):
    """Sections, every src/href, the chart placeholders, the charts' JSON and the ranked table."""

    def __init__(self, text: str):
        super().__init__()
        self.ids: set[str] = set()
        self.sections: list[str] = []
        self.links: list[tuple[str, str, str]] = []
        self.tags: list[str] = []
        self.chart_divs: list[str] = []
        self.rows: list[dict] = []
        self._script_id: str | None = None
        self._json = ""
        self._cell: list | None = None
        self._row: dict | None = None
        self.feed(text)
        self.charts = json.loads(self._json)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "section":
            self.sections.append(a.get("id"))
        for k in ("src", "href", "action", "data"):
            if a.get(k) is not None:
                self.links.append((tag, k, a[k]))
        if a.get("data-chart") is not None:
            self.chart_divs.append(a["data-chart"])
        if tag == "script":
            self._script_id = a.get("id")
        if tag == "table" and a.get("id") == "ranked-table":
            self._in_table = True
        if tag == "tr" and self._in_table:
            self._row = {"cells": [], "class": a.get("class") or "", "style": a.get("style") or ""}
        if tag == "td" and self._row is not None:
            self._cell = [a.get("data-v"), ""]

    _in_table = False

    def handle_endtag(self, tag):
        if tag == "script":
            self._script_id = None
        if tag == "td" and self._cell is not None:
            self._row["cells"].append(tuple(self._cell))
            self._cell = None
        if tag == "tr" and self._row is not None:
            if self._row["cells"]:
                self.rows.append(self._row)
            self._row = None
        if tag == "table":
            self._in_table = False

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)

    def handle_data(self, data):
        if self._script_id == "fitcli-charts":
            self._json += data
        if self._cell is not None:
            self._cell[1] += data


def table(page: Page) -> list[dict]:
    """Ranked-table rows: rank, layer, unit, dead, the key metrics' data-v, normalised."""
    out = []
    for r in page.rows:
        c = r["cells"]
        out.append({"rank": int(c[0][0]), "layer": c[1][1], "unit": int(c[2][0]), "dead": c[3][1] == "dead",
                    "state": c[3][1],
                    "normalized": float(c[-1][0]), "values": [None if v == "" else float(v) for v, _ in c[4:-1]],
                    "hidden": "display: none" in r["style"]})
    return out


def check_offline_and_sections(text: str, sections: set[str]) -> Page:
    page = Page(text)
    assert sections <= set(page.sections), f"missing sections: {sections - set(page.sections)}"
    external = [(t, k, v) for t, k, v in page.links if not v.startswith("#")]
    assert external == [], f"external or file references: {external}"
    assert "link" not in page.tags and "iframe" not in page.tags and "img" not in page.tags
    assert not re.search(r"<script[^>]*\ssrc=", text)
    assert page.chart_divs and set(page.chart_divs) == set(page.charts)
    return page


def _sample_paths(name: str, truth: dict) -> tuple[str, str, str]:
    """Checkpoint, --arch spec and data of a sample model, as absolute paths."""
    t = truth[name]
    file, _, attr = t["arch"].rpartition(":")
    return str(REPO / t["checkpoint"]), f"{REPO / file}:{attr}", str(REPO / t["data"])


def _sample(name: str, truth: dict):
    """Checkpoint, the architecture callable and data of a sample model (library arguments)."""
    from fitcli.loading import resolve_callable

    ckpt, arch, data = _sample_paths(name, truth)
    return ckpt, resolve_callable(arch, "arch"), data


def _heads_report(layers=("embed", "attn.heads", "head")) -> dict:
    """The nn.MultiheadAttention model of test_heads.py: head 1's values are 0, so it is dead."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_heads import _mha

    m, data, *_ = _mha()
    return fitcli.audit(m, data, device="cpu", layers=list(layers)).to_dict()


WIDE_LAYERS = [f"encoder.layer.{i}.{part}" for i in range(6)
               for part in ("attention.self.query", "attention.self.key", "attention.self.value",
                            "attention.output.dense", "intermediate.dense", "output.dense")] + ["pooler.dense"]
WIDE_METRICS = {"taylor": (30, True), "act_mean": (20, True), "apoz": (10, False)}


def wide_report(units: int = 16) -> dict:
    """A MiniLM-shaped report: 37 layers, no dead unit, values drawn here (linear axes)."""
    import random

    rng = random.Random(3)
    layers = []
    for name in WIDE_LAYERS:
        metrics = {"taylor": [rng.uniform(0.01, 0.2) for _ in range(units)],
                   "act_mean": [rng.uniform(1.0, 2.0) for _ in range(units)],
                   "apoz": [rng.uniform(0.1, 0.9) for _ in range(units)]}
        layers.append({"name": name, "type": "Linear", "units": units, "activation_point": name,
                       "activation_point_kind": "module", "final": False, "metrics": metrics, "aggregate": {},
                       "nonfinite": [], "dead": [], "dead_fraction": 0.0})
    n = units * len(layers)
    return {"schema": "fitcli.report/1", "tool": {"name": "fitcli", "version": "t"}, "created": "", "command": "score",
            "model": {"path": "/home/someone/models/all-MiniLM-L6-v2/", "format": "hf", "sha256": "ab" * 32},
            "data": {"spec": "tokens.safetensors", "samples": 64, "batches": 2},
            "settings": {"tau": 0.0, "rank_by": "taylor", "metrics": sorted(WIDE_METRICS)}, "layers": layers,
            "summary": {"layers": len(layers), "units": n, "dead": 0, "dead_fraction": 0.0, "dead_known": True},
            "skipped": [], "metric_info": {m: {"rank_priority": p, "higher_is_better": hib, "marks_dead": False}
                                           for m, (p, hib) in WIDE_METRICS.items()}}


@pytest.fixture(scope="module")
def truth() -> dict:
    return json.loads((REPO / "sample_models" / "truth.json").read_text())


@pytest.fixture(scope="module")
def reports(truth) -> dict[str, dict]:
    out = {}
    for name in SAMPLES:  # validated against exact ablation (the ablation metric too) but the resmlp
        ckpt, arch, data = _sample(name, truth)
        v = name != "resmlp"
        kinds = ["mlp", "rows"] if name == "resmlp" else None  # a transformer: every layer is its MLP channels and rows
        out[name] = fitcli.audit(ckpt, data, arch=arch, metrics=METRICS if v else METRICS[:-1], validate=v,
                                 device="cpu", max_batches=2, kinds=kinds).to_dict()
    ckpt, arch, data = _sample("mlp", truth)
    out["ablate"] = fitcli.ablate(ckpt, data, arch=arch, layers=["fc2"], device="cpu", max_batches=2).to_dict()
    out["ablate_units"] = fitcli.ablate(ckpt, data, arch=arch, layers=["fc2"], units=[0, 5, 9], device="cpu",
                                        max_batches=2).to_dict()
    out["no_data"] = fitcli.audit(ckpt, None, arch=arch, device="cpu").to_dict()  # weight metrics only
    ckpt, arch, data = _sample("resmlp", truth)
    out["blocks"] = fitcli.blocks(ckpt, data, arch=arch, greedy=2, device="cpu", max_batches=2).to_dict()
    out["heads"] = _heads_report()
    out["heads_only"] = _heads_report(["attn.heads"])
    out["wide"] = wide_report()
    out["compare"] = _compare_report(out["mlp"])
    return out


def changed_copy(rep: dict) -> dict:
    """The report with fc1's units 0 and 9 dead (their activations zeroed) and unit 17 alive again."""
    new = json.loads(json.dumps(rep))
    lay = new["layers"][0]
    for u in (0, 9):
        for m in ("dormant", "act_mean", "taylor"):
            lay["metrics"][m][u] = 0.0
    lay["dead"] = [3, 0, 9]
    lay["dead"].sort()
    lay["dead_fraction"] = 3 / 32
    return new


def _compare_report(base: dict) -> dict:
    from fitcli.comparison import compare

    return compare(base, changed_copy(base), max_new_dead=1).to_dict()


@pytest.fixture(scope="module")
def pages(reports) -> dict[str, Path]:
    """Each report's page, written once under build/html/."""
    BUILD.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, rep in reports.items():
        p = BUILD / f"{name}.html"
        p.write_text(H.render_html(rep), encoding="utf-8")
        out[name] = p
    return out


def expected_sections(name: str, report: dict) -> set[str]:
    if name == "compare":
        return {"summary", "dead-fraction", "unit-map", "drifts", "provenance"}
    if name == "blocks":
        return {"summary", "blocks", "provenance"}
    s = set(AUDIT_SECTIONS)
    if all(lay["activation_point_kind"] == "heads" for lay in report["layers"]):
        s.remove("unit-map")  # no unit map to draw: the heads have their own grid
    if report.get("validation"):
        s.add("validation")
    if any(lay["activation_point_kind"] == "heads" for lay in report["layers"]):
        s.add("heads")
    return s


def test_every_page_is_offline_with_its_sections(pages, reports):
    for name, path in pages.items():
        text = path.read_text()
        page = check_offline_and_sections(text, expected_sections(name, reports[name]))
        assert set(page.sections) == expected_sections(name, reports[name]), name  # no empty section either
        # the provenance: the model's hash, the data and every setting
        rep = reports[name] if name != "compare" else reports["compare"]["new"]
        assert rep["model"]["sha256"] in text and html.escape(str(rep["data"]["spec"])) in text
        for k in rep["settings"]:
            assert f"settings.{k}" in text
        assert len(path.read_bytes()) < 2_000_000, name  # the runtime (~0.9 MB) and a small report
        assert page.ids >= {"gate", "fitcli-charts"}


@pytest.mark.parametrize("name", SAMPLES)
def test_dead_units_in_every_view(name, pages, reports, truth):
    """Planted dead units (truth.json) in the bars, the unit maps and the ranked table."""
    page = Page(pages[name].read_text())
    t, rep = truth[name], reports[name]
    dead_truth = {layer: set(units) for layer, units in t["dead"].items()}
    bars = next(s for s in page.charts.values() if s.get("encoding", {}).get("x", {}).get("field") == "fraction")
    got = {r["layer"]: r for r in bars["data"]["values"]}
    assert set(got) == set(dead_truth)  # every non-final layer, no final layer
    for layer, dead in dead_truth.items():
        assert got[layer]["dead"] == len(dead) and got[layer]["units"] == t["layers"][layer]
        assert got[layer]["fraction"] == pytest.approx(len(dead) / t["layers"][layer], rel=1e-3)
    maps = [s for s in page.charts.values() if s.get("mark", {}).get("type") == "rect"
            and "transform" in s]
    assert len(maps) == len(dead_truth)
    for spec, (layer, dead) in zip(maps, dead_truth.items(), strict=True):
        cells = spec["data"]["values"]
        assert len(cells) == t["layers"][layer] and [c["a"] for c in cells] == list(range(len(cells)))
        assert {c["a"] for c in cells if c["d"]} == dead
        for c in cells:  # a dead unit has taylor 0: the least fit of its layer
            if c["a"] in dead:
                assert c["f"] == 0 and c["v"] == 0
    rows = table(page)
    assert len(rows) == sum(t["layers"][lay] for lay in dead_truth)  # every non-final unit
    assert {(r["layer"], r["unit"]) for r in rows if r["dead"]} == {(lay, u) for lay, d in dead_truth.items() for u in d}
    n_dead = sum(len(d) for d in dead_truth.values())
    assert all(r["dead"] for r in rows[:n_dead])  # dead first
    # the order: taylor / (ℓ2 norm of the layer's taylor), ascending, worked out here
    norm = {lay["name"]: math.sqrt(sum(v * v for v in lay["metrics"]["taylor"])) for lay in rep["layers"]}
    by = {lay["name"]: lay for lay in rep["layers"]}
    for r in rows:
        assert r["normalized"] == pytest.approx(by[r["layer"]]["metrics"]["taylor"][r["unit"]] / norm[r["layer"]], rel=1e-9, abs=1e-12)
    assert [r["normalized"] for r in rows] == sorted(r["normalized"] for r in rows)
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))


def distributions(page: Page) -> list[dict]:
    return [s for s in page.charts.values() if (s.get("usermeta") or {}).get("chart") == "distribution"]


def test_distributions_count_every_unit(pages, reports):
    """One heatmap per key metric: a row per layer, in the report's order; each layer's counts add
    up to its finite values, and each share is the count over them."""
    page = Page(pages["cnn"].read_text())
    rep = reports["cnn"]
    maps = distributions(page)
    assert len(maps) == 3 and not [s for s in page.charts.values() if "facet" in s]
    for spec in maps:
        metric = spec["usermeta"]["metric"]
        assert spec["encoding"]["y"]["sort"] == [lay["name"] for lay in rep["layers"]]
        rows = spec["data"]["values"]
        lo, hi = min(r["a"] for r in rows), max(r["b"] for r in rows)
        for lay in rep["layers"]:
            values = [v for v in lay["metrics"][metric] if v is not None]
            mine = [r for r in rows if r["layer"] == lay["name"]]
            assert sum(r["n"] for r in mine) == len(values), (metric, lay["name"])
            for r in mine:
                assert r["a"] <= r["b"] and r["n"] > 0
                assert r["share"] == pytest.approx(r["n"] / len(values), rel=1e-3)
            assert lo <= min(values) * (1 + 1e-5) + 1e-9 and hi >= max(values) * (1 - 1e-5) - 1e-9


def test_histogram_bins_and_log_axis():
    # linear: [0, 4] in 4 bins of width 1; the top value goes in the last bin
    assert H.histogram([0.0, 0.5, 1.0, 3.9, 4.0], 0.0, 4.0, 4, None) == [(0.0, 1.0, 2), (1.0, 2.0, 1), (3.0, 4.0, 2)]
    # symlog with constant 1: t = log1p(v); 0..(e^2 - 1) in 2 bins splits at e - 1
    bins = H.histogram([0.0, 1.0, 2.0, 6.0], 0.0, math.e ** 2 - 1, 2, 1.0)
    assert [n for _, _, n in bins] == [2, 2] and bins[0][1] == pytest.approx(math.e - 1)
    assert H._symlog_constant([0.0, 1e-6, 1e-3, 1.0, 100.0]) is not None  # 8 decades
    assert H._symlog_constant([0.0, 1.0, 2.0, 900.0]) is None  # under 3 decades: linear
    layers = [{"name": "a", "units": 4, "final": False, "metrics": {"m": [0.0, 1e-6, 1e-2, 10.0]}},
              {"name": "b", "units": 2, "final": False, "metrics": {"m": [None, 5.0]}}]
    spec, caption = H.distribution_chart(layers, "m")
    assert spec["encoding"]["x"]["scale"]["type"] == "symlog" and "7 decades" in caption
    assert sum(r["n"] for r in spec["data"]["values"] if r["layer"] == "b") == 1  # the null is left out
    layers[0]["metrics"]["m"] = [1.0, 2.0, 3.0, 4.0]
    assert H.distribution_chart(layers, "m")[0]["encoding"]["x"]["scale"]["type"] == "linear"


def test_validation_scatter_against_exact_ablation(pages, reports):
    """x: the metric as fitness / ℓ2 norm over the layer's validated units; y: |ablation| the same way."""
    rep = reports["cnn"]
    page = Page(pages["cnn"].read_text())
    v = rep["validation"]
    scatters = {s["title"]["text"].split(":")[0]: s for s in page.charts.values() if s.get("mark", {}).get("type") == "point"
                and "title" in s}
    assert set(scatters) == set(v["across_layers"])  # one per validated metric
    by = {lay["name"]: lay for lay in rep["layers"]}
    for metric in ("taylor", "apoz"):
        spec = scatters[metric]
        rho = v["across_layers"][metric]["spearman"]
        assert f"Spearman {rho:+.2f}" in spec["title"]["text"]
        pts = {(p["layer"], p["unit"]): p for p in spec["data"]["values"]}
        top = max(x for lay in rep["layers"] if not lay["final"] for x in lay["metrics"]["apoz"])
        for name, entry in v["layers"].items():
            units = entry["units"]
            raw = by[name]["metrics"][metric]
            fit = [raw[u] if metric == "taylor" else top - raw[u] for u in units]  # APoZ: lower is fit
            ab = [abs(by[name]["metrics"]["ablation"][u]) for u in units]
            nf, na = math.sqrt(sum(x * x for x in fit)), math.sqrt(sum(x * x for x in ab))
            for u, f, a in zip(units, fit, ab, strict=True):
                p = pts[(name, u)]
                assert p["x"] == pytest.approx(f / nf, rel=1e-3, abs=1e-9)
                assert p["y"] == pytest.approx(a / na, rel=1e-3, abs=1e-9)


def test_validation_without_unit_ablation_says_so(reports):
    rep = json.loads(json.dumps(reports["cnn"]))
    for lay in rep["layers"]:
        lay["metrics"].pop("ablation", None)
    for v in rep["validation"]["layers"].values():  # as in a report from before the values were kept
        v.pop("ablation", None)
    text = H.render_html(rep)
    page = check_offline_and_sections(text, AUDIT_SECTIONS | {"validation"})
    assert "no-scatter" in page.ids
    assert not [s for s in page.charts.values() if "title" in s]


def test_validation_values_from_the_validation_block(reports):
    """Per-unit ablation values stored with the validation (``validation.layers[L].ablation``)."""
    rep = json.loads(json.dumps(reports["mlp"]))
    for lay in rep["layers"]:
        full = lay["metrics"].pop("ablation", None)
        if lay["name"] in rep["validation"]["layers"]:
            units = rep["validation"]["layers"][lay["name"]]["units"]
            rep["validation"]["layers"][lay["name"]]["ablation"] = [full[u] for u in units]
    page = Page(H.render_html(rep))
    taylor = next(s for s in page.charts.values() if s.get("title", {}).get("text", "").startswith("taylor:"))
    lay = next(x for x in rep["layers"] if x["name"] == "fc1")
    units = rep["validation"]["layers"]["fc1"]["units"]
    ab = [abs(x) for x in rep["validation"]["layers"]["fc1"]["ablation"]]
    na = math.sqrt(sum(a * a for a in ab))
    pts = {p["unit"]: p["y"] for p in taylor["data"]["values"] if p["layer"] == "fc1"}
    assert len(pts) == len(units) and lay["units"] == len(units)
    for u, a in zip(units, ab, strict=True):
        assert pts[u] == pytest.approx(a / na, rel=1e-3, abs=1e-9)


def test_heads_and_blocks(pages, reports):
    page = Page(pages["heads"].read_text())
    heads = next(s for s in page.charts.values() if s.get("encoding", {}).get("x", {}).get("field") == "head")
    rows = heads["data"]["values"]
    assert [(r["layer"], r["head"]) for r in rows] == [("attn.heads", h) for h in range(4)]
    assert [r["head"] for r in rows if r["d"]] == [1]  # the head planted dead
    blocks = Page(pages["blocks"].read_text())
    spec = next(iter(blocks.charts.values()))
    assert [r["block"] for r in spec["data"]["values"]] == ["blocks.0", "blocks.1"]
    for r, b in zip(spec["data"]["values"], reports["blocks"]["blocks"], strict=True):
        assert r["ablation"] == pytest.approx(b["ablation"], rel=1e-3)
    text = pages["blocks"].read_text()
    assert "Greedy removal" in text and text.count("<tr>") >= 2 + 2  # two greedy steps, two measures


def test_ablate_page_ranks_by_loss_change(pages, reports):
    rep = reports["ablate"]
    rows = table(Page(pages["ablate"].read_text()))
    fc2 = next(lay for lay in rep["layers"] if lay["name"] == "fc2")
    assert len(rows) == fc2["units"]
    assert [r["values"][0] for r in rows] == pytest.approx(sorted(fc2["metrics"]["ablation"]), rel=1e-9)
    # planted dead units of fc2 change nothing when ablated: they are among the first
    assert {5, 20} <= {r["unit"] for r in rows[:4]}
    removable = [u for u, v in enumerate(fc2["metrics"]["ablation"]) if abs(v) <= 1e-6]
    assert {5, 20} <= set(removable)
    assert f"{len(removable)} of 32 ablated units removable" in pages["ablate"].read_text()


def test_partial_ablation_and_weights_only_reports(pages, reports):
    """Units not ablated are null: left out of the table and the histograms, grey in the map.
    Without data, dead units are unknown and the page says so."""
    page = Page(pages["ablate_units"].read_text())
    assert sorted(r["unit"] for r in table(page)) == [0, 5, 9]
    cells = next(s for s in page.charts.values() if "transform" in s)["data"]["values"]
    assert len(cells) == 32 and sorted(c["a"] for c in cells if c["f"] is not None) == [0, 5, 9]
    (hist,) = distributions(page)
    assert sum(r["n"] for r in hist["data"]["values"]) == 3
    assert "dead-unknown" in page.ids
    text = pages["no_data"].read_text()
    assert "dead units could not be decided" in text and "dead-unknown" in Page(text).ids
    assert reports["no_data"]["summary"]["dead_known"] is False
    rows = table(Page(text))
    assert rows and not any(r["dead"] for r in rows)


def test_big_layers_are_binned_and_the_page_says_so():
    n = 3000
    dead = {7, 1500, 2999}
    fit = [None if u == 10 else float(u % 97) + (0 if u not in dead else -100) for u in range(n)]
    cells, g = H.unit_cells(fit, fit, dead)
    assert g == 3 and len(cells) == 1000  # ceil(3000 / 1024) units per cell
    assert {c["a"] for c in cells if c["d"]} == {6, 1500, 2997}
    c = cells[2]  # units 6, 7, 8: unit 7 is dead and the least fit of all
    assert c["v"] == -93.0 and c["f"] == 0.0
    c = cells[3]  # units 9, 10, 11: 10 has no value; 9 (9) is less fit than 11 (11)
    assert c["v"] == 9.0
    layer = {"name": "big", "type": "Linear", "units": n, "activation_point": "big", "activation_point_kind": "module",
             "final": False, "metrics": {"taylor": [abs(x) if x is not None else None for x in fit]},
             "aggregate": {}, "nonfinite": [10], "dead": sorted(dead), "dead_fraction": len(dead) / n}
    rep = {"schema": "fitcli.report/1", "tool": {"name": "fitcli", "version": "t"}, "created": "", "command": "score",
           "model": {"path": "m.pt"}, "data": {"spec": None, "samples": 0, "batches": 0},
           "settings": {"tau": 0.0, "rank_by": "taylor", "metrics": ["taylor"]}, "layers": [layer],
           "summary": {"layers": 1, "units": n, "dead": 3, "dead_fraction": 0.001, "dead_known": True}, "skipped": []}
    text = H.render_html(rep)
    page = check_offline_and_sections(text, AUDIT_SECTIONS)
    assert "binned-maps" in page.ids and "3 units per cell" in text
    assert len(table(page)) == H.TABLE_ROWS and f"Showing the {H.TABLE_ROWS} least-fit of {n - 1} units" in text


def test_resnet50_sized_report_stays_under_5_mb():
    spec = importlib.util.spec_from_file_location("html_size", REPO / "bench" / "html_size.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rep = bench.synthetic_report()
    assert sum(lay["units"] for lay in rep["layers"]) > 26_000 and len(rep["layers"]) == 54
    text = H.render_html(rep)
    size = len(text.encode("utf-8"))
    assert size < 5 * 1024 * 1024
    page = check_offline_and_sections(text, AUDIT_SECTIONS | {"validation"})
    assert "binned-maps" in page.ids  # the 2048-channel layers are binned
    maps = [s for s in page.charts.values() if "transform" in s]
    assert max(len(s["data"]["values"]) for s in maps) <= H.MAP_CELLS


def test_text_is_escaped():
    rep = {"schema": "fitcli.report/1", "tool": {"name": "fitcli", "version": "t"}, "created": "", "command": "score",
           "model": {"path": "<script>alert(1)</script>.pt"}, "data": {"spec": "a&b", "samples": 1, "batches": 1},
           "settings": {"tau": 0.0, "rank_by": "taylor", "metrics": ["taylor"]},
           "layers": [{"name": "</script><b>x", "type": "Linear", "units": 2, "activation_point": "p",
                       "activation_point_kind": "module", "final": False, "metrics": {"taylor": [0.0, 1.0]},
                       "aggregate": {}, "nonfinite": [], "dead": [0], "dead_fraction": 0.5}],
           "summary": {"layers": 1, "units": 2, "dead": 1, "dead_fraction": 0.5, "dead_known": True}, "skipped": []}
    text = H.render_html(rep)
    assert "<script>alert(1)" not in text and "</script><b>x" not in text
    page = check_offline_and_sections(text, AUDIT_SECTIONS)
    assert any(r["layer"] == "</script><b>x" for r in table(page))  # the JSON and the table read back intact
    assert "</script><b>x" in json.dumps(page.charts)


def test_cli_score_ablate_and_render(run_cli, tmp_path, truth):
    ckpt, arch, data = _sample_paths("mlp", truth)
    before = (REPO / truth["mlp"]["checkpoint"]).read_bytes()
    out = tmp_path / "score.html"
    r = run_cli(["score", ckpt, "--arch", arch, "--data", data, "--format", "html", "-o", out, "--max-dead", "1", "-q",
                 "--max-batches", "2"])
    assert r.code == 1 and r.stdout == ""  # 4 of 64 dead > 1 %: the gate fails; the page is written anyway
    text = out.read_text()
    check_offline_and_sections(text, AUDIT_SECTIONS)
    assert "FAILED" in text and "4 of 64 units dead" in text
    out = tmp_path / "ablate.html"
    r = run_cli(["ablate", ckpt, "--arch", arch, "--data", data, "--layer", "fc2", "--format", "html", "-o", out, "-q",
                 "--max-batches", "2"])
    assert r.code == 0, r.stderr
    assert {5, 20} <= {x["unit"] for x in table(Page(out.read_text()))[:4]}
    rep = tmp_path / "r.json"
    assert run_cli(["score", ckpt, "--arch", arch, "--data", data, "-o", rep, "-q", "--format", "json",
                    "--max-batches", "2"]).code == 0
    saved = rep.read_bytes()
    r = run_cli(["render", rep, "-o", tmp_path / "r.html"])
    assert r.code == 0 and r.stdout == ""
    check_offline_and_sections((tmp_path / "r.html").read_text(), AUDIT_SECTIONS)
    r = run_cli(["render", rep])  # html to stdout by default
    assert r.code == 0 and r.stdout.startswith("<!DOCTYPE html>")
    r = run_cli(["render", rep, "--format", "markdown"])
    assert r.code == 0 and "**4 of 64 units dead (6.2%)**" in r.stdout
    r = run_cli(["render", rep, "--format", "csv"])
    assert r.code == 0 and len(r.stdout.splitlines()) == 1 + 32 + 32 + 4  # header + every unit
    r = run_cli(["render", rep, "-o", rep])
    assert r.code == 2 and "one of the inputs" in r.stderr and rep.read_bytes() == saved
    assert run_cli(["render", rep, "--format", "json"]).code == 2
    assert run_cli(["render", tmp_path / "missing.json"]).code == 3
    (tmp_path / "bad.json").write_text('{"schema": "something/else"}')
    assert run_cli(["render", tmp_path / "bad.json"]).code == 3
    assert (REPO / truth["mlp"]["checkpoint"]).read_bytes() == before


def test_pages_in_headless_chromium(pages, reports):
    """No console error, every chart drawn (#all), a screenshot per page; the table's sort and
    filter applied from the address. Without Chromium: says so, and checks by parsing."""
    browser = H.find_chromium()
    if browser is None:
        msg = ("Chromium not found (looked for " + ", ".join(H.BROWSERS) + "; `apt-get install "
               "chromium-headless-shell` or `make test` as root installs it): pages checked by parsing only")
        print(msg)
        warnings.warn(msg, stacklevel=1)
        for name, path in pages.items():
            check_offline_and_sections(path.read_text(), expected_sections(name, reports[name]))
        return
    from concurrent.futures import ThreadPoolExecutor

    def load(name: str) -> dict:
        shot = BUILD / f"{name}.png"
        shot.unlink(missing_ok=True)
        return H.browser_check(str(pages[name]), browser, screenshot=str(shot))

    with ThreadPoolExecutor(max_workers=3) as pool:  # a few browsers at once: most of a launch is waiting
        results = dict(zip(pages, pool.map(load, pages), strict=True))
    for name, path in pages.items():
        shot, r = BUILD / f"{name}.png", results[name]
        assert r["errors"] == [] and r["warnings"] == [], (name, r["errors"], r["warnings"])
        n = len(Page(path.read_text()).chart_divs)
        assert r["charts"] == n and r["rendered"] == n, (name, r["rendered"], n)
        assert r["dom"].count('data-state="done"') == n and r["dom"].count("<canvas") >= n
        head = shot.read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(head[16:20], "big") == 1280, name
    # the table sorted by unit, descending, and filtered to conv2, from the address
    r = H.browser_check(str(pages["cnn"]), browser, fragment="sort=-unit&filter=conv2")
    assert r["errors"] == []
    rows = table(Page(r["dom"]))
    shown = [(x["layer"], x["unit"]) for x in rows if not x["hidden"]]
    assert shown == [("conv2", u) for u in range(15, -1, -1)]
    assert len(rows) == 40


def test_compare_page(pages, reports, truth, run_cli, tmp_path):
    """Died, revived and still-dead units (planted here) in the unit-change maps; drifts sorted."""
    page = Page(pages["compare"].read_text())
    text = pages["compare"].read_text()
    assert "2 of 64 compared units died" in text and "FAILED" in text
    maps = [s for s in page.charts.values() if "transform" in s]
    assert len(maps) == 2  # fc1, fc2 (the final layer has no dead units to compare)
    states = [{c["a"]: c["s"] for c in s["data"]["values"]} for s in maps]
    fc1 = {u: "alive" for u in range(32)} | {0: "died", 9: "died", 17: "revived", 3: "dead"}
    fc2 = {u: "alive" for u in range(32)} | {u: "dead" for u in truth["mlp"]["dead"]["fc2"]}
    assert states == [fc1, fc2]
    drifts = [(lay["name"], m, d["unit"], d["drift"]) for lay in reports["compare"]["layers"]
              for m, ds in lay["drifts"].items() for d in ds]
    rows = table(page)
    assert len(rows) == len(drifts)
    got = [float(r["cells"][-1][0]) for r in page.rows]
    assert got == sorted((d for *_, d in drifts), reverse=True)
    # through the command line: compare two saved reports to a page, and render the saved comparison
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(reports["mlp"]))
    b.write_text(json.dumps(changed_copy(reports["mlp"])))
    r = run_cli(["compare", a, b, "--max-new-dead", "1", "--format", "html", "-o", tmp_path / "c.html", "-q"])
    assert r.code == 1, r.stderr  # the gate: 2 of 64 died > 1 %
    check_offline_and_sections((tmp_path / "c.html").read_text(), expected_sections("compare", {}))
    r = run_cli(["compare", a, b, "--format", "json", "-o", tmp_path / "c.json", "-q"])
    assert r.code == 0, r.stderr
    r = run_cli(["render", tmp_path / "c.json", "-o", tmp_path / "c2.html"])
    assert r.code == 0, r.stderr
    check_offline_and_sections((tmp_path / "c2.html").read_text(), expected_sections("compare", {}))
    assert run_cli(["render", tmp_path / "c.json", "--format", "csv"]).code == 2


def test_without_the_html_extra_the_error_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "vl_convert", None)  # import fails as if not installed
    H.vega_bundle.cache_clear()
    try:
        with pytest.raises(fitcli.errors.UsageError, match=r"pip install 'fitcli\[html\]'"):
            H.vega_bundle()
    finally:
        monkeypatch.undo()
        H.vega_bundle.cache_clear()


def test_title_names_the_checkpoint_not_its_local_path(pages, reports):
    for name, path in pages.items():
        text = path.read_text()
        title = html.unescape(re.search(r"<title>(.*?)</title>", text, re.S).group(1))
        heading = re.search(r"<h1>(.*?)</h1>", text, re.S).group(1)
        if name == "compare":
            base, new = (reports[name][side]["model"]["path"] for side in ("base", "new"))
            want = f"fitcli compare: {Path(base).name} → {Path(new).name}"
        else:
            rep = reports[name]
            want = f"fitcli {rep.get('command', 'report')}: {Path(rep['model']['path'].rstrip('/')).name}"
        assert title == want, (name, title)
        assert str(REPO) not in title and str(REPO) not in heading and "/home/someone" not in title + heading
    assert "all-MiniLM-L6-v2" in re.search(r"<title>(.*?)</title>", pages["wide"].read_text()).group(1)
    assert html.escape(reports["mlp"]["model"]["path"]) in pages["mlp"].read_text()  # the path: provenance


def test_scatter_plots_have_a_layer_legend(pages, reports):
    rep = reports["cnn"]
    scatters = [s for s in Page(pages["cnn"].read_text()).charts.values() if s.get("mark", {}).get("type") == "point"
                and "title" in s]
    assert scatters
    validated = [lay["name"] for lay in rep["layers"] if lay["name"] in rep["validation"]["layers"]]
    for spec in scatters:
        color = spec["encoding"]["color"]
        assert color["field"] == "layer" and isinstance(color.get("legend"), dict) and color["legend"]["title"] == "layer"
        assert color["sort"] == validated  # the legend lists the layers in model order
        assert {p["layer"] for p in spec["data"]["values"]} == set(validated)


@pytest.mark.parametrize("name", SAMPLES)
def test_constant_units_are_marked(name, pages, truth):
    """The planted constant unit (truth.json: the same non-zero value on every input, which prune
    folds) is marked in the summary, its unit map and the table; no other unit is."""
    layer, unit = truth[name]["constant"]["layer"], truth[name]["constant"]["unit"]
    text = pages[name].read_text()
    page = Page(text)
    assert "constant-units" in page.ids
    summary = re.search(r'<p id="constant-units">(.*?)</p>', text, re.S).group(1)
    assert "1 constant unit" in summary and f"<code>{layer}</code> {unit}." in summary
    rows = table(page)
    assert [(r["layer"], r["unit"]) for r in rows if r["state"] == "constant"] == [(layer, unit)]
    maps = [s for s in page.charts.values() if s.get("mark", {}).get("type") == "rect" and "transform" in s]
    marked = [(i, c["a"]) for i, s in enumerate(maps) for c in s["data"]["values"] if c.get("k")]
    names = [lay for lay in truth[name]["layers"] if lay != truth[name]["final"]]
    assert marked == [(names.index(layer), unit)]
    assert all(c.get("k", 0) == 0 for s in maps for c in s["data"]["values"] if c["d"])  # dead is not constant


def test_heads_only_page_has_no_empty_unit_map(pages, reports):
    text = pages["heads_only"].read_text()
    page = Page(text)
    assert "unit-map" not in page.sections and 'href="#unit-map"' not in text and "Unit maps" not in text
    assert "heads" in page.sections
    kinds = {(s["usermeta"]["metric"], s["usermeta"]["kind"]) for s in distributions(page)}
    assert kinds and all(k == "" for _, k in kinds)  # one kind of unit: no kind in the captions


def test_mixed_kinds_get_one_heatmap_each(pages, reports):
    """Heads and neurons are on different scales: one heatmap per metric and kind of unit."""
    kind_of = {"heads": "attention heads", "weights": "embedding rows"}
    layers = {lay["name"]: kind_of.get(lay["activation_point_kind"], "neurons and channels")
              for lay in reports["heads"]["layers"]}
    charts = distributions(Page(pages["heads"].read_text()))
    assert {s["usermeta"]["kind"] for s in charts} == set(layers.values()) and len(set(layers.values())) > 1
    for spec in charts:
        assert {r["layer"] for r in spec["data"]["values"]} <= {n for n, k in layers.items()
                                                               if k == spec["usermeta"]["kind"]}


def test_many_layers_no_dead_units(pages, reports):
    """A MiniLM-shaped report (37 layers, nothing dead): the page says "no dead units" in words
    instead of an empty bar chart, and draws each key metric as one heatmap whose cells are
    counted here by brute force (30 equal bins over the values of every layer)."""
    rep = reports["wide"]
    text = pages["wide"].read_text()
    page = Page(text)
    assert "no-dead" in page.ids and "No dead units" in text
    assert not [s for s in page.charts.values() if s.get("encoding", {}).get("x", {}).get("field") == "fraction"]
    charts = distributions(page)
    assert [s["usermeta"]["metric"] for s in charts] == list(WIDE_METRICS)  # by rank priority
    assert not [s for s in page.charts.values() if "facet" in s]
    for spec in charts:
        metric = spec["usermeta"]["metric"]
        assert spec["encoding"]["y"]["sort"] == WIDE_LAYERS
        every = [v for lay in rep["layers"] for v in lay["metrics"][metric]]
        lo, hi = min(every), max(every)
        width = (hi - lo) / H.HIST_BINS
        want = {}
        for lay in rep["layers"]:
            for v in lay["metrics"][metric]:
                k = min(H.HIST_BINS - 1, int((v - lo) / width))
                want[(lay["name"], k)] = want.get((lay["name"], k), 0) + 1
        got = {(r["layer"], round((r["a"] - lo) / width)): r["n"] for r in spec["data"]["values"]}
        assert got == want, metric


def test_scatter_legend_past_twenty_layers_is_a_depth_ramp():
    names = [f"l{i}" for i in range(H.LEGEND_LAYERS + 5)]
    points = [{"layer": n, "unit": u, "x": 0.1 * u, "y": 0.2} for n in names for u in range(2)]
    spec = H.scatter_chart(points, "m", {"spearman": 0.5, "units": len(points)})
    color = spec["encoding"]["color"]
    assert color["field"] == "depth" and color["type"] == "quantitative"
    assert color["legend"]["title"] == f"layer: 0 = l0, {len(names) - 1} = l{len(names) - 1}"
    assert [p["depth"] for p in spec["data"]["values"]] == [i for i in range(len(names)) for _ in range(2)]
    few = H.scatter_chart(points[:2 * H.LEGEND_LAYERS], "m", {})["encoding"]["color"]
    assert few["field"] == "layer" and few["legend"]["symbolLimit"] == H.LEGEND_LAYERS  # every layer named
