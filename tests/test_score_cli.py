"""``fitcli score`` and ``fitcli gate`` through ``fitcli.cli.main`` in-process.

Formats, the report file, gating exit codes, configuration files, usage errors and the runs that
can only do part of the work (no --arch, no targets). Paths are absolute, so the cwd never
matters unless a test sets it on purpose (config discovery).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import signal
from pathlib import Path

import pytest

from fitcli import report as rep
from fitcli.cli import main
from fitcli.metrics.registry import load_registry

REPO = Path(__file__).resolve().parents[1]
SM = REPO / "sample_models"
MLP = str(SM / "mlp.safetensors")
MLP_ARCH = f"{SM / 'models.py'}:mlp"
MLP_DATA = str(SM / "mlp_data.safetensors")
MLP_BASE = str(SM / "mlp_init.safetensors")
BASE_ARGS = ["score", MLP, "--arch", MLP_ARCH, "--data", MLP_DATA, "--device", "cpu"]


@pytest.fixture(scope="module")
def _truth() -> dict:
    return json.loads((SM / "truth.json").read_text())


@pytest.fixture
def _cli(capsys, monkeypatch):
    """_cli(args) -> (exit code, stdout, stderr)."""
    monkeypatch.delenv("FITCLI_VERBOSE", raising=False)

    def run(args: list[str]) -> tuple[int, str, str]:
        capsys.readouterr()
        old = signal.getsignal(signal.SIGTERM)
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            signal.signal(signal.SIGTERM, old)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def _dead_pairs(truth: dict) -> list[tuple[str, int]]:
    return sorted((lay, u) for lay, units in truth["mlp"]["dead"].items() for u in units)


def _ranked_rows(text: str) -> list[tuple[int, str, int, str]]:
    """(#, layer, unit, rest of line) of the ranked table in the terminal output."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if "Least-fit units by" in line)
    rows = []
    for line in lines[start + 1:]:
        m = re.match(r"^\s*(\d+)\s*[│|]\s*(\S+)\s*[│|]\s*(\d+)\s*[│|](.*)$", line)
        if m:
            rows.append((int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)))
        elif rows and line.strip() and not set(line.strip()) <= set("━╇┃─┼"):
            break
    return rows


# ---- formats ------------------------------------------------------------------------------------


def test_table_shows_planted_dead_units_at_the_top(_cli, _truth):
    code, out, err = _cli(BASE_ARGS + ["--top", "8"])
    assert code == 0, err
    assert "4 of 64 units dead" in out
    assert "Least-fit units by taylor" in out
    rows = _ranked_rows(out)
    assert [r[0] for r in rows] == list(range(1, 9))
    dead = _dead_pairs(_truth)
    assert sorted((r[1], r[2]) for r in rows[:4]) == dead
    assert all("dead" in r[3] for r in rows[:4])
    assert not any("dead" in r[3] for r in rows[4:])


def test_table_keeps_dead_units_at_the_top_with_a_baseline(_cli, _truth):
    """--baseline adds weight_change_rel, which is 0/0 (null) for units whose initial weights are
    all zero (the planted ones). That must not remove them from the ranking by taylor, whose
    value for them is a finite 0."""
    code, out, err = _cli(BASE_ARGS + ["--baseline", MLP_BASE, "--top", "8"])
    assert code == 0, err
    rows = _ranked_rows(out)
    assert sorted((r[1], r[2]) for r in rows[:4]) == _dead_pairs(_truth)


def test_json_stdout_is_pure_and_follows_the_schema(_cli):
    code, out, err = _cli(BASE_ARGS + ["--format", "json"])
    assert code == 0, err
    report = json.loads(out)  # the whole stdout, nothing else on it
    rep.validate(report)
    assert report["schema"] == "fitcli.report/1"
    assert report["summary"]["dead"] == 4 and report["summary"]["units"] == 64
    for key in ("skipped", "unsupported", "metric_info"):
        assert key in report
    assert report["unsupported"] == []
    assert {s["metric"] for s in report["skipped"]} == {"weight_change", "weight_change_rel"}
    assert all("baseline" in s["reason"] for s in report["skipped"])
    assert set(report["metric_info"]) == set(report["settings"]["metrics"])
    for name, info in report["metric_info"].items():
        assert info["description"], name
    assert "{" not in err


