"""Rankings follow each metric's direction: the least fit first. On every sample model the planted
dead units (always exactly 0 after their nonlinearity) must lead the ranking of every metric for
which "never active" is the least-fit extreme, whichever way that metric points."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import strapi as api

import fitcli

REPO = Path(__file__).resolve().parents[1]
SM = REPO / "sample_models"

# Metrics where a dead unit takes the least-fit extreme, from the spec's definitions: E|h| = 0,
# dormancy 0, |h·g| = 0 (taylor), APoZ = 1 (lower is fit: the largest first), and no gradient
# through a ReLU unit that is never active (grad_norm, ReLU models only: the resmlp's GELU units
# are dead at z = 0, where GELU' = 0.5, so their weights still get a gradient).
# act_var and act_entropy are 0 too, but so is each model's planted constant unit: it may tie.
STRICT = ("act_mean", "dormant", "taylor", "apoz", "grad_norm")
TIED_WITH_CONSTANT = ("act_var", "act_entropy")
CASES = [(m, metric) for m in ("mlp", "cnn", "resmlp") for metric in STRICT + TIED_WITH_CONSTANT
         if not (m == "resmlp" and metric == "grad_norm")]


@functools.cache
def _scored(name: str) -> str:
    t = json.loads((SM / "truth.json").read_text())[name]
    report = api.score(str(REPO / t["checkpoint"]), arch=str(REPO / t["arch"]), data=str(REPO / t["data"]),
                       device="cpu", metrics=list(STRICT + TIED_WITH_CONSTANT))
    return json.dumps(report)


def _dead(t: dict) -> set[tuple[str, int]]:
    return {(lay, u) for lay, units in t["dead"].items() for u in units}


@pytest.mark.parametrize("name,metric", CASES)
def test_planted_dead_units_rank_first(name, metric, truth):
    t = truth[name]
    dead = _dead(t)
    rows = fitcli.AuditReport.from_dict(json.loads(_scored(name))).ranked(by=metric, top=None)
    head = {(r["layer"], r["unit"]) for r in rows[: len(dead)]}
    if metric in STRICT:
        assert head == dead, f"{name} by {metric}: first {len(dead)} = {sorted(head)}, dead = {sorted(dead)}"
    else:
        constant = (t["constant"]["layer"], t["constant"]["unit"])
        head = {(r["layer"], r["unit"]) for r in rows[: len(dead) + 1]}
        assert dead <= head and head <= dead | {constant}, f"{name} by {metric}: {sorted(head)}"


def test_cli_rank_by_apoz_lists_the_dead_first(truth, in_repo):
    """The command line, as a user types it: APoZ 1.0 (never active) is the least fit."""
    for name in ("mlp", "cnn", "resmlp"):
        t = truth[name]
        dead = _dead(t)
        # the resmlp, a transformer, ranks each kind in its own table: its every layer is its MLP
        # channels (the dead units) and its rows (none dead, none never active)
        kinds = ["--kinds", "mlp,rows"] if name == "resmlp" else []
        res = subprocess.run([sys.executable, "-m", "fitcli", "score", t["checkpoint"], "--arch", t["arch"],
                              "--data", t["data"], "--rank-by", "apoz", "--top", str(len(dead)), "--format", "json",
                              "--device", "cpu", "--metric", "apoz", "--metric", "dormant", "--quiet", *kinds],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        ranked = json.loads(res.stdout)["ranked"]
        rows = [r for r in ranked if r.get("kind") == "rows"]
        ranked = [r for r in ranked if r.get("kind") != "rows"]
        assert {(r["layer"], r["unit"]) for r in ranked} == dead
        assert all(r["value"] == 1.0 and r["dead"] for r in ranked)
        assert all(r["value"] < 1.0 and not r["dead"] for r in rows) and (name != "resmlp" or rows)


def test_validate_uses_the_fitness_orientation(truth):
    """--validate on the MLP: APoZ, negated, agrees with ablation; its bottom 10% holds dead units."""
    t = truth["mlp"]
    report = api.score(str(REPO / t["checkpoint"]), arch=str(REPO / t["arch"]), data=str(REPO / t["data"]),
                       device="cpu", metrics=["apoz", "act_mean"], validate=True)
    v = report["validation"]
    for lay in ("fc1", "fc2"):
        apoz = v["layers"][lay]["metrics"]["apoz"]
        assert apoz["bottom10_overlap"] > 0, (lay, apoz)
    # APoZ and E|h| point opposite ways; oriented, they agree on the sign of their correlation
    a = v["across_layers"]["apoz"]["spearman"]
    m = v["across_layers"]["act_mean"]["spearman"]
    assert a > 0 and m > 0
