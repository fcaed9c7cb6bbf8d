"""CLI basics: inspect, metrics, --help, --version, usage errors (cli.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import fitcli

SAMPLES = ["mlp", "cnn", "resmlp"]

# the registry names are part of the public interface (metrics.md)
REGISTERED = ["weight_norm", "weight_norm_out", "weight_change", "weight_change_rel", "grad_norm", "act_mean",
              "act_var", "act_entropy", "apoz", "dormant", "taylor", "taylor_delta", "output_corr", "composite",
              "ablation"]


def _subprocess(args, cwd, timeout=120):
    env = dict(os.environ)
    env.pop("FITCLI_VERBOSE", None)
    env["PYTHONPATH"] = str(cwd) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "fitcli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("name", SAMPLES)
def test_inspect_table_lists_layers_and_points(name, truth, in_repo, run_cli):
    t = truth[name]
    code, out, err = run_cli(["inspect", t["checkpoint"], "--arch", t["arch"]])
    assert code == 0, err
    assert "Traceback" not in err
    lines = out.splitlines()
    for layer, units in t["layers"].items():
        row = [ln for ln in lines if ln.split("│")[0].strip() == layer]
        assert len(row) == 1, (layer, out)
        cells = [c.strip() for c in row[0].split("│")]
        assert cells[2] == str(units), cells
        assert cells[3] == t["activation_points"][layer], cells
        assert (cells[5] == "✓") == (layer == t["final"]), cells
    assert "fx" in out  # which discovery method was used
    for u in t["unsupported"]:  # MultiheadAttention's out_proj: read as the heads' weights (layer *.heads)
        assert u.removesuffix(".out_proj") + ".heads" in out


@pytest.mark.parametrize("name", SAMPLES)
def test_inspect_json(name, truth, in_repo, run_cli):
    t = truth[name]
    code, out, err = run_cli(["inspect", t["checkpoint"], "--arch", t["arch"], "--format", "json"])
    assert code == 0, err
    info = json.loads(out)
    assert info["model"]["format"] == "safetensors"
    assert info["model"]["arch"] == t["arch"]
    assert len(info["model"]["sha256"]) == 64
    assert info["discovery"]["method"] == "fx"
    heads = [x for x in info["layers"] if x["activation_point_kind"] == "heads"]
    assert all(x["type"] == "Heads" and x["units"] == 2 for x in heads) and len(heads) == (2 if name == "resmlp" else 0)
    hidden = [x["name"] for x in info["layers"] if x["activation_point_kind"] == "hidden"]  # opt-in too
    assert hidden == (["hidden"] if name == "resmlp" else [])
    layers = [x for x in info["layers"] if x["activation_point_kind"] not in ("heads", "hidden")]
    assert [x["name"] for x in layers] == list(t["layers"])
    assert {x["name"]: x["units"] for x in layers} == t["layers"]
    assert {x["name"]: x["activation_point"] for x in layers} == t["activation_points"]
    assert [x["final"] for x in layers] == [False] * (len(layers) - 1) + [True]
    assert layers[-1]["name"] == t["final"]
    assert all(isinstance(x["parameters"], int) and x["parameters"] > 0 for x in layers)
    assert [u["name"] for u in info["unsupported"] if "cannot be hooked" in u["reason"]] == []


def test_inspect_markdown_and_csv(truth, in_repo, run_cli):
    t = truth["mlp"]
    code, out, _ = run_cli(["inspect", t["checkpoint"], "--arch", t["arch"], "--format", "csv"])
    assert code == 0
    rows = [r.split(",") for r in out.strip().splitlines()]
    assert rows[0] == ["layer", "type", "units", "activation_point", "parameters", "final"]
    assert [(r[0], int(r[2]), r[3], r[5]) for r in rows[1:]] == [
        ("fc1", 32, "relu1", "false"), ("fc2", 32, "relu2", "false"), ("fc3", 4, "fc3", "true")]
    code, out, _ = run_cli(["inspect", t["checkpoint"], "--arch", t["arch"], "--format", "markdown"])
    assert code == 0
    assert out.splitlines()[0].startswith("| layer |")
    assert "| fc2 | Linear | 32 | relu2 |" in out


def test_inspect_without_arch_is_weights_only(truth, in_repo, run_cli):
    t = truth["cnn"]
    code, out, err = run_cli(["inspect", t["checkpoint"], "--format", "json"])
    assert code == 0, err
    info = json.loads(out)
    assert info["discovery"]["method"] == "weights"
    assert {x["name"]: x["units"] for x in info["layers"]} == t["layers"]
    assert any("architecture" in n for n in info["discovery"]["notes"])


def test_metrics_json_lists_registry(run_cli):
    code, out, err = run_cli(["metrics", "--format", "json"])
    assert code == 0, err
    rows = json.loads(out)
    by_name = {r["name"]: r for r in rows}
    for name in REGISTERED:
        assert name in by_name, name
        r = by_name[name]
        assert "error" not in r or not r["error"], r
        assert isinstance(r["needs"], list) and r["needs"], r
        assert r["cost"] and r["description"], r
        assert r["entry_point"].startswith("fitcli.metrics."), r
    assert "weights" in by_name["weight_norm"]["needs"]
    assert "activations" in by_name["act_mean"]["needs"]
    assert len(rows) == len(by_name)  # no duplicate names


def test_metrics_table(run_cli):
    code, out, err = run_cli(["metrics"])
    assert code == 0, err
    names = {ln.split("│")[0].strip() for ln in out.splitlines() if "│" in ln}
    assert set(REGISTERED) <= names


def test_version(run_cli):
    code, out, _ = run_cli(["--version"])
    assert code == 0
    assert out.strip() == f"fitcli {fitcli.__version__}"


@pytest.mark.parametrize("argv", [
    ["inspect", "--bogus-option", "x.safetensors"],
    ["--bogus-option"],
    ["no-such-command"],
    ["inspect"],  # MODEL is required
    ["inspect", "x.safetensors", "--format", "yaml"],
    ["score", "x.safetensors", "--batch-size", "0"],
    ["score", "x.safetensors", "--batch-size", "many"],
])
def test_usage_errors_exit_2(argv, run_cli):
    code, out, err = run_cli(argv)
    assert code == 2, (code, out, err)
    assert "Traceback" not in err
    assert err.strip(), "a usage error must say what is wrong"
    assert out == ""


def test_unknown_option_suggests_close_match(in_repo, run_cli):
    code, _, err = run_cli(["inspect", "sample_models/mlp.safetensors", "--fromat", "json"])
    assert code == 2
    assert "--fromat" in err
    assert "--format" in err


def test_help_via_python_m(repo):
    r = _subprocess(["--help"], cwd=repo)
    assert r.returncode == 0, r.stderr
    for cmd in ("score", "ablate", "gate", "inspect", "metrics"):
        assert cmd in r.stdout
    assert "Traceback" not in r.stderr


def test_subprocess_inspect_and_input_error(repo, tmp_path):
    """A real process: inspect works through python -m; a corrupt checkpoint is exit 3, no traceback."""
    r = _subprocess(["inspect", "sample_models/cnn.safetensors", "--arch", "sample_models/models.py:cnn",
                     "--format", "json"], cwd=repo)
    assert r.returncode == 0, r.stderr
    assert [x["name"] for x in json.loads(r.stdout)["layers"]] == ["conv1", "conv2", "fc1", "fc2"]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((repo / "sample_models" / "cnn.safetensors").read_bytes()[:100])
    r = _subprocess(["inspect", str(bad)], cwd=repo)
    assert r.returncode == 3
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("fitcli: error: ")
    assert r.stdout == ""


def test_verbose_shows_traceback(tmp_path, run_cli):
    """cli.md: no traceback unless --verbose."""
    missing = tmp_path / "missing.safetensors"
    code, _, err = run_cli(["inspect", str(missing)])
    assert code == 3 and "Traceback" not in err
    code, _, err = run_cli(["inspect", str(missing), "--verbose"])
    assert code == 3 and "Traceback" in err
