"""The report's compact JSON: every list of numbers (each per-unit list) on one line while the
rest stays indented by two; per-unit values written as the shortest decimal that reads back as
the same float32 (within 2**-23 relatively of the computed value, values outside float32's
normal range exactly); a written report reads back to the in-memory one within that precision and
writes back byte for byte; a report in the old layout (every number on its own line, 17-digit
floats) still loads, renders and gates as before."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import struct

import pytest
import torch
from torch import nn

import fitcli
from fitcli.report import AuditReport, dumps, rank_units, ranking_layers, schema
from fitcli.report_types import LayerReport, unit_floats

jsonschema = pytest.importorskip("jsonschema")

REL = 2.0 ** -23  # the documented precision of a per-unit value


def f32(x: float) -> float:
    """``x`` rounded to float32 by the C library (struct), independently of torch."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def shortest_f32_text(x: float) -> str:
    """By brute force: the decimal with the fewest significant digits (the nearest of those) that
    reads back as the float32 nearest to ``x``."""
    target = f32(x)
    for digits in range(1, 18):
        text = f"{target:.{digits}g}"
        if f32(float(text)) == target:
            return text
    raise AssertionError(x)


def reference_text(d: dict) -> str:
    """The expected file: json.dumps(indent=2), then every array of numbers joined onto one line."""
    text = json.dumps(d, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    item = r"(?:-?[0-9][0-9.eE+-]*|null|true|false)"
    return re.sub(rf"\[\n\s*{item}(?:,\n\s*{item})*\n\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(0)[1:-1].split(",")) + "]", text)


# --------------------------------------------------------------------------------------------
# the values, by hand


@pytest.mark.parametrize("x, written", [
    (1 / 3, "0.33333334"), (math.pi, "3.1415927"), (0.1, "0.1"), (2e-07, "2e-07"), (-2.5, "-2.5"),
    (16777217.0, "16777217.0"), (0.0, "0.0"), (-0.0, "-0.0"), (1e-40, "1e-40"), (1e39, "1e+39"),
    (2.0 ** -126, "1.1754944e-38"), (0.06462695904903942, "0.06462696"),
    (-85 / 512, "-0.166015625"), (0.3, "0.3"), (123456789.0, "123456789.0"), (1234567891.0, "1234568000.0"),
])
def test_per_unit_values_by_hand(x, written):
    """1/3 as float32 is 0.3333333432674408..., whose shortest reading-back decimal has 8 digits;
    1234567891 (10 digits) is written 1234568000, the shortest decimal that reads back as 1234567936,
    the float32 nearest to it;
    1e-40 (below float32's normal range) and 1e39 (above its largest) are written exactly, and so
    are values of at most 9 significant digits: 16777217 (2**24 + 1, not a float32), -85/512 (an
    accuracy change over 512 samples), 0.3, 123456789; 2**-126, the smallest normal float32, has
    38 digits and is written as the 8-digit decimal that reads back as it."""
    (v,) = unit_floats(torch.tensor([x], dtype=torch.float64))
    assert json.dumps(v) == written


def test_nonfinite_values_are_null():
    assert unit_floats(torch.tensor([math.nan, math.inf, -math.inf, 1.0], dtype=torch.float64)) == [None] * 3 + [1.0]


def test_per_unit_values_are_the_shortest_float32_decimals_and_stable():
    """20,000 values over 60 decades, each checked by brute force: the written text is the
    shortest decimal that reads back as the value's float32 (a value of at most 9 significant
    digits: itself), within 2**-23 of the value, and writing the read-back value again gives the
    same number."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g, dtype=torch.float64) * torch.exp(torch.randn(20000, generator=g,
                                                                                     dtype=torch.float64) * 30)
    x = x[(x.abs() >= 2.0 ** -126) & (x.abs() <= 3e38)]
    x = torch.cat([x, torch.randint(-511, 512, (2000,), generator=g, dtype=torch.float64) / 512])
    got = unit_floats(x)
    short = 0
    for v, w in zip(x.tolist(), got, strict=True):
        assert f32(w) == f32(v) and abs(w - v) <= REL * abs(v)
        digits = len(repr(v).lstrip("-").split("e")[0].replace(".", "").strip("0"))
        short += digits <= 9
        assert w == (v if digits <= 9 else float(shortest_f32_text(v))), (v, w)
    assert short >= 2000
    assert unit_floats(torch.tensor(got, dtype=torch.float64)) == got


# --------------------------------------------------------------------------------------------
# a report made by an audit


def _audit() -> tuple[nn.Module, AuditReport]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 12), nn.Tanh(), nn.Linear(12, 3))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(3)]
    return model, fitcli.audit(model, data, device="cpu", max_dead=50)


def _numeric_lists(obj, out: list) -> list:
    """Every (key, list of numbers) that is a dict value, in document order."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, list) and all(x is None or isinstance(x, (int, float)) for x in v):
                out.append((k, v))
            else:
                _numeric_lists(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _numeric_lists(v, out)
    return out


def test_per_unit_lists_are_written_on_one_line(tmp_path):
    _, report = _audit()
    path = report.save(tmp_path / "r.json")
    text = path.read_text(encoding="utf-8")
    assert text == reference_text(json.loads(text))
    lines = text.splitlines()
    found = [(m.group(1), json.loads(m.group(2))) for ln in lines
             if (m := re.fullmatch(r'\s*"(\w+)": (\[[^\[\]{}"]*\]),?', ln))]
    want = _numeric_lists(report.to_dict(), [])
    assert found == want  # each list of numbers on its own single line, with its values
    assert sum(len(v) for k, v in found if k == "act_mean") == sum(lay.units for lay in report.layers)
    assert all((len(ln) - len(ln.lstrip())) % 2 == 0 for ln in lines)  # the rest indented by two
    assert not any(re.fullmatch(r"\s*(-?[0-9][0-9.eE+-]*|null),?", ln) for ln in lines)  # no number alone on a line
    assert lines[1] == '  "schema": "fitcli.report/1",' and text.endswith("}\n")


def test_a_written_report_reads_back_within_the_documented_precision(tmp_path):
    model, report = _audit()
    path = report.save(tmp_path / "r.json")
    jsonschema.validate(json.loads(path.read_text()), schema())
    back = AuditReport.load(path)
    assert back.to_json() == path.read_text(encoding="utf-8")  # written again byte for byte
    assert json.loads(report.to_json()) == report.to_dict() == back.to_dict()
    for mem, got in zip(report.layers, back.layers, strict=True):
        assert mem.metrics.keys() == got.metrics.keys() and mem.units == got.units
        for m in mem.metrics:
            for v, w in zip(mem.metrics[m].tolist(), got.metrics[m].tolist(), strict=True):
                if not math.isfinite(v):
                    assert math.isnan(w)
                else:
                    assert f32(w) == f32(v) and abs(w - v) <= REL * abs(v), (mem.name, m, v, w)
        # what gates read is exact: dead units, their fraction, the aggregates
        assert (got.dead, got.dead_fraction, got.nonfinite, got.aggregate) == (
            mem.dead, mem.dead_fraction, mem.nonfinite, mem.aggregate)
    assert back.summary == report.summary and back.ranking == report.ranking
    assert back.coverage == report.coverage
    assert fitcli.gate(back, max_dead=1).failures == fitcli.gate(report, max_dead=1).failures


def test_rankings_are_made_from_the_written_values():
    """Two units 1e-9 apart are the same float32: written as 1.0 and 1.0, they tie, and the tie
    goes to the lower unit index (with the exact values unit 1 would come first); each row's
    value is the one in the file."""
    lay = LayerReport(name="fc", type="Linear", units=2, activation_point="fc", aggregate={}, dead=[], dead_fraction=0.0,
                      nonfinite=[], metrics={"m": torch.tensor([1.0 + 1e-9, 1.0], dtype=torch.float64)})
    assert lay.to_dict()["metrics"]["m"] == [1.0, 1.0]
    rows = rank_units(ranking_layers([lay], "m"), "m", None, higher_is_better=True, include_final=True)
    assert [(r["unit"], r["value"]) for r in rows] == [(0, 1.0), (1, 1.0)]
    assert rows[0]["normalized"] == rows[1]["normalized"] == 1.0 / math.sqrt(2.0)


def test_a_reports_ranking_is_recomputed_from_its_file(tmp_path):
    _, report = _audit()
    d = json.loads(report.save(tmp_path / "r.json").read_text())
    by = d["settings"]["rank_by"]
    assert d["ranked"]
    for row in d["ranked"]:
        lay = next(x for x in d["layers"] if x["name"] == row["layer"])
        vals = lay["metrics"][by]
        assert row["value"] == vals[row["unit"]]
        norm = math.sqrt(sum(v * v for v in vals if v is not None))
        if report.higher_is_better(by):
            assert row["normalized"] == pytest.approx(vals[row["unit"]] / norm, rel=1e-12)


def test_an_old_layout_report_still_loads_renders_and_gates(run_cli, tmp_path):
    """The layout fitcli wrote before: json.dumps(indent=2), every value at full float64 precision."""
    _, report = _audit()
    old = report.to_dict()
    for lay, mem in zip(old["layers"], report.layers, strict=True):
        lay["metrics"] = {m: [float(v) if math.isfinite(v) else None for v in t.tolist()]
                          for m, t in mem.metrics.items()}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old, indent=2, allow_nan=False, ensure_ascii=False) + "\n", encoding="utf-8")
    assert len(path.read_text().splitlines()) > sum(lay.units for lay in report.layers)  # one number a line
    loaded = AuditReport.load(path)
    for lay, mem in zip(loaded.layers, report.layers, strict=True):
        assert all(torch.equal(lay.metrics[m].nan_to_num(7.0), mem.metrics[m].nan_to_num(7.0)) for m in mem.metrics)
    dead = sum(len(lay.dead) for lay in report.layers if not lay.final)
    got = run_cli(["gate", str(path), "--max-dead", "100", "--format", "json"])
    assert got.code == 0 and json.loads(got.stdout)["passed"], got.stderr
    if dead:
        got = run_cli(["gate", str(path), "--max-dead", "0", "--format", "json"])
        assert got.code == 1 and not json.loads(got.stdout)["passed"]
    got = run_cli(["render", str(path), "--format", "csv"])
    assert got.code == 0, got.stderr
    rows = list(csv.DictReader(io.StringIO(got.stdout)))
    assert len(rows) == sum(lay.units for lay in report.layers)
    first = report.layers[0]
    for m, t in first.metrics.items():  # the CSV shows the old file's values, unrounded
        want = ["" if not math.isfinite(v) else repr(v) for v in t.tolist()]
        assert [r[m] for r in rows[:first.units]] == want
    got = run_cli(["render", str(path), "--format", "markdown"])
    assert got.code == 0 and "dead" in got.stdout
    assert dumps(loaded.to_dict()) == reference_text(loaded.to_dict())  # written again: the new layout
