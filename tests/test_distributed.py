"""Audits under torchrun: two gloo processes on the CPU give the single-process report.

Real processes: ``torchrun --nproc-per-node 2 -m fitcli ...`` for score (with --validate) and
ablate (mean mode, whole layers, a unit subset), compared field by field with the same command
run in one process (relative 1e-6 for float64 sums, exact for counts and dead sets). The failure
test starts the two ranks itself with torchrun's environment variables (torchrun would turn
every worker's exit code into its own 1), so each rank's exit code and message can be checked.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import fitcli
from fitcli import distributed

REL = 1e-6
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "FITCLI_VERBOSE")}
    env.update(OMP_NUM_THREADS="1", **more)
    return env


def _torchrun(repo: Path, args: list[str]) -> subprocess.CompletedProcess:
    if not TORCHRUN.exists():  # the venv always has it (torch's console script)
        pytest.fail(f"torchrun not found next to {sys.executable}")
    cmd = [str(TORCHRUN), "--nproc-per-node", "2", "--master-port", str(_port()), "-m", "fitcli", *args]
    return subprocess.run(cmd, cwd=repo, env=_env(), capture_output=True, text=True, timeout=120)


def _close(a, b, where: str) -> None:
    """Equal within REL (relative, float64 sums in another order); None/str/int exactly."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=REL, abs_tol=1e-12), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _same_report(single: dict, dist: dict) -> None:
    assert dist["distributed"]["ranks"] == 2 and "distributed" not in single
    assert dist["data"] == single["data"]  # global sample and batch counts
    for key in ("layers", "summary", "ranked", "skipped", "coverage", "validation"):
        if key in single or key in dist:
            _close(single[key], dist[key], key)
    for a, b in zip(single["layers"], dist["layers"], strict=True):
        assert a["dead"] == b["dead"] and a.get("removable") == b.get("removable")


def test_torchrun_score_with_validation_equals_one_process(repo, truth, tmp_path, run_cli, in_repo):
    t = truth["mlp"]
    # 11 batches (the last one short): rank 0 gets 6, rank 1 gets 5; entropy needs two passes
    args = ["score", t["checkpoint"], "--arch", t["arch"], "--data", t["data"], "--batch-size", "48",
            "--validate", "--format", "json", "--device", "cpu"]
    out = tmp_path / "dist.json"
    proc = _torchrun(repo, [*args, "-o", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    dist = json.loads(proc.stdout)  # one JSON document: rank 1 printed nothing
    assert json.loads(out.read_text()) == dist
    assert proc.stderr.count(f"report written to {out}") == 1
    single = run_cli([*args, "-q"])
    assert single.code == 0, single.stderr
    ref = json.loads(single.stdout)
    assert ref["data"]["batches"] == 11 and ref["data"]["samples"] == 512
    assert "act_entropy" in ref["settings"]["metrics"] and "taylor" in ref["settings"]["metrics"]
    _same_report(ref, dist)
    assert dist["layers"][0]["dead"] == sorted(t["dead"]["fc1"])


@pytest.mark.parametrize("batch_size", ["100", "100000"])  # 6 batches: sharded; 1 batch: units partitioned
def test_torchrun_ablate_mean_mode_equals_one_process(repo, truth, tmp_path, run_cli, in_repo, batch_size):
    t = truth["cnn"]
    args = ["ablate", t["checkpoint"], "--arch", t["arch"], "--data", t["data"], "--batch-size", batch_size,
            "--layer", "conv2", "--layer", "fc1", "--mode", "mean", "--whole-layer", "--units", "0-11",
            "--format", "json", "--device", "cpu"]
    proc = _torchrun(repo, args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dist = json.loads(proc.stdout)
    ref = json.loads(run_cli([*args, "-q"]).stdout)
    _same_report(ref, dist)
    for a, b in zip(ref["layers"], dist["layers"], strict=True):
        _close(a["layer_ablation"], b["layer_ablation"], a["name"])
        assert a["ablated_units"] == b["ablated_units"] == list(range(12))


FAILING_DATA = '''
import os
import torch

def make():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    y = torch.randint(0, 4, (256,), generator=g)
    for i in range(0, 256, 32):
        if os.environ.get("RANK") == "1" and i == 96:
            raise ValueError("batch 3 is unreadable here")
        yield x[i : i + 32], y[i : i + 32]
'''


def test_a_rank_that_raises_ends_every_rank_with_its_code_and_message(repo, truth, tmp_path):
    (tmp_path / "failing.py").write_text(FAILING_DATA)
    t = truth["mlp"]
    args = [sys.executable, "-m", "fitcli", "score", str(repo / t["checkpoint"]), "--arch", str(repo / t["arch"]),
            "--data", f"{tmp_path / 'failing.py'}:make", "--device", "cpu", "--format", "json", "-q"]
    port = str(_port())
    start = time.monotonic()
    procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port, FITCLI_DIST_TIMEOUT="30"))
             for r in (0, 1)]
    outs = [p.communicate(timeout=60) for p in procs]
    elapsed = time.monotonic() - start
    assert [p.returncode for p in procs] == [3, 3], [o[1] for o in outs]  # an input error, on both ranks
    lines = [o[1].strip().splitlines()[0] for o in outs]
    assert lines[0] == lines[1]
    assert "batch 3 is unreadable here" in lines[0] and "(rank 1 of 2)" in lines[0]
    assert outs[0][0] == outs[1][0] == ""  # no report on stdout
    assert elapsed < 20, elapsed  # both ranks gone within seconds: nobody waited for a timeout


def test_shards_are_disjoint_and_cover_every_batch_once():
    batches = list(range(11))
    seen = []
    for r in range(3):
        d = distributed.Dist(group=None, rank=r, world=3, backend="gloo")
        mine = list(distributed.Shard(batches, d))
        assert mine == batches[r::3]
        seen += mine
    assert sorted(seen) == batches


def test_api_takes_a_process_group(tmp_path):
    """A one-rank gloo group through the Python API: the report says so and equals the plain run."""
    import torch.distributed as td

    from fitcli.report import validate

    assert not td.is_initialized()
    td.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
        data = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 40, 16)]
        plain = fitcli.audit(model, data, device="cpu").to_dict()
        grouped = fitcli.audit(model, data, device="cpu", group=td.group.WORLD).to_dict()
        assert grouped["distributed"]["ranks"] == 1 and grouped["distributed"]["backend"] == "gloo"
        _close(plain["layers"], grouped["layers"], "layers")
        assert grouped["data"] == plain["data"] == {"spec": "<list>", "samples": 40, "batches": 3}
        validate(grouped)
    finally:
        td.destroy_process_group()