def test_resmlp_report_lists_what_it_did_not_audit(_cli, _truth):
    info = _truth["resmlp"]
    code, out, err = _cli(["score", REPO / info["checkpoint"], "--arch", f"{SM / 'models.py'}:resmlp",
                           "--data", REPO / info["data"], "--device", "cpu", "--format", "json",
                           "--metric", "act_mean", "--metric", "dormant",
                           "--layer", "embed", "--layer", "blocks.*.fc_*", "--layer", "head"])
    assert code == 0, err
    report = json.loads(out)
    rep.validate(report)
    assert all(u["reason"] for u in report["unsupported"])
    # every Linear layer, asked for by name (a transformer's default is its heads, MLP channels and blocks)
    assert [lay["name"] for lay in report["layers"]] == list(info["layers"])
    # MultiheadAttention's out_proj is never called as a module: it is audited through the heads
    # (opt-in layers blocks.N.attn.heads), listed here as not among the layers asked for
    not_audited = {x["name"]: x["reason"] for x in report["coverage"]["not_audited"]}
    for u in info["unsupported"]:
        assert not_audited[u.removesuffix(".out_proj") + ".heads"] == "not among the layers asked for"


def test_markdown(_cli, _truth):
    code, out, err = _cli(BASE_ARGS + ["--format", "markdown", "--top", "5"])
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("## fitcli score")
    assert any(line.startswith("**4 of 64 units dead (6.2%)**") for line in lines)
    assert any(line.startswith("| fc1 | Linear | 32 | 2 | 6.2% | relu1 |") for line in lines)
    assert any(line.startswith("| fc2 | Linear | 32 | 2 | 6.2% | relu2 |") for line in lines)
    assert any(line.startswith("| fc3 | Linear | 4 | final |") for line in lines)
    ranked = [line for line in lines if re.match(r"^\| \d+ \| ", line)]
    assert len(ranked) == 5
    top4 = sorted((r.split("|")[2].strip(), int(r.split("|")[3])) for r in ranked[:4])
    assert top4 == _dead_pairs(_truth)
    assert all(r.rstrip().endswith("| yes |") for r in ranked[:4])
    assert not ranked[4].rstrip().endswith("| yes |")
    assert "Skipped:" in out and "weight_change" in out


def test_csv_one_row_per_unit_with_metric_columns(_cli, _truth):
    code, out_json, err = _cli(BASE_ARGS + ["--format", "json"])
    assert code == 0, err
    report = json.loads(out_json)
    code, out, err = _cli(BASE_ARGS + ["--format", "csv"])
    assert code == 0, err
    rows = list(csv.reader(io.StringIO(out)))
    header, body = rows[0], rows[1:]
    assert header[:4] == ["layer", "unit", "dead", "nonfinite"]
    assert set(header[4:]) == set(report["settings"]["metrics"])
    assert len(body) == sum(_truth["mlp"]["layers"].values())  # 32 + 32 + 4
    seen = [(r[0], int(r[1])) for r in body]
    assert seen == [(lay, u) for lay, n in _truth["mlp"]["layers"].items() for u in range(n)]
    dead = set(_dead_pairs(_truth))
    by_layer = {lay["name"]: lay for lay in report["layers"]}
    for r in body:
        lay, u = r[0], int(r[1])
        assert r[2] == ("1" if (lay, u) in dead else "0")
        for name, cell in zip(header[4:], r[4:], strict=True):
            want = by_layer[lay]["metrics"].get(name)
            if want is None:  # metric absent for this layer (weight_norm_out of the final layer)
                assert cell == ""
            else:
                assert float(cell) == pytest.approx(want[u], rel=1e-12, abs=0), (lay, u, name)


