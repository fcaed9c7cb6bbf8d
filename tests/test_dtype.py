"""Half precision: models in bfloat16 / float16 audit correctly.

The model computes in its own dtype; every statistic is taken on float32 copies and summed in
float64 (``docs/distributed.md``). Tolerances: bfloat16 keeps 8 significant bits (unit roundoff
2^-8 ≈ 0.4%); through two or three layers the activation statistics move by up to a few of those,
so activation metrics are held to 2% of the layer's largest float32 value, gradient metrics
(a backward in bfloat16 on top) to 15%.
"""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fitcli
from fitcli.errors import UsageError

ACT_TOL = 0.02  # activation metrics: |bf16 − f32| ≤ 2% of the layer's largest |f32| value
GRAD_TOL = 0.15  # gradient metrics (a bfloat16 backward)


def _models(repo):
    spec = importlib.util.spec_from_file_location("fitcli_sample_models_dtype", repo / "sample_models" / "models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sample(repo, name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = getattr(_models(repo), name)()
    model.load_state_dict(load_file(str(repo / "sample_models" / f"{name}.safetensors")))
    d = load_file(str(repo / "sample_models" / f"{name}_data.safetensors"))
    return model, d["inputs"], d["targets"]


def _batches(x: torch.Tensor, y: torch.Tensor, size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_bfloat16_copy_finds_the_same_dead_units_within_bf16_tolerance(repo, truth, name):
    model, x, y = _sample(repo, name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _batches(x, y)
    metrics = ["act_mean", "act_var", "apoz", "dormant", "weight_norm", "taylor", "grad_norm"]
    r32 = fitcli.audit(model, data, device="cpu", metrics=metrics)
    r16 = fitcli.audit(model, data, device="cpu", metrics=metrics, dtype="bfloat16")
    # the caller's float32 model was copied for the cast, never changed
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert r32.settings["dtype"] == "float32" and r16.settings["dtype"] == "bfloat16"
    # planted dead units (truth.json) are found in bfloat16 exactly as in float32
    planted = {k: sorted(v) for k, v in truth[name]["dead"].items()}
    assert {k: v for k, v in r16.dead.items() if k in planted} == planted
    assert r16.dead == r32.dead
    for lay32 in r32.layers:
        lay16 = r16.layer(lay32.name)
        for m, a in lay32.metrics.items():
            b = lay16.metrics[m]
            ok = torch.isfinite(a)
            assert torch.equal(ok, torch.isfinite(b)), (lay32.name, m)
            if not ok.any():
                continue
            scale = float(a[ok].abs().max()) or 1.0
            tol = GRAD_TOL if m in ("taylor", "grad_norm") else ACT_TOL
            assert float((a[ok] - b[ok]).abs().max()) <= tol * scale, (lay32.name, m)


def test_bfloat16_statistics_equal_a_float64_sum_of_the_bf16_activations(repo):
    """The audit's act_mean/act_var of a bfloat16 MLP are the float64 statistics of the very
    activations the bfloat16 model computes (brute force, by hand), not of rounded sums."""
    model, x, y = _sample(repo, "mlp")
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    r = fitcli.audit(m16, _batches(x, y), device="cpu", metrics=["act_mean", "act_var"], layers=["fc1", "fc2"])
    assert r.settings["dtype"] == "bfloat16"
    with torch.no_grad():
        h1 = torch.relu(m16.fc1(x.to(torch.bfloat16)))
        h2 = torch.relu(m16.fc2(h1))
    for name, h in (("fc1", h1), ("fc2", h2)):
        h = h.to(torch.float64)
        lay = r.layer(name)
        torch.testing.assert_close(lay.metrics["act_mean"], h.abs().mean(0), rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(lay.metrics["act_var"], h.var(0, unbiased=False), rtol=1e-2, atol=1e-5)


class _Big(nn.Module):
    """Activations of ~400 on a Conv1d (16 positions) and a Linear: in float16 (max 65504) a
    square overflows on its own, and a sum over a batch or the data overflows too."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 3, kernel_size=1)
        self.fc = nn.Linear(48, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[[400.0]], [[200.0]], [[-400.0]]]))  # unit 2: dead
            self.conv.bias.zero_()
            self.fc.weight.fill_(0.001)
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_float16_sums_over_many_batches_do_not_overflow():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32 * 64, 1, 16, generator=g) * 0.5 + 0.75  # h in [300, 500] for unit 0
    y = torch.randint(0, 2, (x.shape[0],), generator=g)
    model = _Big().half()
    r = fitcli.audit(model, _batches(x, y), device="cpu", layers=["conv"], metrics=["act_mean", "act_var", "apoz",
                                                                                     "dormant", "taylor"])
    assert r.settings["dtype"] == "float16"
    with torch.no_grad():
        h = torch.relu(model.conv(x.half())).to(torch.float64)  # [N, 3, 16], every value finite in fp16
    assert torch.isfinite(h).all() and float(h.amax()) > 300  # squares (9e4+) and sums overflow float16
    lay = r.layer("conv")
    for m in ("act_mean", "act_var", "taylor"):
        assert torch.isfinite(lay.metrics[m]).all(), m
    torch.testing.assert_close(lay.metrics["act_mean"], h.abs().mean(dim=(0, 2)), rtol=1e-6, atol=0)
    per_unit = h.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(lay.metrics["act_var"], per_unit.var(dim=1, unbiased=False), rtol=1e-5, atol=1e-9)
    assert lay.metrics["apoz"].tolist() == [0.0, 0.0, 1.0]
    assert lay.dead == [2]
    assert r.summary["nonfinite_loss_batches"] == 0


def test_dtype_setting_is_checked_and_the_cli_casts(run_cli, in_repo, truth, tmp_path):
    with pytest.raises(UsageError, match="dtype 'int8'"):
        fitcli.audit(nn.Linear(2, 2), torch.zeros(4, 2), dtype="int8")
    t = truth["mlp"]
    out = tmp_path / "r.json"
    res = run_cli(["score", t["checkpoint"], "--arch", t["arch"], "--data", t["data"], "--dtype", "bfloat16",
                   "--metric", "act_mean", "--metric", "dormant", "-o", str(out), "-q", "--format", "json"])
    assert res.code == 0, res.stderr
    report = json.loads(out.read_text())
    assert report["settings"]["dtype"] == "bfloat16"
    dead = {lay["name"]: lay["dead"] for lay in report["layers"] if lay["name"] in t["dead"]}
    assert dead == {k: sorted(v) for k, v in t["dead"].items()}
    bad = run_cli(["score", t["checkpoint"], "--arch", t["arch"], "--data", t["data"], "--dtype", "int8"])
    assert bad.code == 2 and "--dtype 'int8'" in bad.stderr
