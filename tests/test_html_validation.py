"""The HTML page's redundancy section (present when the metric was computed, absent otherwise),
checked against R² computed here by least squares on activations read with a hook; and the
validation's per-kind table, residual blocks included."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fitcli

pytest.importorskip("jinja2")
pytest.importorskip("vl_convert")
sys.path.insert(0, str(Path(__file__).parent))
from test_html import Page, check_offline_and_sections  # noqa: E402

from fitcli.render import html as H  # noqa: E402


def _model():
    """Linear(5, 6) + ReLU + Linear(6, 3); unit 4 of the first layer is a copy of unit 1 (the rest
    of the layer rebuilds both exactly)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        m[0].weight[4] = m[0].weight[1]
        m[0].bias[4] = m[0].bias[1]
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(2)]
    return m, data


def _hand_r2(h: np.ndarray) -> np.ndarray:
    """R² of each column of ``h`` regressed (least squares with an intercept) on the other columns."""
    out = []
    for i in range(h.shape[1]):
        y = h[:, i]
        x = np.column_stack([np.ones(len(y)), np.delete(h, i, axis=1)])
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        ss_res = float(((y - x @ coef) ** 2).sum())
        ss_tot = float(((y - y.mean()) ** 2).sum())
        out.append(1.0 if ss_tot == 0 else 1.0 - ss_res / ss_tot)
    return np.array(out)


def _activations(m, data) -> dict[str, np.ndarray]:
    """Layer 0 read after its ReLU, layer 2 (the logits) at its output."""
    with torch.no_grad():
        return {"0": np.concatenate([torch.relu(m[0](x)).double().numpy() for x, _ in data]),
                "2": np.concatenate([m(x).double().numpy() for x, _ in data])}


def _cells(text: str, table_id: str) -> list[list[str]]:
    """The body rows of the table with id ``table_id``, as the cells' text."""
    import re

    body = re.search(rf'<table[^>]*id="{table_id}".*?<tbody>(.*?)</tbody>', text, re.S).group(1)
    return [[re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td>(.*?)</td>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]


def test_redundancy_section_when_computed():
    m, data = _model()
    report = fitcli.audit(m, data, device="cpu", metrics=["act_mean", "redundancy"]).to_dict()
    text = H.render_html(report)
    page = check_offline_and_sections(text, {"summary", "redundancy", "ranked", "provenance"})
    assert "redundancy" in page.ids and "redundancy-table" in page.ids
    rows = _cells(text, "redundancy-table")
    assert [r[0] for r in rows] == ["0", "2"]
    for (layer, units, mean, rebuilt, top_unit, top), (name, h) in zip(rows, _activations(m, data).items(),
                                                                       strict=True):
        hand = _hand_r2(h)
        assert layer == name and int(units) == h.shape[1]
        assert float(mean) == pytest.approx(hand.mean(), rel=1e-3, abs=1e-6)  # the page shows 4 digits
        assert int(rebuilt) == int((hand >= H.REBUILT).sum())
        assert hand[int(top_unit)] >= hand.max() - 1e-6
        assert float(top) == pytest.approx(hand.max(), abs=1e-4)
    assert int(rows[0][3]) >= 2  # units 1 and 4 of layer 0 rebuild each other
    dist = [spec for spec in page.charts.values() if (spec.get("usermeta") or {}).get("metric") == "redundancy"]
    assert dist and sum(r["n"] for r in dist[0]["data"]["values"]) == 6 + 3


def test_no_redundancy_section_otherwise():
    m, data = _model()
    report = fitcli.audit(m, data, device="cpu", metrics=["act_mean", "apoz"]).to_dict()
    text = H.render_html(report)
    page = Page(text)
    assert "redundancy" not in page.sections and "redundancy-table" not in page.ids
    assert 'href="#redundancy"' not in text


def test_validation_per_kind_table_with_blocks():
    """A tiny LLaMA validated: the page's per-kind table has each kind's Spearman as in the JSON,
    Block Influence and angular distance only under blocks."""
    pytest.importorskip("transformers")
    from test_validate_blocks import _llama

    m, data, blocks = _llama()
    report = json.loads(json.dumps(fitcli.audit(m, data, device="cpu", validate=True).to_dict()))
    text = H.render_html(report)
    check_offline_and_sections(text, {"validation", "redundancy"})
    kinds = report["validation"]["kinds"]
    head = __import__("re").search(r'id="validation-kinds">\s*<thead><tr>(.*?)</tr>', text, __import__("re").S)
    assert __import__("re").findall(r"<th>(.*?)</th>", head.group(1)) == ["metric", *kinds]
    rows = {r[0]: r[1:] for r in _cells(text, "validation-kinds")}
    for col, (name, k) in enumerate(kinds.items()):
        for metric, cells in rows.items():
            c = k["random"] if metric == "(random order)" else k["metrics"].get(metric)
            want = "" if c is None else ("n/a" if c["spearman"] is None else f"{c['spearman']:+.2f}")
            assert cells[col] == want, (name, metric)
    assert rows["block_influence"][list(kinds).index("blocks")] != ""
    assert all(rows["block_influence"][i] == "" for i, k in enumerate(kinds) if k != "blocks")
    assert "redundancy" in rows  # validated beside the other metrics


def test_llama_page_draws_in_headless_chromium(tmp_path):
    """The page with the redundancy section and the per-kind validation: no console error, every
    chart drawn. Without Chromium: checked by parsing only (as in test_html)."""
    pytest.importorskip("transformers")
    from test_validate_blocks import _llama

    m, data, _ = _llama()
    text = H.render_html(fitcli.audit(m, data, device="cpu", validate=True, validate_units=4).to_dict())
    page = check_offline_and_sections(text, {"redundancy", "validation"})
    browser = H.find_chromium()
    if browser is None:
        return
    path = tmp_path / "llama.html"
    path.write_text(text, encoding="utf-8")
    r = H.browser_check(str(path), browser, screenshot=str(tmp_path / "llama.png"))
    assert r["errors"] == [] and r["warnings"] == [], (r["errors"], r["warnings"])
    assert r["charts"] == len(page.chart_divs) == r["rendered"]
