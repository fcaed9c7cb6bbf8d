"""``fitcli compare BASE NEW`` and ``fitcli.compare`` (issue 14): units the test kills in a
copy of the sample MLP are reported as died, exactly; a planted dead unit the test revives as
revived; the --max-new-dead gate on either side of a threshold computed by hand; markdown, JSON,
layers on one side only and resized layers."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

KILL = {"fc1": [8], "fc2": [1, 12]}  # incoming weights 0, bias -10: ReLU output 0 on every input
REVIVE = ("fc1", 3)  # a planted dead unit (truth.json): bias +5, outgoing weights 0 (nothing downstream moves)
HIDDEN = ("fc1", "fc2")


def _killed(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = {k: v.clone() for k, v in sd.items()}
    for layer, units in KILL.items():
        for u in units:
            sd[f"{layer}.weight"][u] = 0.0
            sd[f"{layer}.bias"][u] = -10.0
    layer, u = REVIVE
    sd[f"{layer}.weight"][u] = 0.01
    sd[f"{layer}.bias"][u] = 5.0
    sd["fc2.weight"][:, u] = 0.0
    return sd


def _brute_dead(sd: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, list[int]]:
    """Units whose ReLU output is exactly 0 on every sample, by a forward pass written out here."""
    h1 = torch.relu(x @ sd["fc1.weight"].T + sd["fc1.bias"])
    h2 = torch.relu(h1 @ sd["fc2.weight"].T + sd["fc2.bias"])
    return {name: [i for i in range(h.shape[1]) if float(h[:, i].abs().max()) == 0.0]
            for name, h in (("fc1", h1), ("fc2", h2))}


def _mlp(repo):
    spec = importlib.util.spec_from_file_location("fitcli_test_sample_models", repo / "sample_models" / "models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.mlp


@pytest.fixture(scope="module")
def case(tmp_path_factory, repo, truth):
    """Base and killed checkpoints, their JSON reports, the data and the expected deaths."""
    import fitcli

    t = truth["mlp"]
    d = tmp_path_factory.mktemp("compare")
    base_sd = load_file(repo / t["checkpoint"])
    new_sd = _killed(base_sd)
    new_ckpt = d / "new.safetensors"
    save_file(new_sd, new_ckpt)
    data = load_file(repo / t["data"])
    x = data["inputs"].to(torch.float32)
    dead_b, dead_n = _brute_dead(base_sd, x), _brute_dead(new_sd, x)
    factory = _mlp(repo)
    arch = f"{repo / 'sample_models' / 'models.py'}:mlp"
    reports = {}
    for name, sd in (("base", base_sd), ("new", new_sd)):
        model = factory()
        model.load_state_dict(sd)
        reports[name] = fitcli.audit(model, _batches(data))
        reports[name].save(d / f"{name}.json")
    return {"dir": d, "base_ckpt": repo / t["checkpoint"], "new_ckpt": new_ckpt, "data": repo / t["data"],
            "arch": arch, "base_sd": base_sd, "new_sd": new_sd, "dead_base": dead_b, "dead_new": dead_n,
            "reports": reports, "base_json": d / "base.json", "new_json": d / "new.json", "factory": factory,
            "raw": data}


def _batches(data: dict[str, torch.Tensor], size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(data["inputs"][i : i + size], data["targets"][i : i + size]) for i in range(0, len(data["inputs"]), size)]


def _expected(case) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    b, n = case["dead_base"], case["dead_new"]
    died = {k: sorted(set(n[k]) - set(b[k])) for k in HIDDEN}
    revived = {k: sorted(set(b[k]) - set(n[k])) for k in HIDDEN}
    return died, revived


def test_the_brute_force_sees_exactly_the_units_the_test_changed(case, truth):
    died, revived = _expected(case)
    assert died == KILL  # the kill worked and nothing else downstream died
    assert revived == {"fc1": [3], "fc2": []}
    assert case["dead_base"] == truth["mlp"]["dead"]  # the planted dead units


def test_library_reports_exactly_the_killed_units_as_died(case):
    from fitcli.comparison import compare

    died, revived = _expected(case)
    cmp = compare(case["reports"]["base"], case["reports"]["new"])
    assert cmp.died == died
    assert cmp.revived == revived
    for name in HIDDEN:
        lay = cmp.layer(name)
        assert lay.status == "compared" and lay.units == 32
        assert lay.dead_base == case["dead_base"][name] and lay.dead_new == case["dead_new"][name]
        assert lay.dead_fraction_change == pytest.approx((len(case["dead_new"][name]) - len(case["dead_base"][name])) / 32)
    final = cmp.layer("fc3")
    assert final.final and final.died is None and final.revived is None  # logits are never dead-counted
    s = cmp.summary
    assert (s["died"], s["revived"], s["units_compared"]) == (3, 1, 64)
    assert s["died_percent"] == pytest.approx(100 * 3 / 64)
    assert s["dead_base"] == 4 and s["dead_new"] == 6
    assert cmp.gate is None and "gate" not in cmp.to_dict()


def test_two_json_reports_through_the_cli(case, run_cli):
    died, revived = _expected(case)
    code, out, err = run_cli(["compare", case["base_json"], case["new_json"], "--format", "json"])
    assert code == 0, err
    d = json.loads(out)
    assert {lay["name"]: lay["died"] for lay in d["layers"] if lay["died"] is not None} == died
    assert {lay["name"]: lay["revived"] for lay in d["layers"] if lay["revived"] is not None} == revived
    assert d["base"]["kind"] == d["new"]["kind"] == "report"
    assert d["base"]["source"] == str(case["base_json"])
    # the table names the died units in their layer's row
    code, out, err = run_cli(["compare", case["base_json"], case["new_json"]])
    assert code == 0, err
    fc2 = [ln for ln in out.splitlines() if ln.split("│")[0].strip() == "fc2" and "compared" in ln]
    assert len(fc2) == 1 and fc2[0].split("│")[6].strip() == "1, 12"


def test_two_checkpoints_with_data_through_the_cli(case, run_cli):
    died, revived = _expected(case)
    code, out, err = run_cli(["compare", case["base_ckpt"], case["new_ckpt"], "--arch", case["arch"],
                              "--data", case["data"], "--format", "json", "-q"])
    assert code == 0, err
    d = json.loads(out)
    assert {lay["name"]: lay["died"] for lay in d["layers"] if lay["died"] is not None} == died
    assert {lay["name"]: lay["revived"] for lay in d["layers"] if lay["revived"] is not None} == revived
    assert d["base"]["kind"] == d["new"]["kind"] == "model"
    assert d["new"]["model"]["sha256"] == hashlib.sha256(case["new_ckpt"].read_bytes()).hexdigest()
    assert d["base"]["data"]["spec"] == d["new"]["data"]["spec"] == str(case["data"])
    assert d["base"]["data"]["samples"] == 512
    assert load_file(case["new_ckpt"]).keys() == case["new_sd"].keys()  # the input file is untouched
    assert all(torch.equal(load_file(case["new_ckpt"])[k], v) for k, v in case["new_sd"].items())


def test_gate_on_either_side_of_the_threshold(case, run_cli):
    pct = 100.0 * 3 / (32 + 32)  # 3 killed units of the 64 hidden units: 4.6875 %
    args = ["compare", case["base_json"], case["new_json"], "--format", "json"]
    code, out, err = run_cli([*args, "--max-new-dead", str(pct - 0.01)])
    assert code == 1, err
    g = json.loads(out)["gate"]
    assert g["passed"] is False and g["died"] == 3 and g["units"] == 64
    assert g["died_percent"] == pytest.approx(pct)
    assert "--max-new-dead" in err and "3/64" in err
    code, out, err = run_cli([*args, "--max-new-dead", str(pct + 0.01)])
    assert code == 0, err
    assert json.loads(out)["gate"]["passed"] is True
    code, out, err = run_cli([*args, "--max-new-dead", repr(pct)])  # exactly at the threshold: not more than it
    assert code == 0, err
    code, out, err = run_cli(["compare", case["new_json"], case["base_json"], "--max-new-dead", "0"])  # reversed: 1 died
    assert code == 1 and "1/64" in err


def test_gate_fails_on_checkpoints_and_passes_without_deaths(case, run_cli):
    ck = ["--arch", case["arch"], "--data", case["data"], "--metric", "dormant", "-q"]  # dormant decides dead
    code, out, err = run_cli(["compare", case["base_ckpt"], case["new_ckpt"], *ck, "--max-new-dead", "4.6"])
    assert code == 1, err
    assert "gate FAILED" in out
    code, out, err = run_cli(["compare", case["base_ckpt"], case["base_ckpt"], *ck, "--max-new-dead", "0"])
    assert code == 0, err
    assert "gate passed" in out and "same checkpoint" in out


def test_markdown_has_the_per_layer_table_and_the_died_units(case, run_cli):
    code, out, err = run_cli(["compare", case["base_json"], case["new_json"], "--format", "markdown",
                              "--max-new-dead", "1"])
    assert code == 1
    lines = out.splitlines()
    assert "| layer | status | units | dead base | dead new | Δ dead | died | revived |" in lines
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[1:-1]] for ln in lines
            if ln.startswith("| fc") and ln.split("|")[2].strip() == "compared"}
    assert rows["fc1"][6] == "8" and rows["fc1"][7] == "3"
    assert rows["fc2"][6] == "1, 12" and rows["fc2"][7] == ""
    assert rows["fc3"][3] == "final"
    assert "- `fc2`: 1, 12" in lines and "- `fc1`: 8" in lines
    assert any(ln.startswith("Gate: **FAILED**") and "--max-new-dead 1%" in ln for ln in lines)


def _drift_rows(sd_b, sd_n, layer):
    """weight_norm drifts by hand: per unit ‖W[i]‖ on both sides, spread = population std of base."""
    wb = [math.sqrt(sum(float(v) ** 2 for v in row)) for row in sd_b[f"{layer}.weight"]]
    wn = [math.sqrt(sum(float(v) ** 2 for v in row)) for row in sd_n[f"{layer}.weight"]]
    mean = sum(wb) / len(wb)
    sd = math.sqrt(sum((v - mean) ** 2 for v in wb) / len(wb))
    rows = [(abs(n - b) / sd, i, b, n) for i, (b, n) in enumerate(zip(wb, wn, strict=True)) if abs(n - b) > 1e-9]
    return sorted(rows, key=lambda r: -r[0])


def test_json_fields_and_drift_measure(case, run_cli):
    code, out, err = run_cli(["compare", case["base_json"], case["new_json"], "--format", "json", "--top", "10"])
    assert code == 0, err
    d = json.loads(out)
    assert d["schema"] == "fitcli.compare/1" and d["command"] == "compare"
    assert d["tool"]["name"] == "fitcli" and d["tool"]["version"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", d["created"])
    assert "standard deviation" in d["drift_measure"]
    for side in ("base", "new"):
        assert set(d[side]) >= {"kind", "source", "model", "data", "settings", "summary"}
        assert d[side]["settings"]["tau"] == 0.0
    lay_keys = {"name", "status", "units", "units_base", "units_new", "dead_fraction_base", "dead_fraction_new",
                "dead_fraction_change", "died", "revived", "drifts"}
    assert all(lay_keys <= set(lay) for lay in d["layers"])
    assert set(d["summary"]) >= {"units_compared", "died", "revived", "died_percent", "base_only", "new_only",
                                 "units_differ", "largest_drifts"}
    for layer in HIDDEN:
        want = _drift_rows(case["base_sd"], case["new_sd"], layer)
        got = next(x for x in d["layers"] if x["name"] == layer)["drifts"]["weight_norm"]
        assert [r["unit"] for r in got] == [i for _, i, _, _ in want][:10]
        for r, (drift, _, b, n) in zip(got, want[:10], strict=True):
            assert r["base"] == pytest.approx(b, rel=1e-5) and r["new"] == pytest.approx(n, rel=1e-5, abs=1e-7)
            assert r["change"] == pytest.approx(n - b, abs=2e-6)  # float32 norms in the report
            assert r["drift"] == pytest.approx(drift, rel=1e-4, abs=1e-5)
    fc1_units = [r["unit"] for r in next(x for x in d["layers"] if x["name"] == "fc1")["drifts"]["weight_norm"]]
    assert sorted(fc1_units) == [3, 8]  # the only rows of fc1 the test changed
    assert {r["metric"] for r in d["summary"]["largest_drifts"]} <= set(d["base"]["settings"]["metrics"])


def test_layers_on_one_side_and_resized_layers_are_listed(case):
    from fitcli.comparison import compare

    base = case["reports"]["base"].to_dict()
    new = json.loads(json.dumps(case["reports"]["new"].to_dict()))
    new["layers"] = [x for x in new["layers"] if x["name"] != "fc2"]
    fc1 = next(x for x in new["layers"] if x["name"] == "fc1")
    fc1["units"] = 30  # pruned: two units fewer, indices no longer line up
    fc1["metrics"] = {k: v[:30] for k, v in fc1["metrics"].items()}
    fc1["dead"] = [i for i in fc1["dead"] if i < 30]
    extra = json.loads(json.dumps(fc1))
    extra["name"] = "fc9"
    new["layers"].append(extra)
    cmp = compare(base, new, max_new_dead=50)
    by = {lay.name: lay for lay in cmp.layers}
    assert [lay.name for lay in cmp.layers] == ["fc1", "fc2", "fc3", "fc9"]
    assert by["fc1"].status == "units_differ" and (by["fc1"].units_base, by["fc1"].units_new) == (32, 30)
    assert by["fc1"].died is None and by["fc1"].drifts == {} and "32 in base, 30 in new" in by["fc1"].note
    assert by["fc2"].status == "base_only" and by["fc2"].dead_base == [5, 20] and by["fc2"].units_new is None
    assert by["fc9"].status == "new_only" and by["fc9"].units_new == 30
    s = cmp.summary
    assert s["base_only"] == ["fc2"] and s["new_only"] == ["fc9"] and s["units_differ"] == ["fc1"]
    assert s["units_compared"] == 0 and s["died_percent"] is None
    assert cmp.gate.passed is False and "cannot pass on nothing" in cmp.gate.failures[0]  # never passes on nothing
    from fitcli.render.compare import render_compare_markdown

    md = render_compare_markdown(cmp.to_dict())
    assert "| fc1 | units differ | 32 -> 30 |" in md and "| fc9 | new only | - -> 30 |" in md


def test_models_are_audited_with_the_same_settings_and_left_untouched(case):
    from fitcli.comparison import compare

    base, new = case["factory"](), case["factory"]()
    base.load_state_dict(case["base_sd"])
    new.load_state_dict(case["new_sd"])
    before = {k: v.clone() for k, v in new.state_dict().items()}
    rng = torch.get_rng_state()
    cmp = compare(base, new, data=_batches(case["raw"]), max_new_dead=5.0, tau=0.0, metrics=["dormant"])
    assert torch.equal(rng, torch.get_rng_state())  # the caller's global RNG is not reseeded
    assert all(torch.equal(before[k], v) for k, v in new.state_dict().items())
    assert cmp.died == _expected(case)[0]
    assert cmp.gate.passed and cmp.gate.units == 64 and cmp.base.kind == "model"
    with pytest.raises(Exception) as e:
        compare(base, new)
    assert "needs data" in str(e.value) and "--" not in str(e.value)  # the library names no flag


def test_a_report_against_a_checkpoint(case, run_cli):
    code, out, err = run_cli(["compare", case["base_json"], case["new_ckpt"], "--arch", case["arch"],
                              "--data", case["data"], "--format", "json", "-q"])
    assert code == 0, err
    d = json.loads(out)
    assert (d["base"]["kind"], d["new"]["kind"]) == ("report", "model")
    assert {lay["name"]: lay["died"] for lay in d["layers"] if lay["died"] is not None} == _expected(case)[0]


def test_usage_errors(case, run_cli, tmp_path):
    code, _, err = run_cli(["compare", case["base_ckpt"], case["new_ckpt"], "--arch", case["arch"]])
    assert code == 2 and "--data" in err and "Traceback" not in err
    code, _, err = run_cli(["compare", case["base_ckpt"], case["new_ckpt"], "--data", case["data"]])
    assert code == 2 and "--arch" in err
    code, _, err = run_cli(["compare", case["base_json"], case["new_json"], "--format", "csv"])
    assert code == 2 and "csv" in err
    code, _, err = run_cli(["compare", case["base_json"], case["new_json"], "--max-new-dead", "-1"])
    assert code == 2 and "--max-new-dead" in err
    before = case["base_json"].read_bytes()
    code, _, err = run_cli(["compare", case["base_json"], case["new_json"], "-o", case["base_json"]])
    assert code == 2 and "refusing to overwrite" in err
    assert case["base_json"].read_bytes() == before
    code, _, err = run_cli(["compare", tmp_path / "missing.json", case["new_json"]])
    assert code == 3 and "not found" in err
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema": "something/1"}))
    code, _, err = run_cli(["compare", other, case["new_json"]])
    assert code == 3 and "not a fitcli report" in err


def test_output_file_holds_the_json_comparison(case, run_cli, tmp_path):
    out_path = tmp_path / "cmp.json"
    code, out, err = run_cli(["compare", case["base_json"], case["new_json"], "-o", out_path, "--max-new-dead", "10"])
    assert code == 0, err
    d = json.loads(out_path.read_text())
    assert d["schema"] == "fitcli.compare/1" and d["gate"]["passed"] is True
    assert {x["name"]: x["died"] for x in d["layers"]}["fc2"] == [1, 12]
    assert "fc2" in out and "comparison written to" in err  # the table still went to stdout
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_html_is_the_renderers_page_or_a_clear_usage_error(case, run_cli):
    code, out, err = run_cli(["compare", case["base_json"], case["new_json"], "--format", "html"])
    if code == 0:  # the HTML renderer handles fitcli.compare/1
        assert "<html" in out.lower()
    else:
        assert code == 2 and "--format html" in err and "Traceback" not in err


def test_library_input_errors_name_no_flag(case):
    from fitcli.comparison import compare
    from fitcli.errors import UsageError

    base = case["reports"]["base"].to_dict()
    with pytest.raises(UsageError, match="not a fitcli report"):
        compare({"schema": "other/1"}, base)
    bad = json.loads(json.dumps(base))
    bad["layers"] = [{"name": "fc1"}]
    with pytest.raises(UsageError, match="report schema"):
        compare(bad, base)
    blocks = json.loads(json.dumps(base))
    blocks["command"], blocks["layers"] = "blocks", []
    with pytest.raises(UsageError, match="blocks report"):
        compare(base, blocks)
    for kw in ({"max_new_dead": float("nan")}, {"max_new_dead": -1}, {"top": -1}):
        with pytest.raises(UsageError) as e:
            compare(base, base, **kw)
        assert "--" not in e.value.message
