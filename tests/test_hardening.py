"""Hardening: non-finite values, never losing a file, determinism, edge-case data (cli.md, metrics.md).

Every error case checks the contract of ``docs/cli.md``: the right exit code, a message on stderr
that starts with ``fitcli: error:``, and no traceback.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_models"
MLP = SAMPLES / "mlp.safetensors"
MLP_DATA = SAMPLES / "mlp_data.safetensors"
MLP_ARCH = f"{SAMPLES / 'models.py'}:mlp"


# ---- helpers -----------------------------------------------------------------------------------
def strict_json(text: str) -> dict:
    """json.loads that fails the test on NaN/Infinity tokens (not valid JSON)."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"invalid JSON token {c!r} in report"))


def flat(text: str) -> str:
    """Whitespace-normalised text (rich may wrap long lines on stderr)."""
    return " ".join(text.split())


def squash(text: str) -> str:
    """All whitespace removed: rich's 80-column wrapping may split a long path mid-word, and these
    tests check what a message says (test_long_error_message_stays_on_two_lines checks its shape)."""
    return "".join(text.split())


def assert_error(res, code: int, *needles: str) -> None:
    assert res.code == code, f"exit {res.code}, expected {code}\nstdout: {res.stdout}\nstderr: {res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    assert res.stderr.lstrip().startswith("fitcli: error:"), res.stderr
    for n in needles:
        assert squash(n) in squash(res.stderr), f"{n!r} not in stderr: {res.stderr}"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tmp_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def mlp_score(*extra: str) -> list[str]:
    return ["score", str(MLP), "--arch", MLP_ARCH, "--device", "cpu", *map(str, extra)]


@pytest.fixture(scope="module")
def mlp_sd() -> dict[str, torch.Tensor]:
    return load_file(str(MLP))


@pytest.fixture(scope="module")
def mlp_data() -> dict[str, torch.Tensor]:
    return load_file(str(MLP_DATA))


@pytest.fixture
def nonfinite_ckpt(tmp_path, mlp_sd) -> Path:
    """The mlp checkpoint with NaN in row 2 of fc1.weight and +Inf in row 5."""
    sd = {k: v.clone() for k, v in mlp_sd.items()}
    sd["fc1.weight"][2, :] = float("nan")
    sd["fc1.weight"][5, 3] = float("inf")
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    return path


def write_data(tmp_path: Path, inputs: torch.Tensor, targets: torch.Tensor | None, name: str) -> Path:
    path = tmp_path / name
    payload = {"inputs": inputs.contiguous()}
    if targets is not None:
        payload["targets"] = targets.contiguous()
    save_file(payload, str(path))
    return path


