"""A model that writes into an activation in place after its point (``out += identity`` in a
torchvision-style ResNet block): the metrics that read the activation again at the backward
(Σh·g: ``taylor``, ``taylor_delta``) must see the activation, not what the model wrote over it.
Every value is checked against a per-sample brute force that keeps the activation itself."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fitcli
from fitcli.feeder import OVERWRITTEN
from fitcli.tracker import Tracker


class Block(nn.Module):
    """conv -> BN -> ReLU, then conv -> BN whose output is the point of ``c2`` and is written into
    by the residual add (``how``: "iadd" ``out += idt``, "add_" ``out.add_(idt)``, "new" ``out + idt``;
    "train_iadd": ``+=`` only in training mode, which discovery's eval forward does not take)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        self.keep: torch.Tensor | None = None  # the brute force keeps the point's value here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = F.relu(self.bn1(self.c1(x)))
        out = self.bn2(self.c2(idt))
        if self.keep is not None:  # brute force: the value at the point, with its gradient
            out = out.clone()
            out.retain_grad()
            self.keep = out
            out = out + idt
        elif self.how == "iadd" or (self.how == "train_iadd" and self.training):
            out += idt
        elif self.how == "add_":
            out.add_(idt)
        else:
            out = out + idt
        return self.fc(F.relu(out).mean((2, 3)))


def _model(how: str) -> Block:
    torch.manual_seed(0)
    m = Block(how)
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return m


def _brute_taylor(model: Block, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(taylor, taylor_delta) of c2 from one sample at a time: mean_x |Σ_p h·∂L_x/∂h| and −mean_x Σ_p h·∂L_x/∂h."""
    m = copy.deepcopy(model)
    per = []
    for i in range(x.shape[0]):
        m.keep = torch.empty(0)
        m.zero_grad()
        F.cross_entropy(m(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        per.append((m.keep.detach()[0].double() * m.keep.grad[0].double()).sum(dim=(1, 2)))
    hg = torch.stack(per)
    return hg.abs().mean(0), -hg.mean(0)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 4, (6,), generator=g)


@pytest.mark.parametrize("how", ["iadd", "add_", "new"])
def test_tracker_taylor_reads_the_activation_not_what_the_model_wrote_over_it(how):
    model = _model(how).eval()  # eval: the BatchNorm statistics are the same for the brute force
    x, y = _data()
    want, want_delta = _brute_taylor(model, x, y)
    with Tracker(model, metrics=["taylor", "taylor_delta", "act_mean"], train_only=False) as tr:
        F.cross_entropy(model(x), y).backward()
        rec = tr.step()
    got = rec["layers"]["c2"]
    assert "skipped" not in got
    assert torch.allclose(torch.tensor(got["metrics"]["taylor"], dtype=torch.float64), want, rtol=1e-5, atol=1e-9)
    assert torch.allclose(torch.tensor(got["metrics"]["taylor_delta"], dtype=torch.float64), want_delta,
                          rtol=1e-5, atol=1e-5 * float(want_delta.abs().max()))  # signed: float32 cancellation
    assert ("c2" in tr._keep) == (how != "new")  # only an in-place write makes it copy


def test_tracker_write_discovery_missed_is_skipped_with_the_reason_then_copied():
    """``+=`` only in training mode: discovery's eval forward does not see it. That step's Taylor
    values of c2 are left out, with the reason; the next step copies the activation and is exact."""
    model = _model("train_iadd")
    model.bn1.eval(), model.bn2.eval()  # fixed statistics: the brute force sees the same network
    x, y = _data()
    want, _ = _brute_taylor(model, x, y)
    with Tracker(model, metrics=["taylor", "act_mean"]) as tr:
        recs = []
        for _ in range(2):
            F.cross_entropy(model(x), y).backward()
            recs.append(tr.step())
    first, second = recs[0]["layers"]["c2"], recs[1]["layers"]["c2"]
    assert first["skipped"]["taylor"].startswith(OVERWRITTEN) and "taylor" not in first["metrics"]
    assert "act_mean" in first["metrics"]  # taken during the forward: right
    assert "skipped" not in second
    assert torch.allclose(torch.tensor(second["metrics"]["taylor"], dtype=torch.float64), want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("how", ["iadd", "add_"])
def test_audit_leaves_out_what_it_cannot_read_and_is_exact_elsewhere(how):
    """The audit traces the model: ``+=`` on a traced value becomes a new tensor (exact); an explicit
    ``add_`` stays in place, and Taylor of that layer is skipped with the reason instead of wrong."""
    model = _model(how).eval()
    x, y = _data()
    want, _ = _brute_taylor(model, x, y)
    report = fitcli.audit(model, [(x, y)], loss="cross_entropy", metrics=["taylor", "act_mean"], device="cpu")
    skipped = {(s["layer"], s["metric"]): s["reason"] for s in report.skipped}
    if how == "iadd":
        assert not skipped
        assert torch.allclose(report.layer("c2").metrics["taylor"], want, rtol=1e-5, atol=1e-9)
    else:
        assert skipped == {("c2", "taylor"): OVERWRITTEN}
    assert "act_mean" in report.layer("c2").metrics
