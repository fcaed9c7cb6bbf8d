"""A config file found in a parent folder (or given with --config) never changes a run silently:
stderr names the file and the settings taken from it, and the report records both (``config``)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

SM = Path(__file__).resolve().parent.parent / "sample_models"
MLP = str(SM / "mlp.safetensors")
ARGS = ["score", MLP, "--arch", f"{SM / 'models.py'}:mlp", "--data", str(SM / "mlp_data.safetensors"),
        "--device", "cpu", "--format", "json"]
SCHEMA = Path(__file__).resolve().parent.parent / "fitcli" / "schema" / "report.schema.json"


@pytest.fixture
def nested(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp/fitcli.toml (max_dead = 1, metrics), the run in tmp/a/b."""
    (tmp_path / "fitcli.toml").write_text('max_dead = 1\nmetrics = ["act_mean", "dormant"]\n')
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    return tmp_path / "fitcli.toml"


def _notes(err: str) -> list[str]:
    return [line for line in err.splitlines() if "settings from" in line or "config file" in line]


def test_parent_config_is_announced_and_recorded(run_cli, nested):
    code, out, err = run_cli(ARGS)
    assert code == 1, err  # the 4 planted dead units are 6.25 % > max_dead = 1 % from the file
    notes = _notes(err)
    assert len(notes) == 1, err
    assert str(nested.resolve()) in notes[0]
    assert "max_dead = 1" in notes[0] and 'metrics = ["act_mean", "dormant"]' in notes[0]
    report = json.loads(out)
    assert report["config"] == {"path": str(nested.resolve()), "keys": ["max_dead", "metrics"]}
    assert report["settings"]["metrics"] == ["act_mean", "dormant"]
    jsonschema.validate(report, json.loads(SCHEMA.read_text()))


def test_a_flag_that_wins_is_not_listed_as_from_the_file(run_cli, nested):
    code, out, err = run_cli([*ARGS, "--max-dead", "50"])
    assert code == 0, err
    (note,) = _notes(err)
    assert "max_dead = 1" not in note and "metrics =" in note
    assert "overrides max_dead" in note
    assert json.loads(out)["config"]["keys"] == ["metrics"]


def test_pyproject_section_and_config_flag_are_named(run_cli, tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.fitcli]\ntop = 3\n')
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(ARGS)
    assert code == 0, err
    assert json.loads(out)["config"] == {"path": str((tmp_path / "pyproject.toml").resolve()), "keys": ["top"]}
    assert "top = 3" in _notes(err)[0]
    other = tmp_path / "elsewhere.toml"
    other.write_text("tau = 0.0\n")
    code, out, err = run_cli([*ARGS, "--config", str(other)])
    assert code == 0, err
    assert json.loads(out)["config"] == {"path": str(other.resolve()), "keys": ["tau"]}
    assert str(other.resolve()) in _notes(err)[0]


def test_quiet_keeps_stderr_clean_but_the_report_records(run_cli, nested):
    code, out, err = run_cli([*ARGS, "--quiet"])
    assert code == 1
    assert _notes(err) == []
    assert json.loads(out)["config"]["keys"] == ["max_dead", "metrics"]


def test_no_config_file_no_note_no_field(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if any((p / "fitcli.toml").exists() or (p / "pyproject.toml").exists() for p in (tmp_path, *tmp_path.parents)):
        pytest.skip("a config file above the temporary folder")  # the machine's layout, not fitcli
    code, out, err = run_cli(ARGS)
    assert code == 0, err
    assert _notes(err) == [] and "config" not in json.loads(out)
