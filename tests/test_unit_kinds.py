"""Unit kinds as classes in a registry: a kind registered for a module of the test's own is found,
audited and ablated (values against a brute-force loop and ablation by hand); a kind lacking what
the registry needs is refused with what is missing; residual blocks held as plain attributes are
found, and their ablation equals the model with the block replaced by the identity."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fitcli
from fitcli.errors import UsageError

REPO = Path(__file__).resolve().parents[1]


class Pairs(nn.Module):
    """Units no built-in kind knows: unit i is the pair of features (2i, 2i + 1) of the output,
    made by rows 2i and 2i + 1 of a weight the module holds itself (no nn.Linear inside)."""

    def __init__(self, inp: int, units: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2 * units, inp) / inp ** 0.5)
        self.units = units

    def forward(self, x):
        return torch.tanh(x @ self.weight.T)


class PairKind(fitcli.UnitKind):
    name = "pairs"

    def find(self, name, module):
        if not isinstance(module, Pairs):
            return []
        return [self.layer(name, module, module.units, [(f"{name}.weight", module.weight, 0)])]

    def view(self, layer, t):
        return t.reshape(t.shape[0], layer.units, 2)  # [batch, units, the pair's two features]

    def units_view(self, layer, t):
        return t.unflatten(-1, (layer.units, 2))

    def removal(self, layer):
        return "pairs are not removable: the test says so"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.pairs = Pairs(5, 3)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.pairs(x))


@pytest.fixture
def pair_kind():
    fitcli.register_unit_kind(PairKind)
    yield
    fitcli.unregister_unit_kind("pairs")


def _net_and_data():
    torch.manual_seed(0)
    m = Net().eval()
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(6, 5, generator=g), torch.randint(0, 4, (6,), generator=g)) for _ in range(3)]
    return m, data


def test_a_registered_kind_is_found_audited_and_ablated(pair_kind):
    m, data = _net_and_data()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    report = fitcli.audit(m, data, metrics=["act_mean"])
    lay = report.layer("pairs")
    assert lay.units == 3
    # brute force: unit i's mean |h| over every sample and both of its features
    sums, n = [0.0] * 3, 0
    with torch.no_grad():
        for x, _ in data:
            h = torch.tanh(x @ m.pairs.weight.T)
            for b in range(h.shape[0]):
                for i in range(3):
                    sums[i] += abs(float(h[b, 2 * i])) + abs(float(h[b, 2 * i + 1]))
                n += 2
    got = lay.metrics["act_mean"].tolist()
    assert got == pytest.approx([s / n for s in sums], abs=1e-6)

    ab = fitcli.ablate(m, data, layers=["pairs"])
    want = []
    with torch.no_grad():
        for i in range(3):
            delta, count = 0.0, 0
            for x, y in data:
                h = torch.tanh(x @ m.pairs.weight.T)
                masked = h.clone()
                masked[:, 2 * i] = 0.0
                masked[:, 2 * i + 1] = 0.0
                base = F.cross_entropy(m.head(h), y, reduction="none")
                cut = F.cross_entropy(m.head(masked), y, reduction="none")
                delta += float((cut - base).sum())
                count += len(y)
            want.append(delta / count)
    assert ab.layer("pairs").metrics["ablation"].tolist() == pytest.approx(want, abs=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())  # the model is untouched


def test_a_registered_kind_says_why_it_is_not_removable(pair_kind):
    from fitcli.discovery import discover

    m, _ = _net_and_data()
    lay = discover(m).layer("pairs")
    assert lay.kind.name == "pairs" and lay.point_kind == "output"
    assert lay.kind.removal(lay) == "pairs are not removable: the test says so"
    assert lay.weight.shape == (3, 10)  # unit i's rows: weight rows 2i and 2i + 1


def test_a_kind_lacking_what_the_registry_needs_is_refused():
    class NoView(fitcli.UnitKind):
        name = "noview"

        def find(self, name, module):
            return []

    with pytest.raises(UsageError) as e:
        fitcli.register_unit_kind(NoView)
    msg = str(e.value)
    assert "NoView" in msg and "view()" in msg and "units_view()" in msg and "removal()" in msg
    assert "find()" not in msg
    assert "noview" not in [k.name for k in fitcli.discovery.unit_kinds()]

    class Nameless(PairKind):
        name = ""

    with pytest.raises(UsageError, match="name"):
        fitcli.register_unit_kind(Nameless)
    with pytest.raises(UsageError, match="already registered"):
        fitcli.register_unit_kind(type("Again", (PairKind,), {"name": "channels"}))


def test_register_as_a_decorator_and_before_the_builtin_kinds():
    @fitcli.register_unit_kind
    class Mine(PairKind):
        name = "mine"

    try:
        assert Mine.__name__ == "Mine" and fitcli.discovery.unit_kinds()[0].name == "mine"
    finally:
        fitcli.unregister_unit_kind(Mine)
    assert "mine" not in [k.name for k in fitcli.discovery.unit_kinds()]


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Plain(nn.Module):
    """Blocks held as plain attributes (no ModuleList, no Sequential), beside a module that keeps
    its input's shape without adding its input back (not a block)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.layer1 = Block(8)
        self.mix = nn.Sequential(nn.Linear(8, 8), nn.Tanh())  # shape kept, no residual: not a block
        self.layer2 = Block(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.layer2(self.mix(self.layer1(self.stem(x)))))


def test_blocks_held_as_plain_attributes_are_found_and_ablated_exactly():
    torch.manual_seed(0)
    m = Plain().eval()
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(2)]
    report = fitcli.blocks(m, data)
    rows = {r["name"]: r for r in report.to_dict()["blocks"]}
    assert sorted(rows) == ["layer1", "layer2"]
    for name in ("layer1", "layer2"):
        cut = copy.deepcopy(m)
        setattr(cut, name, nn.Identity())
        with torch.no_grad():
            want = sum(float((F.cross_entropy(cut(x), y, reduction="none")
                              - F.cross_entropy(m(x), y, reduction="none")).sum()) for x, y in data) / 10
        assert rows[name]["ablation"] == pytest.approx(want, abs=1e-6)


def test_the_docs_unit_kind_example_runs():
    """docs/unit_kinds.md's example, run as a user would: it prints what it says."""
    text = (REPO / "docs" / "unit_kinds.md").read_text()
    code = re.search(r"```python\n(.*?)```", text[text.index("## Register a kind"):], flags=re.S).group(1)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.splitlines()[-1] == "pairs 3 True"
