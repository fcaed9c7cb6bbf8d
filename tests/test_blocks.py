"""Residual blocks as units, on a residual CNN and a tiny GPT-2: block ablation equals running the
model with the block taken out (a copy built here); Block Influence equals a hand computation;
the greedy layer-removal curve's first step removes a block planted as the identity."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fitcli

sys.path.insert(0, str(Path(__file__).parent))
from test_architectures import BasicBlock, _gpt2, _lm_loss  # noqa: E402

TOL = 1e-5


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8), BasicBlock(8, 8), BasicBlock(8, 16, 2))
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = self.layer1(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _resnet(identity_block: int = 1):
    torch.manual_seed(0)
    m = ResNet()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_var.uniform_(0.5, 1.5)
        blk = m.layer1[identity_block]  # bn2 = 0: out = relu(0 + x) = x, since x >= 0 after a ReLU
        blk.bn2.weight.zero_()
        blk.bn2.bias.zero_()
    m.eval()
    g = torch.Generator().manual_seed(1)
    return m, [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(2)]


def _without(m: ResNet, i: int) -> ResNet:
    c = copy.deepcopy(m)
    c.layer1 = nn.Sequential(*[b for j, b in enumerate(c.layer1) if j != i])
    return c


def _hand_bi(m: ResNet, data, i: int) -> tuple[float, float]:
    """1 - cos and angle/pi between a block's input and output per spatial position (cosine over
    channels; an unchanged position counts cos = 1), averaged over positions and samples."""
    got = {}
    h1 = m.layer1[i].register_forward_pre_hook(lambda mod, a: got.__setitem__("x", a[0].clone()))
    h2 = m.layer1[i].register_forward_hook(lambda mod, a, o: got.__setitem__("y", o.clone()))
    bi, ang, n = 0.0, 0.0, 0
    with torch.no_grad():
        for x, _ in data:
            m(x)
            a, b = got["x"].double(), got["y"].double()
            dot = (a * b).sum(1)
            norms = a.norm(dim=1) * b.norm(dim=1)
            for v, w, same in zip(dot.flatten().tolist(), norms.flatten().tolist(),
                                  (a == b).all(1).flatten().tolist(), strict=True):
                c = 1.0 if same else max(-1.0, min(1.0, v / max(w, 1e-12)))
                bi += 1 - c
                ang += math.acos(c) / math.pi
                n += 1
    h1.remove()
    h2.remove()
    return bi / n, ang / n


def test_residual_cnn_blocks_influence_ablation_and_greedy():
    m, data = _resnet(identity_block=1)
    r = fitcli.blocks(m, data, greedy=2, device="cpu")
    rows = {b["name"]: b for b in r["blocks"]}
    assert set(rows) == {"layer1.0", "layer1.1", "layer1.2"}  # layer1.3 changes the shape: not removable
    with torch.no_grad():
        base = torch.cat([F.cross_entropy(m(x), y, reduction="none") for x, y in data])
        for i in range(3):
            c = _without(m, i)
            want = float((torch.cat([F.cross_entropy(c(x), y, reduction="none") for x, y in data]) - base).mean())
            assert abs(rows[f"layer1.{i}"]["ablation"] - want) <= TOL, i
            bi, ang = _hand_bi(m, data, i)
            assert abs(rows[f"layer1.{i}"]["block_influence"] - bi) <= 1e-9, i
            assert abs(rows[f"layer1.{i}"]["angular_distance"] - ang) <= 1e-6, i
    assert rows["layer1.1"]["block_influence"] == 0.0 and rows["layer1.1"]["ablation"] == 0.0
    curve = r["greedy"]
    assert [c["step"] for c in curve] == [1, 2]
    assert curve[0]["removed"] == "layer1.1" and curve[0]["delta_loss"] == 0.0
    # step 2 re-measured with layer1.1 gone: its loss is that of the model without both blocks
    c2 = _without(_without(m, 1), [0, None, 1][["layer1.0", None, "layer1.2"].index(curve[1]["removed"])])
    with torch.no_grad():
        want = float(torch.cat([F.cross_entropy(c2(x), y, reduction="none") for x, y in data]).mean())
    assert abs(curve[1]["loss"] - want) <= TOL
    fitcli.report.validate(r.to_dict())


def test_blocks_before_the_ablated_one_are_replayed_not_recomputed():
    """Ablating block i leaves blocks 0..i-1 as they were, so their outputs come from the unablated
    run: the first block's convolution runs once per batch (the unablated run), not once per ablation."""
    m, data = _resnet(identity_block=1)
    calls = []
    h = m.layer1[0].conv1.register_forward_hook(lambda *a: calls.append(1))
    try:
        r = fitcli.blocks(m, data, device="cpu")
    finally:
        h.remove()
    assert len(calls) == len(data) + 1  # + the probe that finds the blocks on the first batch
    assert "forward" not in m.layer1[0].__dict__  # the replacements are gone again
    with torch.no_grad():  # and the values are still those of the model without each block
        base = torch.cat([F.cross_entropy(m(x), y, reduction="none") for x, y in data])
        c = _without(m, 2)
        want = float((torch.cat([F.cross_entropy(c(x), y, reduction="none") for x, y in data]) - base).mean())
    assert abs({b["name"]: b for b in r["blocks"]}["layer1.2"]["ablation"] - want) <= TOL