def write_module(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


# =================================================================================================
# 1. Non-finite values
# =================================================================================================
NAN_UNIT, INF_UNIT = 2, 5


@pytest.mark.parametrize("arch", [False, True], ids=["bare-state-dict", "with-arch"])
def test_nonfinite_weights_flagged_null_and_not_ranked(arch, nonfinite_ckpt, run_cli):
    args = ["score", str(nonfinite_ckpt), "--device", "cpu", "--format", "json", "--top", "1000"]
    if arch:
        args += ["--arch", MLP_ARCH]
    res = run_cli(args)
    assert res.code == 0, res.stderr
    rep = strict_json(res.stdout)
    fc1 = next(lay for lay in rep["layers"] if lay["name"] == "fc1")
    assert NAN_UNIT in fc1["nonfinite"] and INF_UNIT in fc1["nonfinite"], fc1["nonfinite"]
    wn = fc1["metrics"]["weight_norm"]
    assert wn[NAN_UNIT] is None and wn[INF_UNIT] is None
    assert all(v is not None and math.isfinite(v) for i, v in enumerate(wn) if i not in (NAN_UNIT, INF_UNIT))
    # every null value belongs to a unit listed as non-finite
    for lay in rep["layers"]:
        for name, vals in lay["metrics"].items():
            for i, v in enumerate(vals):
                if v is None and name != "output_corr":
                    assert i in lay["nonfinite"], (lay["name"], name, i)
    ranked = {(r["layer"], r["unit"]) for r in rep["ranked"]}
    assert ranked, "the ranking should still list the finite units"
    assert ("fc1", NAN_UNIT) not in ranked and ("fc1", INF_UNIT) not in ranked
    assert all(math.isfinite(r["value"]) and math.isfinite(r["normalized"]) for r in rep["ranked"])
    # aggregates are over the finite values only
    agg = fc1["aggregate"]["weight_norm"]
    finite = [v for v in wn if v is not None]
    assert agg["mean"] == pytest.approx(sum(finite) / len(finite))


def test_nonfinite_weights_table_mentions_them(nonfinite_ckpt, run_cli):
    res = run_cli(["score", str(nonfinite_ckpt), "--arch", MLP_ARCH, "--device", "cpu"])
    assert res.code == 0, res.stderr
    text = flat(res.stdout)
    assert "non-finite" in text
    assert f"fc1 units {NAN_UNIT}, {INF_UNIT}" in text


def test_nonfinite_weights_output_file_is_strict_json(nonfinite_ckpt, tmp_path, run_cli):
    out = tmp_path / "rep.json"
    res = run_cli(["score", str(nonfinite_ckpt), "--device", "cpu", "--output", str(out), "--quiet"])
    assert res.code == 0, res.stderr
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    rep = strict_json(text)
    from fitcli.report import validate

    validate(rep)


def test_composite_survives_a_nonfinite_unit(nonfinite_ckpt, run_cli):
    """Two non-finite units must not wipe out the composite of the 30 finite units of the layer.

    Weights alone: composite = weight_norm / mean_layer(weight_norm) (the only component), so the
    finite units keep a finite composite proportional to their weight norm, and the ranking by
    composite is not a list of fabricated zeros.
    """
    res = run_cli(["score", str(nonfinite_ckpt), "--device", "cpu", "--format", "json", "--top", "1000",
                   "--rank-by", "composite"])
    assert res.code == 0, res.stderr
    rep = strict_json(res.stdout)
    fc1 = next(lay for lay in rep["layers"] if lay["name"] == "fc1")
    wn, comp = fc1["metrics"]["weight_norm"], fc1["metrics"]["composite"]
    ok = [i for i in range(fc1["units"]) if i not in (NAN_UNIT, INF_UNIT)]
    assert all(comp[i] is not None for i in ok), f"finite units lost their composite: {comp}"
    mean_wn = sum(wn[i] for i in ok) / len(ok)
    expected = [wn[i] / mean_wn for i in ok]
    assert [comp[i] for i in ok] == pytest.approx(expected, rel=1e-6), \
        f"fc1 composite is not weight_norm / mean(weight_norm) over the finite units: {comp}"
    # the least-fit fc1 units by composite are the ones with the smallest weight norm
    fc1_ranked = [r["unit"] for r in rep["ranked"] if r["layer"] == "fc1"]
    assert fc1_ranked == sorted(ok, key=lambda i: (wn[i], i)), fc1_ranked


def test_nonfinite_weights_with_data_is_exit_4(nonfinite_ckpt, run_cli):
    """A NaN weight row in fc1 poisons every logit: the loss is non-finite on every batch."""
    res = run_cli(["score", str(nonfinite_ckpt), "--arch", MLP_ARCH, "--data", str(MLP_DATA), "--device", "cpu",
                   "--max-batches", "2", "--quiet"])
    assert_error(res, 4, "non-finite")
    assert res.stdout.strip() == ""


def test_nan_sample_in_data_completes_and_flags(tmp_path, mlp_data, run_cli):
    x = mlp_data["inputs"].clone()
    x[10, :] = float("nan")
    data = write_data(tmp_path, x, mlp_data["targets"], "nan_one.safetensors")
    res = run_cli(mlp_score("--data", data, "--format", "json", "--top", "1000"))
    assert res.code == 0, res.stderr
    rep = strict_json(res.stdout)
    assert rep["summary"]["nonfinite_loss_batches"] == 1
    assert rep["data"]["samples"] == 512
    flagged = 0
    for lay in rep["layers"]:
        bad = set(lay["nonfinite"])
        flagged += len(bad)
        for name, vals in lay["metrics"].items():
            if name in ("weight_norm", "weight_norm_out"):  # weight metrics do not see the data
                assert all(v is not None for v in vals), (lay["name"], name)
            for i, v in enumerate(vals):
                if v is None and name != "output_corr":
                    assert i in bad, (lay["name"], name, i)
    assert flagged > 0, "a NaN sample reaches every unit's activation statistics: they must be flagged"
    for r in rep["ranked"]:
        lay = next(x for x in rep["layers"] if x["name"] == r["layer"])
        assert r["unit"] not in lay["nonfinite"]
        assert math.isfinite(r["value"])


def test_nan_sample_does_not_fabricate_zero_entropy(tmp_path, mlp_data, run_cli):
    """act_entropy of a unit whose data held a NaN is either flagged (null, listed non-finite) or
    still measured on the finite observations; never a silent 0.0 ('constant unit')."""
    common = ["--metric", "act_entropy", "--layer", "fc1", "--format", "json"]
    clean = run_cli(mlp_score("--data", MLP_DATA, *common))
    assert clean.code == 0, clean.stderr
    clean_h = strict_json(clean.stdout)["layers"][0]["metrics"]["act_entropy"]

    x = mlp_data["inputs"].clone()
    x[10, :] = float("nan")
    data = write_data(tmp_path, x, mlp_data["targets"], "nan_one.safetensors")
    res = run_cli(mlp_score("--data", data, *common))
    assert res.code == 0, res.stderr
    lay = strict_json(res.stdout)["layers"][0]
    h = lay["metrics"]["act_entropy"]
    wrong = [(i, clean_h[i], v) for i, v in enumerate(h)
             if clean_h[i] > 0.5 and not ((v is None and i in lay["nonfinite"]) or (v is not None and abs(v - clean_h[i]) < 0.25))]
    assert not wrong, f"(unit, clean entropy, reported) silently wrong: {wrong[:6]}"


def test_inf_sample_in_data_completes_and_flags(tmp_path, mlp_data, run_cli):
    """One sample with +Inf in one input feature: the run completes (exit 0), the affected units are
    flagged and left out of the ranking; it must not crash."""
    x = mlp_data["inputs"].clone()
    x[10, 0] = float("inf")
    data = write_data(tmp_path, x, mlp_data["targets"], "inf_one.safetensors")
    res = run_cli(mlp_score("--data", data, "--format", "json", "--top", "1000"))
    assert res.code == 0, f"exit {res.code}: {res.stderr}"
    assert "Traceback" not in res.stderr
    rep = strict_json(res.stdout)
    fc1 = next(lay for lay in rep["layers"] if lay["name"] == "fc1")
    assert fc1["nonfinite"], "units that saw +Inf must be flagged"
    for r in rep["ranked"]:
        lay = next(x for x in rep["layers"] if x["name"] == r["layer"])
        assert r["unit"] not in lay["nonfinite"]


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_loss_on_every_batch_is_exit_4(value, tmp_path, mlp_data, run_cli):
    x = torch.full_like(mlp_data["inputs"], value)
    data = write_data(tmp_path, x, mlp_data["targets"], "all_bad.safetensors")
    out = tmp_path / "report.json"
    res = run_cli(mlp_score("--data", data, "--output", out))
    assert_error(res, 4, "non-finite")
    first = res.stderr.strip().splitlines()[0]
    assert "non-finite" in first, res.stderr
    assert not out.exists()


# =================================================================================================
# 2. Nothing lost
# =================================================================================================
def test_output_onto_checkpoint_is_refused(tmp_path, run_cli):
    ckpt = tmp_path / "m.safetensors"
    shutil.copyfile(MLP, ckpt)
    (tmp_path / "sub").mkdir()
    before = ckpt.read_bytes()
    os.symlink(ckpt, tmp_path / "link.safetensors")
    for spelling in (ckpt, tmp_path / "sub" / ".." / "m.safetensors", tmp_path / "link.safetensors"):
        res = run_cli(["score", str(ckpt), "--arch", MLP_ARCH, "--device", "cpu", "--output", str(spelling)])
        assert_error(res, 2, "--output")
        assert ckpt.read_bytes() == before, spelling
        assert (tmp_path / "link.safetensors").is_symlink()
    assert tmp_leftovers(tmp_path) == []


def test_output_onto_checkpoint_relative_spelling(tmp_path, run_cli, monkeypatch):
    ckpt = tmp_path / "m.safetensors"
    shutil.copyfile(MLP, ckpt)
    before = ckpt.read_bytes()
    monkeypatch.chdir(tmp_path)
    res = run_cli(["score", "m.safetensors", "--device", "cpu", "--output", "./m.safetensors"])
    assert_error(res, 2, "--output")
    assert ckpt.read_bytes() == before


def test_output_onto_data_is_refused(tmp_path, run_cli):
    data = tmp_path / "d.safetensors"
    shutil.copyfile(MLP_DATA, data)
    before = data.read_bytes()
    res = run_cli(mlp_score("--data", data, "--max-batches", "1", "--metric", "act_mean", "--output", data))
    assert_error(res, 2, "--output")
    assert data.read_bytes() == before
    assert tmp_leftovers(tmp_path) == []


def test_output_replaces_existing_report_atomically(tmp_path, run_cli):
    out = tmp_path / "report.json"
    out.write_text('{"old": true}\n')
    old_inode = out.stat().st_ino
    res = run_cli(mlp_score("--data", MLP_DATA, "--max-batches", "2", "--output", out, "--quiet"))
    assert res.code == 0, res.stderr
    rep = strict_json(out.read_text())
    assert rep["schema"] == "fitcli.report/1" and "old" not in rep
    assert rep["data"]["batches"] == 2
    # replaced by a rename of a new file, not rewritten in place
    assert out.stat().st_ino != old_inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_written_files_get_the_usual_permissions(tmp_path):
    """A new report gets 0666 less the umask, as ``open()`` would give it (the temporary file is
    0600); a replaced one keeps the mode it had."""
    from fitcli import report as rep

    old = os.umask(0o022)
    try:
        rep.write_atomic(tmp_path / "new.json", "{}\n")
        kept = tmp_path / "kept.json"
        kept.write_text("old\n")
        kept.chmod(0o640)
        rep.write_atomic(kept, "{}\n")
    finally:
        os.umask(old)
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o644
    assert kept.stat().st_mode & 0o777 == 0o640


def test_write_atomic_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    from fitcli import report as rep

    out = tmp_path / "report.json"
    out.write_text("previous\n")

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(rep.os, "fsync", boom)
    with pytest.raises(OSError):
        rep.write_atomic(out, "new content\n")
    assert out.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_output_in_missing_folder_is_exit_2_and_creates_nothing(tmp_path, run_cli):
    target = tmp_path / "nope" / "deeper" / "report.json"
    res = run_cli(mlp_score("--data", MLP_DATA, "--max-batches", "1", "--metric", "act_mean", "--output", target))
    assert_error(res, 2, "does not exist")
    assert list(tmp_path.iterdir()) == []


def test_output_is_a_directory_is_exit_2(tmp_path, run_cli):
    d = tmp_path / "dir"
    d.mkdir()
    res = run_cli(mlp_score("--metric", "weight_norm", "--output", d))
    assert_error(res, 2, "directory")
    assert list(d.iterdir()) == []


def test_failed_run_leaves_existing_output_untouched(tmp_path, run_cli):
    out = tmp_path / "report.json"
    out.write_text("keep me\n")
    bad = tmp_path / "bad_data.safetensors"
    bad.write_bytes(b"this is not a safetensors file at all")
    res = run_cli(mlp_score("--data", bad, "--output", out))
    assert_error(res, 3, "bad_data.safetensors")
    assert out.read_text() == "keep me\n"
    assert tmp_leftovers(tmp_path) == []


SLOWDATA = """
import time
from pathlib import Path
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
MARKER = HERE / "started.marker"
SRC = {src!r}


def batches():
    d = load_file(SRC)
    x, y = d["inputs"], d["targets"]
    for i in range(200):
        time.sleep(0.3)
        j = (i * 64) % x.shape[0]
        if not MARKER.exists():
            MARKER.write_text("first batch yielded")
        yield x[j:j + 64], y[j:j + 64]
"""


@pytest.mark.parametrize("sig,code,name", [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")],
                         ids=["sigint", "sigterm"])
def test_signal_mid_run_writes_nothing(sig, code, name, tmp_path):
    work = tmp_path / "tmp"
    work.mkdir()
    write_module(work, "slowdata.py", SLOWDATA.format(src=str(MLP_DATA)))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "OUT.json"
    marker = work / "started.marker"
    ckpt_sha = sha256(MLP)
    env = dict(os.environ)
    env.pop("FITCLI_VERBOSE", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fitcli", "score", "sample_models/mlp.safetensors", "--arch",
         "sample_models/models.py:mlp", "--data", f"{work / 'slowdata.py'}:batches", "--output", str(out),
         "--device", "cpu"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, f"exited early ({proc.returncode}): {proc.communicate()}"
            assert time.monotonic() < deadline, "data never started"
            time.sleep(0.05)
        time.sleep(0.4)  # well inside the run: 200 batches at 0.3 s each
        assert proc.poll() is None
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("fitcli: error:") and name in lines[0], stderr
    assert not out.exists()
    assert list(out_dir.iterdir()) == []
    assert sha256(MLP) == ckpt_sha


# =================================================================================================
# 3. Determinism
# =================================================================================================
def _without_created(text: str) -> str:
    rep = strict_json(text)
    assert "created" in rep
    rep.pop("created")
    return json.dumps(rep, sort_keys=True)


@pytest.mark.parametrize("data", [str(MLP_DATA), "random:16,n=96"], ids=["tensor-file", "random"])
def test_two_runs_are_byte_identical(data, run_cli):
    args = mlp_score("--data", data, "--seed", "7", "--format", "json", "--batch-size", "32", "--max-batches", "3")
    a = run_cli(args)
    b = run_cli(args)
    assert a.code == 0 and b.code == 0, (a.stderr, b.stderr)
    assert _without_created(a.stdout) == _without_created(b.stdout)
    strip = lambda s: "\n".join(ln for ln in s.splitlines() if '"created"' not in ln)  # noqa: E731
    assert strip(a.stdout) == strip(b.stdout)
    rep = strict_json(a.stdout)
    assert rep["settings"]["seed"] == 7
    assert rep["settings"]["device"] == "cpu"


def test_seed_changes_random_data(run_cli):
    common = ["--data", "random:16,n=64", "--metric", "act_mean", "--metric", "weight_norm", "--format", "json"]
    r1 = strict_json(run_cli(mlp_score(*common, "--seed", "1")).stdout)
    r2 = strict_json(run_cli(mlp_score(*common, "--seed", "2")).stdout)
    r1b = strict_json(run_cli(mlp_score(*common, "--seed", "1")).stdout)
    assert r1["settings"]["seed"] == 1 and r2["settings"]["seed"] == 2
    fc1 = lambda r, m: r["layers"][0]["metrics"][m]  # noqa: E731
    assert fc1(r1, "act_mean") != fc1(r2, "act_mean")
    assert fc1(r1, "act_mean") == fc1(r1b, "act_mean")
    assert fc1(r1, "weight_norm") == fc1(r2, "weight_norm")  # weights do not depend on the seed


# =================================================================================================
# 4. Edge data
# =================================================================================================
def test_batch_of_one(run_cli):
    res = run_cli(mlp_score("--data", MLP_DATA, "--batch-size", "1", "--max-batches", "3", "--format", "json"))
    assert res.code == 0, res.stderr
    rep = strict_json(res.stdout)
    assert rep["data"]["samples"] == 3 and rep["data"]["batches"] == 3
    assert rep["layers"][0]["metrics"]["act_mean"][0] is not None


def test_empty_data_file_is_exit_3(tmp_path, run_cli):
    data = write_data(tmp_path, torch.zeros(0, 16), torch.zeros(0, dtype=torch.long), "empty.safetensors")
    res = run_cli(mlp_score("--data", data))
    assert_error(res, 3, "empty.safetensors", "no samples")


def test_data_callable_that_raises_is_exit_3(tmp_path, run_cli):
    mod = write_module(tmp_path, "raising.py", """
        def batches():
            raise ValueError("the dataset bucket is gone (boom-4711)")
    """)
    res = run_cli(mlp_score("--data", f"{mod}:batches"))
    assert_error(res, 3, "boom-4711")


def test_data_generator_that_raises_midway_is_exit_3(tmp_path, run_cli):
    mod = write_module(tmp_path, "midway.py", f"""
        from safetensors.torch import load_file

        def batches():
            d = load_file({str(MLP_DATA)!r})
            yield d["inputs"][:64], d["targets"][:64]
            raise RuntimeError("shard 2 is corrupt (boom-0815)")
    """)
    res = run_cli(mlp_score("--data", f"{mod}:batches"))
    assert_error(res, 3, "boom-0815")


def test_ragged_batches_are_exit_3_naming_the_shape(tmp_path, run_cli):
    mod = write_module(tmp_path, "ragged.py", f"""
        from safetensors.torch import load_file

        def batches():
            d = load_file({str(MLP_DATA)!r})
            x, y = d["inputs"], d["targets"]
            yield x[:64], y[:64]
            yield x[64:128, :15], y[64:128]
            yield x[128:192], y[128:192]
    """)
    res = run_cli(mlp_score("--data", f"{mod}:batches"))
    assert_error(res, 3, "[64, 15]")


def test_long_error_message_stays_on_two_lines(tmp_path, repo):
    """cli.md: 'Errors are one or two readable lines on stderr'. A long message (a shape mismatch
    naming both shapes) must not be hard-wrapped into more lines when stderr is a pipe."""
    mod = write_module(tmp_path, "ragged.py", f"""
        from safetensors.torch import load_file

        def batches():
            d = load_file({str(MLP_DATA)!r})
            x, y = d["inputs"], d["targets"]
            yield x[:64], y[:64]
            yield x[64:128, :15], y[64:128]
    """)
    env = dict(os.environ)
    env.pop("FITCLI_VERBOSE", None)
    env.pop("COLUMNS", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "fitcli", *mlp_score("--data", f"{mod}:batches", "--quiet")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("fitcli: error:") and "[64, 15]" in lines[0], proc.stderr
    assert len(lines) <= 2 and all(ln.startswith(("fitcli: error:", "  hint:")) for ln in lines), proc.stderr


@pytest.mark.parametrize("with_data", [False, True], ids=["no-data", "with-data"])
def test_model_without_auditable_layers_is_reported_and_fails_a_gate(with_data, tmp_path, run_cli):
    """Nothing to audit is a finding the report states (coverage 0), not a crash; a gate on it fails."""
    mod = write_module(tmp_path, "relu_only.py", """
        import torch.nn as nn

        def build():
            return nn.Sequential(nn.ReLU())
    """)
    ckpt = tmp_path / "empty.safetensors"
    save_file({}, str(ckpt))
    args = ["score", str(ckpt), "--arch", f"{mod}:build", "--device", "cpu"]
    if with_data:
        args += ["--data", "random:16,n=8"]
    res = run_cli(args + ["--format", "json"])
    assert res.code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["coverage"]["units"] == 0 and report["layers"] == []
    assert any("no auditable layer" in n for n in report["discovery"]["notes"])
    res = run_cli(args + ["--max-dead", "5"])
    assert res.code == 1 and "no unit was audited" in res.stderr


def test_layer_glob_matching_nothing_is_exit_2(run_cli):
    res = run_cli(mlp_score("--layer", "conv*", "--metric", "weight_norm"))
    assert_error(res, 2, "conv*")


def test_gate_missing_file_is_exit_3(tmp_path, run_cli):
    res = run_cli(["gate", str(tmp_path / "missing.json"), "--max-dead", "5"])
    assert_error(res, 3, "missing.json")


@pytest.mark.parametrize("content", ['{"hello": "world"}', "[1, 2, 3]", "{not json", ""],
                         ids=["other-json", "json-list", "broken", "empty"])
def test_gate_on_non_report_is_exit_3(content, tmp_path, run_cli):
    p = tmp_path / "r.json"
    p.write_text(content)
    res = run_cli(["gate", str(p), "--max-dead", "5"])
    assert_error(res, 3, "r.json")


def test_gate_on_real_report_works(tmp_path, run_cli):
    """The control for the gate error tests: a report written by score gates fine."""
    out = tmp_path / "r.json"
    res = run_cli(mlp_score("--data", MLP_DATA, "--max-batches", "2", "--output", out, "--quiet"))
    assert res.code == 0, res.stderr
    assert run_cli(["gate", str(out), "--max-dead", "100"]).code == 0
    assert run_cli(["gate", str(out), "--max-dead", "0"]).code == 1  # the mlp has dead units