def test_output_writes_the_same_report(_cli, tmp_path):
    path = tmp_path / "report.json"
    code, out, err = _cli(BASE_ARGS + ["--output", path])
    assert code == 0, err
    assert "Least-fit units" in out  # stdout still carries the table
    written = json.loads(path.read_text())
    rep.validate(written)
    code, out, err = _cli(BASE_ARGS + ["--format", "json"])
    assert code == 0, err
    printed = json.loads(out)
    written.pop("created")
    printed.pop("created")
    assert written == printed
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


# ---- gating -------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, code", [
    (["--max-dead", "1"], 1),
    (["--max-dead", "50"], 0),
    (["--max-dead", "6.25"], 0),  # 4/64 = 6.25 %: not *more* than the threshold
    (["--max-dead-layer", "5"], 1),  # fc1 and fc2: 2/32 = 6.25 % each
    (["--max-dead-layer", "10"], 0),
    (["--max-dead", "50", "--max-dead-layer", "5"], 1),
])
def test_score_gate_exit_codes(_cli, flags, code):
    got, out, err = _cli(BASE_ARGS + ["--format", "json", "--metric", "dormant"] + flags)
    assert got == code, err
    report = json.loads(out)  # the report is printed even when the gate fails
    rep.validate(report)
    assert report["gate"]["passed"] is (code == 0)
    if code == 1:
        assert "gate failed" in err
        assert report["gate"]["failures"]
    else:
        assert "gate failed" not in err


@pytest.fixture(scope="module")
def _saved_report(tmp_path_factory) -> str:
    """A report written by `fitcli score --output` (scored once for the module)."""
    path = tmp_path_factory.mktemp("gate") / "saved.json"
    old = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as e:
            main(BASE_ARGS + ["--metric", "dormant", "--metric", "act_mean", "--output", str(path), "--quiet",
                              "--format", "csv"])
    finally:
        signal.signal(signal.SIGTERM, old)
    assert e.value.code == 0
    return path.read_text()


@pytest.fixture
def _saved(_saved_report, tmp_path) -> Path:
    path = tmp_path / "saved.json"
    path.write_text(_saved_report)
    return path


@pytest.mark.parametrize("flags, code", [
    (["--max-dead", "1"], 1),
    (["--max-dead", "50"], 0),
    (["--max-dead-layer", "5"], 1),
    (["--max-dead-layer", "7"], 0),
])
def test_gate_command_on_a_saved_report(_cli, _saved, flags, code):
    got, out, err = _cli(["gate", _saved] + flags)
    assert got == code, (out, err)
    assert "4/64 units dead" in out
    assert ("gate passed" in out) is (code == 0)


def test_gate_json_format(_cli, _saved):
    code, out, err = _cli(["gate", _saved, "--max-dead", "1", "--format", "json"])
    assert code == 1
    g = json.loads(out)
    assert g["passed"] is False and g["max_dead"] == 1


def test_gate_without_thresholds_is_a_usage_error(_cli, _saved):
    code, out, err = _cli(["gate", _saved])
    assert code == 2
    assert "--max-dead" in err and out == ""


def test_gate_uses_thresholds_stored_in_the_report(_cli, tmp_path):
    path = tmp_path / "gated.json"
    code, _, err = _cli(BASE_ARGS + ["--metric", "dormant", "--format", "json", "--output", path,
                                     "--max-dead-layer", "50"])
    assert code == 0, err
    assert _cli(["gate", path])[0] == 0


@pytest.mark.parametrize("content", [
    None,  # missing file
    "this is not json {",
    "[1, 2, 3]",
    json.dumps({"schema": "something/else", "summary": {}}),
    json.dumps({"schema": "fitcli.report/1", "layers": "nope"}),
    "",
])
def test_gate_on_an_unreadable_report_is_an_input_error(_cli, tmp_path, content):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    code, out, err = _cli(["gate", path, "--max-dead", "5"])
    assert code == 3, (out, err)
    assert "error" in err and "Traceback" not in err
    assert out == ""