def test_gpt2_blocks_equal_the_model_without_them():
    m, data = _gpt2()
    r = fitcli.blocks(m, data, device="cpu")
    rows = {b["name"]: b for b in r["blocks"]}
    assert set(rows) == {"transformer.h.0", "transformer.h.1"}
    with torch.no_grad():
        base = torch.cat([_lm_loss(m(**b), b) for b in data])
        for i in range(2):
            c = copy.deepcopy(m)
            del c.transformer.h[i]
            want = float((torch.cat([_lm_loss(c(**b), b) for b in data]) - base).mean())
            assert abs(rows[f"transformer.h.{i}"]["ablation"] - want) <= TOL, i
    assert all(0 < rows[n]["block_influence"] < 1 for n in rows)


def test_cli_ablate_blocks_greedy(tmp_path):
    m, data = _resnet(identity_block=2)
    torch.save(m.state_dict(), tmp_path / "m.pt")
    torch.save({"inputs": torch.cat([x for x, _ in data]), "targets": torch.cat([y for _, y in data])}, tmp_path / "d.pt")
    here = str(Path(__file__).parent)
    (tmp_path / "net.py").write_text(f"import sys\nsys.path.insert(0, {here!r})\nfrom test_blocks import _resnet\n"
                                     "def make():\n    return _resnet(2)[0]\n")
    args = [sys.executable, "-m", "fitcli", "ablate", str(tmp_path / "m.pt"), "--arch", f"{tmp_path / 'net.py'}:make",
            "--data", str(tmp_path / "d.pt"), "--blocks", "--greedy", "1", "--device", "cpu", "--quiet"]
    res = subprocess.run(args + ["--format", "json"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["command"] == "blocks" and report["greedy"][0]["removed"] == "layer1.2"
    table = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert "Layer-removal curve" in table.stdout and "layer1.2" in table.stdout


@pytest.mark.parametrize("bad", [-1, True])
def test_greedy_must_be_a_count(bad):
    m, data = _resnet()
    with pytest.raises(fitcli.UsageError):
        fitcli.blocks(m, data, greedy=bad)


def test_block_validation_has_a_random_baseline():
    m, data = _resnet(identity_block=1)
    v = fitcli.blocks(m, data, device="cpu")["block_validation"]
    assert set(v["metrics"]) == {"block_influence", "angular_distance"}
    assert v["random"]["draws"] == 200 and v["random"]["units"] == 3
