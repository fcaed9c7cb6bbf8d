"""The typed report: every report fitcli writes reads back into the dataclasses and out again byte
for byte, the dataclasses and their sections (blocks, the greedy curve, validation) follow the
shipped JSON Schema, a report worked out by hand round-trips with the values worked out here, old
reports (fields a newer fitcli added missing) still load, gate and render, and gate, validation and
removable return values instead of changing the report."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch

import fitcli
from fitcli import report_build
from fitcli.report import AuditReport, dumps, schema
from fitcli.report_types import (
    BlockRow,
    BlockValidation,
    Correlation,
    Coverage,
    GreedyStep,
    LayerReport,
    RandomStats,
    Summary,
    Validation,
)

jsonschema = pytest.importorskip("jsonschema")

S = "sample_models"


def _section_schema(name: str, item: bool = False) -> dict:
    """The schema of one top-level field (an item of it with ``item``), its $refs resolvable."""
    full = schema()
    sub = full["properties"][name]
    return {"$defs": full["$defs"], **(sub["items"] if item else sub)}


def _json_text(d: dict) -> str:
    """The text fitcli writes for ``d``, written here independently of ``fitcli.report.dumps``:
    indented by two, each list of numbers (or nulls) on one line."""
    text = json.dumps(d, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    item = r"(?:-?[0-9][0-9.eE+-]*|null|true|false)"
    return re.sub(rf"\[\n\s*{item}(?:,\n\s*{item})*\n\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(0)[1:-1].split(",")) + "]", text)


# --------------------------------------------------------------------------------------------
# a report worked out by hand


def _hand_report() -> dict:
    """fc1: 4 units, dormancy [0, 0.5, 0, 1] with τ = 0 -> units 0 and 2 dead (2 of 4: 50%); the
    exact ablation [0, 2e-7, -3, null] -> units 0 and 1 removable (|Δ| ≤ 1e-6), unit 3 non-finite.
    fc2: the final layer (never dead). 3 of 4 parameters covered: 75%."""
    return {
        "schema": "fitcli.report/1", "tool": {"name": "fitcli", "version": "0.0.0"}, "created": "2026-01-01T00:00:00Z",
        "command": "score",
        "model": {"path": "m.pt", "format": "pt", "sha256": "ab" * 32, "arch": "models.py:Net"},
        "data": {"spec": "d.pt", "samples": 8, "batches": 2},
        "settings": {"tau": 0.0, "seed": 0, "device": "cpu", "metrics": ["ablation", "dormant"], "rank_by": "dormant",
                     "loss": "cross_entropy"},
        "discovery": {"method": "fx", "notes": []},
        "layers": [
            {"name": "fc1", "type": "Linear", "units": 4, "activation_point": "relu1", "activation_point_kind": "module",
             "final": False, "metrics": {"ablation": [0.0, 2e-07, -3.0, None], "dormant": [0.0, 0.5, 0.0, 1.0]},
             "aggregate": {"ablation": {"mean": -1.0, "max": 2e-07, "min": -3.0, "var": 2.0},
                           "dormant": {"mean": 0.375, "max": 1.0, "min": 0.0, "var": 0.171875}},
             "nonfinite": [3], "dead": [0, 2], "dead_fraction": 0.5, "removable": [0, 1]},
            {"name": "fc2", "type": "Linear", "units": 2, "activation_point": "fc2", "activation_point_kind": "output",
             "final": True, "metrics": {"dormant": [0.0, 1.0]},
             "aggregate": {"dormant": {"mean": 0.5, "max": 1.0, "min": 0.0, "var": 0.25}},
             "nonfinite": [], "dead": [], "dead_fraction": 0.0},
        ],
        "summary": {"layers": 2, "units": 4, "dead": 2, "dead_fraction": 0.5, "dead_known": True,
                    "nonfinite_loss_batches": 0},
        "ranked": [{"layer": "fc1", "unit": 0, "value": 0.0, "normalized": 0.0, "dead": True}],
        "skipped": [], "unsupported": [],
        "coverage": {"units": 4, "layers": 1, "parameters": 3, "model_parameters": 4, "fraction": 0.75,
                     "not_audited": [{"name": "fc2", "type": "Linear", "parameters": 1, "reason": "final"}]},
        "metric_info": {"ablation": {"description": "exact", "needs": ["activations", "loss", "ablation"]},
                        "dormant": {"description": "dormancy", "needs": ["activations"], "marks_dead": True}},
        "validation": {
            "layers": {"fc1": {"metrics": {"dormant": {"spearman": 0.5, "kendall": 0.25, "bottom10_overlap": 1.0,
                                                       "units": 4}},
                               "best": "dormant", "units": [0, 1, 2, 3], "ablation": [0.0, 2e-07, -3.0, None]}},
            "across_layers": {"dormant": {"spearman": 0.5, "kendall": 0.25, "bottom10_overlap": 1.0, "units": 4}},
            "best": "dormant",
            "random": {"layers": {"fc1": {"spearman": 0.01, "bottom10_overlap": 0.25, "units": 3, "draws": 200}},
                       "across_layers": {"spearman": 0.01, "bottom10_overlap": 0.25, "units": 3, "draws": 200}},
            "oracle": "|ablation| (zero mode, exact)", "seed": 0,
            "recommendation": "for this model, rank by dormant: Spearman 0.50 with exact ablation across layers"},
        "gate": {"max_dead": 10.0, "max_dead_layer": None, "passed": False,
                 "failures": ["2/4 units dead (50.00%) > max_dead 10%"]},
    }


def _hand_blocks() -> dict:
    """Three blocks; the greedy curve removed b1 (the smallest |Δloss|, 0.01) from a base loss of 2."""
    return {
        "schema": "fitcli.report/1", "tool": {"name": "fitcli", "version": "0.0.0"}, "created": "2026-01-01T00:00:00Z",
        "command": "blocks", "model": {"path": "m.pt", "format": "pt", "sha256": "cd" * 32, "arch": None},
        "data": {"spec": "d.pt", "samples": 4, "batches": 1},
        "settings": {"tau": 0.0, "seed": 0, "metrics": [], "loss": "cross_entropy", "device": "cpu", "greedy": 1},
        "discovery": {"method": "runtime", "notes": []}, "layers": [],
        "summary": {"layers": 0, "units": 0, "dead": 0, "dead_fraction": 0.0, "dead_known": False}, "skipped": [],
        "blocks": [{"name": "b0", "block_influence": 0.5, "angular_distance": 0.25, "ablation": 0.75, "ablation_accuracy": -0.5},
                   {"name": "b1", "block_influence": 0.125, "angular_distance": 0.0625, "ablation": 0.01, "ablation_accuracy": 0.0},
                   {"name": "b2", "block_influence": None, "angular_distance": None, "ablation": -0.25, "ablation_accuracy": 0.25}],
        "base": {"loss": 2.0, "accuracy": 0.5},
        "greedy": [{"step": 1, "removed": "b1", "loss": 2.01, "delta_loss": 0.01, "accuracy": 0.5,
                    "block_influence_pick": "b1", "block_influence": 0.125}],
        "block_validation": {"oracle": "|Δloss| with the block replaced by the identity",
                             "metrics": {"block_influence": {"spearman": 1.0, "kendall": 1.0, "bottom10_overlap": 1.0, "units": 2}},
                             "random": {"spearman": 0.0, "bottom10_overlap": 0.5, "units": 3, "draws": 200}},
    }


def test_hand_report_round_trips_with_the_values_worked_by_hand(tmp_path):
    d = _hand_report()
    jsonschema.validate(d, schema())
    r = AuditReport.from_dict(copy.deepcopy(d))
    assert r.to_dict() == d and r.to_json() == _json_text(d)
    path = tmp_path / "r.json"
    path.write_text(_json_text(d))
    assert AuditReport.load(path).to_json() == path.read_text()
    # the typed values are the ones worked out in the docstring
    assert isinstance(r.summary, Summary) and (r.summary.units, r.summary.dead, r.summary.dead_fraction) == (4, 2, 0.5)
    assert r.summary["dead"] == 2 and r["summary"]["dead_fraction"] == 0.5  # read as JSON too
    fc1 = r.layer("fc1")
    assert isinstance(fc1, LayerReport) and fc1.metrics["dormant"].dtype == torch.float64
    assert fc1.metrics["dormant"].tolist() == [0.0, 0.5, 0.0, 1.0]
    assert math.isnan(fc1.metrics["ablation"][3]) and fc1.nonfinite == [3]
    assert r.dead == {"fc1": [0, 2]} and r.removable == {"fc1": [0, 1]}
    assert isinstance(r.coverage, Coverage) and r.coverage.fraction == 0.75
    assert r.coverage.not_audited[0].name == "fc2" and r.coverage.not_audited[0].parameters == 1
    assert isinstance(r.validation, Validation) and r.validation.best == "dormant"
    assert r.validation.layers["fc1"].metrics["dormant"] == Correlation(0.5, 0.25, 1.0, 4)
    assert r.validation.random.across_layers == RandomStats(0.01, 0.25, 3, 200)
    assert r.validation["layers"]["fc1"]["units"] == [0, 1, 2, 3]
    assert r.gate_result is r.gate and not r.gate.passed
    # dormant of fc1 ℓ2-normalised: ‖(0, .5, 0, 1)‖ = √1.25; the final fc2 is not ranked
    rows = r.ranked(by="dormant", top=None)
    n = math.sqrt(1.25)
    assert [(x["layer"], x["unit"]) for x in rows] == [("fc1", 0), ("fc1", 2), ("fc1", 1), ("fc1", 3)]
    assert [x["normalized"] for x in rows] == pytest.approx([0.0, 0.0, 0.5 / n, 1.0 / n], abs=1e-15)
    assert [x["dead"] for x in rows] == [True, True, False, False]


def test_hand_blocks_report_round_trips_and_its_sections_validate():
    d = _hand_blocks()
    jsonschema.validate(d, schema())
    r = AuditReport.from_dict(copy.deepcopy(d))
    assert r.to_json() == _json_text(d)
    assert all(isinstance(b, BlockRow) for b in r.blocks) and all(isinstance(s, GreedyStep) for s in r.greedy)
    assert [b.name for b in r.blocks] == ["b0", "b1", "b2"] and r.blocks[2].block_influence is None
    step = r.greedy[0]
    assert (step.step, step.removed, step.delta_loss) == (1, "b1", 0.01)
    # the step removed the block whose removal changes the loss least, as worked out in the docstring
    assert step.removed == min(r.blocks, key=lambda b: abs(b.ablation)).name
    assert isinstance(r.block_validation, BlockValidation) and r.block_validation.random.draws == 200
    assert r.coverage is None and r.ranking is None and "coverage" not in r and "blocks" in r
    for b in r.blocks:
        jsonschema.validate(b.to_dict(), _section_schema("blocks", item=True))
    jsonschema.validate(step.to_dict(), _section_schema("greedy", item=True))
    jsonschema.validate(r.block_validation.to_dict(), _section_schema("block_validation"))


@pytest.mark.parametrize("field, bad", [
    ("greedy", [{"step": 1, "loss": 2.0, "delta_loss": 0.0, "accuracy": None, "block_influence_pick": None,
                 "block_influence": None}]),  # no "removed"
    ("greedy", [{"step": 0, "removed": "b1", "loss": 2.0, "delta_loss": 0.0, "accuracy": None,
                 "block_influence_pick": None, "block_influence": None}]),  # steps count from 1
    ("greedy", [{"step": 1, "removed": "b1", "loss": "2.0", "delta_loss": 0.0, "accuracy": None,
                 "block_influence_pick": None, "block_influence": None}]),  # a loss is a number
    ("blocks", [{"name": "b0", "block_influence": 0.5, "angular_distance": 0.25}]),  # no "ablation"
    ("blocks", [{"name": "b0", "block_influence": "high", "angular_distance": 0.25, "ablation": 0.1}]),
    ("block_validation", {"metrics": {}}),  # no oracle
])
def test_schema_covers_blocks_and_the_greedy_curve(field, bad):
    d = _hand_blocks()
    d[field] = bad
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(d, schema())


def test_old_reports_still_load_gate_compare_and_render():
    """A report from before coverage, metric_info, dead_known, the random baseline and the validated
    units were written: it loads and writes back as it was; gate, compare and the renderers read it."""
    from fitcli.comparison import compare
    from fitcli.render import render_csv, render_markdown

    old = _hand_report()
    for k in ("coverage", "metric_info", "unsupported", "ranked", "gate"):
        del old[k]
    del old["summary"]["dead_known"], old["summary"]["nonfinite_loss_batches"]
    del old["validation"]["random"], old["validation"]["layers"]["fc1"]["units"]
    del old["validation"]["layers"]["fc1"]["ablation"]
    del old["layers"][0]["activation_point_kind"], old["layers"][0]["removable"]
    old["layers"][0]["future_field"] = {"kept": True}  # a field this fitcli does not know
    jsonschema.validate(old, schema())
    r = AuditReport.from_dict(copy.deepcopy(old))
    assert r.to_dict() == old and r.to_json() == _json_text(old)
    assert r.metric_info is None and r.coverage is None and r.removable == {}
    g = fitcli.gate(old, max_dead=60, min_coverage=50)
    assert not g.passed and g.failures == [
        "the report has no coverage figure (made by an older fitcli): min_coverage cannot hold"]
    assert old == AuditReport.from_dict(old).to_dict()  # gate left the dict as it was
    cmp = compare(old, _hand_report())
    assert cmp.layer("fc1").died == [] and cmp.layer("fc1").status == "compared"
    assert "2 of 4 units dead (50.0%)" in render_markdown(r.to_dict())
    assert render_csv(r.to_dict()).splitlines()[1] == "fc1,0,1,0,0.0,0.0"


def test_gate_worked_by_hand_returns_a_verdict_and_leaves_the_report():
    r = AuditReport.from_dict(_hand_report())
    before = r.to_json()
    g = report_build.gate(r, max_dead=40, max_dead_layer=60, min_coverage=80)
    assert r.to_json() == before  # a value, the report unchanged
    assert not g.passed and g.failures == [
        "the audited units cover 75.00% of the model's parameters < min_coverage 80%",
        "2/4 units dead (50.00%) > max_dead 40%"]  # fc1 is at 50% ≤ 60%; the final fc2 is not checked
    assert report_build.gate(r, max_dead=50, max_dead_layer=49, min_coverage=None).failures == [
        "layer fc1: 2/4 dead (50.00%) > max_dead_layer 49%"]
    again = fitcli.gate(_hand_report())  # no thresholds: the ones the report was gated with (max_dead 10)
    assert not again.passed and again.failures == ["2/4 units dead (50.00%) > max_dead 10%"]
    d = _hand_report()
    verdict = fitcli.gate(d, max_dead=50)
    assert verdict.passed and d == _hand_report()  # a dict is not changed
    fitcli.gate(r, max_dead=50)
    assert r.gate.passed and r.to_dict()["gate"] == {"max_dead": 50, "max_dead_layer": None, "passed": True,
                                                      "failures": []}  # an AuditReport keeps the verdict


def test_removable_units_by_hand():
    info = {"ablation": {"needs": ["activations", "ablation"]}, "taylor": {"needs": ["gradients"]}}
    vals = {"ablation": torch.tensor([0.0, 2e-7, -3.0, math.nan, -1e-6], dtype=torch.float64),
            "taylor": torch.zeros(5, dtype=torch.float64)}
    assert report_build.removable_units(vals, info) == [0, 1, 4]
    assert report_build.removable_units({"taylor": vals["taylor"]}, info) is None  # no exact ablation: unknown


def test_with_validation_returns_a_new_report():
    r = AuditReport.from_dict(_hand_report())
    before = r.to_json()
    v = Validation.from_dict({**_hand_report()["validation"], "best": "ablation"})
    again = r.with_validation(v, rerank=True, top=3)
    assert r.to_json() == before and again is not r
    assert again.settings["rank_by"] == "ablation" and again.validation is v
    # fc1's ablation, the least first (higher is fitter: taken as it is); unit 3 (null) is not ranked
    assert [(x["layer"], x["unit"]) for x in again.ranking] == [("fc1", 2), ("fc1", 0), ("fc1", 1)]


# --------------------------------------------------------------------------------------------
# reports made by fitcli


def _check_file(path) -> AuditReport:
    text = path.read_text(encoding="utf-8")
    r = AuditReport.load(path)
    assert r.to_json() == text, path.name
    jsonschema.validate(r.to_dict(), schema())
    assert dumps(AuditReport.from_dict(json.loads(text)).to_dict()) == text
    return r


def _spearman(a: list[float], b: list[float]) -> float:
    """By hand: Pearson correlation of the ranks (no ties in the values used here)."""
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        out = [0.0] * len(x)
        for r, i in enumerate(order):
            out[i] = float(r)
        return out
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def test_cli_reports_round_trip_byte_for_byte(run_cli, in_repo, tmp_path):
    mlp = f"{S}/mlp.safetensors --arch {S}/models.py:mlp --data {S}/mlp_data.safetensors --quiet"
    res = f"{S}/resmlp.safetensors --arch {S}/models.py:resmlp --data {S}/resmlp_data.safetensors --quiet"
    runs = {"score": f"score {mlp} --validate --validate-units 6 --rank-by auto --max-dead 1",
            "ablate": f"ablate {mlp} --layer fc1 --layer fc3 --units 0,1,3 --whole-layer",
            "blocks": f"ablate {res} --blocks --greedy 2"}
    reports = {}
    for name, args in runs.items():
        out = tmp_path / f"{name}.json"
        got = run_cli(f"{args} -o {out}")
        assert got.code == (1 if name == "score" else 0), got.stderr  # score's gate fails: 4/64 dead
        reports[name] = _check_file(out)
    score = reports["score"]
    assert score.gate is not None and not score.gate.passed
    assert score.validation is not None and score.settings["rank_by"] == score.validation.best
    assert all(len(v.units) == 6 for v in score.validation.layers.values())
    ab = reports["ablate"]
    assert [x.extra["ablated_units"] for x in ab.layers] == [[0, 1, 3], [0, 1, 3]]
    assert all(x.removable is not None for x in ab.layers)
    assert {row["unit"] for row in ab.ranking} <= {0, 1, 3}
    blocks = reports["blocks"]
    assert [s.step for s in blocks.greedy] == [1, 2]
    first = blocks.greedy[0]
    assert first.removed == min(blocks.blocks, key=lambda b: (abs(b.ablation), b.name)).name
    assert first.delta_loss == first.loss - blocks.base["loss"]
    rows = [b for b in blocks.blocks if b.block_influence is not None]
    want = _spearman([b.block_influence for b in rows], [abs(b.ablation) for b in rows])
    assert blocks.block_validation.metrics["block_influence"].spearman == pytest.approx(want, abs=1e-12)
    for step in blocks.greedy:
        jsonschema.validate(step.to_dict(), _section_schema("greedy", item=True))
    got = run_cli(f"gate {tmp_path / 'score.json'} --max-dead 10 --format json")
    assert got.code == 0 and json.loads(got.stdout)["passed"]  # 4/64 = 6.25% ≤ 10%


def _gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2,
                                                             n_positions=32, bos_token_id=0, eos_token_id=0)).eval()
    ids = torch.randint(1, 50, (6, 8), generator=torch.Generator().manual_seed(1))
    return m, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


def test_tiny_transformer_reports_round_trip(tmp_path):
    m, data = _gpt2()
    weights = {k: v.clone() for k, v in m.state_dict().items()}
    made = {"audit": fitcli.audit(m, data, device="cpu", validate=True, validate_units=4, max_dead=50),
            "ablate": fitcli.ablate(m, data, layers=["transformer.h.0.attn.heads"], device="cpu", whole_layer=True),
            "blocks": fitcli.blocks(m, data, greedy=1, device="cpu")}
    for name, r in made.items():
        path = r.save(tmp_path / f"{name}.json")
        back = _check_file(path)
        assert back.to_dict() == r.to_dict()
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in weights.items())
    assert made["audit"].validation.random is not None and made["blocks"].greedy[0].step == 1
    assert made["ablate"].layer("transformer.h.0.attn.heads").extra["layer_ablation"] is not None