# ---- configuration ------------------------------------------------------------------------------


def _toml_lines(**kw) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in kw.items())


CFG = dict(arch=MLP_ARCH, data=MLP_DATA, device="cpu", format="json", max_dead=1.0,
           metrics=["act_mean", "dormant"])


def test_config_from_fitcli_toml(_cli, tmp_path, monkeypatch):
    (tmp_path / "fitcli.toml").write_text(_toml_lines(**CFG))
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(["score", MLP])
    assert code == 1, err  # max_dead = 1 % from the file; 6.25 % are dead
    report = json.loads(out)  # format = "json" from the file
    assert report["settings"]["metrics"] == ["act_mean", "dormant"]
    assert report["gate"]["max_dead"] == 1.0
    code, out, err = _cli(["score", MLP, "--max-dead", "50"])  # the flag wins
    assert code == 0, err
    assert json.loads(out)["gate"]["max_dead"] == 50.0
    code, out, err = _cli(["score", MLP, "--format", "csv"])
    assert out.startswith("layer,unit,dead,nonfinite,act_mean,dormant\n")


def test_config_from_pyproject_tool_section(_cli, tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("[project]\nname = \"x\"\n\n[tool.fitcli]\n" + _toml_lines(**CFG))
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)  # the nearest pyproject.toml, found walking up
    code, out, err = _cli(["score", MLP])
    assert code == 1, err
    assert json.loads(out)["settings"]["metrics"] == ["act_mean", "dormant"]
    code, out, err = _cli(["score", MLP, "--max-dead", "50"])
    assert code == 0, err


def test_config_via_flag(_cli, tmp_path, monkeypatch):
    conf = tmp_path / "conf" / "audit.toml"
    conf.parent.mkdir()
    conf.write_text(_toml_lines(**CFG))
    work = tmp_path / "work"
    work.mkdir()
    (work / "fitcli.toml").write_text(_toml_lines(max_dead=50.0))  # must lose to --config
    monkeypatch.chdir(work)
    code, out, err = _cli(["score", MLP, "--config", conf])
    assert code == 1, err
    assert json.loads(out)["settings"]["metrics"] == ["act_mean", "dormant"]
    code, out, err = _cli(["score", MLP, "--config", conf, "--max-dead", "50", "--metric", "dormant"])
    assert code == 0, err
    assert json.loads(out)["settings"]["metrics"] == ["dormant"]
    # weight metrics alone audit no unit's activity: a dead-unit gate does not pass on nothing
    code, out, err = _cli(["score", MLP, "--config", conf, "--max-dead", "50", "--metric", "weight_norm"])
    assert code == 1 and "no unit was audited" in err
    assert json.loads(out)["settings"]["metrics"] == ["weight_norm"]


def test_config_unknown_key_is_a_usage_error(_cli, tmp_path, monkeypatch):
    (tmp_path / "fitcli.toml").write_text(_toml_lines(max_dad=1.0))
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(["score", MLP])
    assert code == 2
    assert "max_dead" in err and out == ""


# ---- usage errors -------------------------------------------------------------------------------


def test_unknown_metric_suggests_a_close_match(_cli):
    code, out, err = _cli(BASE_ARGS + ["--metric", "taylr"])
    assert code == 2
    assert out == ""
    assert "taylr" in err and "taylor" in err.replace("taylr", "")
    assert "Traceback" not in err


def test_unknown_layer_glob_is_a_usage_error(_cli):
    code, out, err = _cli(BASE_ARGS + ["--layer", "fc9*"])
    assert code == 2
    assert out == ""
    assert "fc9*" in err


def test_layer_glob_selects_layers(_cli):
    code, out, err = _cli(BASE_ARGS + ["--layer", "fc[12]", "--format", "json"])
    assert code == 0, err
    assert [lay["name"] for lay in json.loads(out)["layers"]] == ["fc1", "fc2"]


def test_rank_by_changes_the_ranking_metric(_cli):
    code, out, err = _cli(BASE_ARGS + ["--format", "json", "--rank-by", "act_mean", "--top", "64"])
    assert code == 0, err
    report = json.loads(out)
    assert report["settings"]["rank_by"] == "act_mean"
    # expected: per-layer l2-normalised act_mean over the non-final layers, ascending
    rows = []
    for lay in report["layers"]:
        if lay["final"]:
            continue
        vals = lay["metrics"]["act_mean"]
        norm = math.sqrt(sum(v * v for v in vals))
        rows += [(v / norm, lay["name"], i, v) for i, v in enumerate(vals)]
    rows.sort()
    got = [(r["layer"], r["unit"]) for r in report["ranked"]]
    assert got == [(r[1], r[2]) for r in rows]
    for r, want in zip(report["ranked"], rows, strict=True):
        assert r["value"] == want[3] and r["normalized"] == pytest.approx(want[0], rel=1e-12)
    code, out, err = _cli(BASE_ARGS + ["--format", "json", "--top", "64"])
    default = json.loads(out)
    assert default["settings"]["rank_by"] == "taylor"
    assert [(r["layer"], r["unit"]) for r in default["ranked"]] != got
    code, out, err = _cli(BASE_ARGS + ["--rank-by", "act_mean"])
    assert "Least-fit units by act_mean" in out


def test_rank_by_a_metric_not_computed_is_a_usage_error(_cli):
    code, out, err = _cli(BASE_ARGS + ["--metric", "act_mean", "--rank-by", "taylor"])
    assert code == 2
    assert "taylor" in err and out == ""


# ---- partial runs -------------------------------------------------------------------------------


def test_bare_state_dict_runs_weight_metrics_only(_cli):
    code, out, err = _cli(["score", MLP, "--format", "json"])
    assert code == 0, err
    report = json.loads(out)
    rep.validate(report)
    reg = load_registry()
    computed = set(report["settings"]["metrics"])
    assert "weight_norm" in computed
    for m in computed:
        assert reg[m].cls.needs <= {"weights"}, m
    skipped = {s["metric"]: s["reason"] for s in report["skipped"]}
    for m in ("act_mean", "act_var", "dormant", "taylor", "grad_norm", "apoz"):
        assert m in skipped, m
        assert "architecture" in skipped[m]
    assert report["summary"]["dead"] == 0 and report["summary"].get("dead_known") is False
    lay = {x["name"]: x for x in report["layers"]}
    assert set(lay) == {"fc1", "fc2", "fc3"}
    assert lay["fc1"]["metrics"]["weight_norm"][3] == 0.0  # planted dead unit: all-zero weights


def test_data_without_targets_skips_loss_metrics(_cli):
    code, out, err = _cli(["score", MLP, "--arch", MLP_ARCH, "--data", "random:16,n=64", "--device", "cpu",
                           "--format", "json"])
    assert code == 0, err
    report = json.loads(out)
    rep.validate(report)
    assert report["data"]["samples"] == 64
    skipped = {s["metric"]: s["reason"] for s in report["skipped"]}
    for m in ("taylor", "taylor_delta", "grad_norm", "output_corr"):
        assert m in skipped, m
        assert "target" in skipped[m], skipped[m]
    computed = set(report["settings"]["metrics"])
    assert {"act_mean", "dormant", "weight_norm"} <= computed
    assert not computed & {"taylor", "taylor_delta", "grad_norm", "output_corr"}
    assert report["settings"]["rank_by"] == "act_mean"  # taylor unavailable
    dead = {x["name"]: x["dead"] for x in report["layers"] if not x["final"]}
    assert {3, 17} <= set(dead["fc1"]) and {5, 20} <= set(dead["fc2"])
