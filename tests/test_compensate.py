"""Least-squares compensation (fitcli.compensate) and the redundancy metric, checked against hand
computations: outputs of the unpruned layer, numpy-style lstsq per unit, augmented-row ridge."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from fitcli.compensate import Gram, SplitGram, columns_of, fit_compensation, fold
from fitcli.metrics.base import UnitBatch
from fitcli.metrics.redundancy import Redundancy
from fitcli.testing import check_metric

ROOT = Path(__file__).resolve().parents[1]


def planted(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Eight independent features, then a dead one, a constant, a duplicate of feature 1 and
    2·x2 − 0.5·x3 + 1; returns the features and the planted columns."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 8, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, 8, dtype=torch.float64) + 0.3
    extra = torch.stack([torch.zeros(n, dtype=torch.float64), torch.full((n,), 3.7, dtype=torch.float64),
                         base[:, 1].clone(), 2 * base[:, 2] - 0.5 * base[:, 3] + 1.0], dim=1)
    return torch.cat([base, extra], dim=1), [8, 9, 10, 11]


def layer(out: int, inp: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g, dtype=torch.float64), torch.randn(out, generator=g, dtype=torch.float64)


def stats_of(x: torch.Tensor, chunks: int = 4, every: int = 5) -> SplitGram:
    s = SplitGram(x.shape[1], every=every)
    for part in x.chunk(chunks):
        s.update(part)
    return s


def pruned_output(x, w, b, removed, fit) -> torch.Tensor:
    new_w, new_b = fold(w, b, torch.tensor(removed), fit)
    kept = [i for i in range(x.shape[1]) if i not in removed]
    return x[:, kept] @ new_w.T + new_b


@pytest.mark.parametrize("which", [[8], [9], [10], [11], [8, 9, 10, 11]], ids=["dead", "constant", "duplicate", "linear", "all"])
def test_planted_units_are_removed_exactly(which):
    x, _ = planted()
    w, b = layer(5, x.shape[1])
    full = x @ w.T + b  # the unpruned layer, by hand
    fit = fit_compensation(stats_of(x), torch.tensor(which), w, mode="ridge")
    assert (pruned_output(x, w, b, which, fit) - full).abs().max() < 1e-5
    assert fit.lam == 0.0  # the exact fit wins on held-out rows
    assert fit.heldout["lambda=0"] < 1e-12


def test_removal_without_compensation_loses_the_contribution():
    x, _ = planted()
    w, b = layer(5, x.shape[1])
    fit = fit_compensation(stats_of(x), torch.tensor([10]), w, mode="none")
    got = pruned_output(x, w, b, [10], fit)
    assert torch.allclose(got, x @ w.T + b - x[:, 10:11] @ w[:, 10:11].T)


def test_mean_mode_is_flap_bias():
    x, _ = planted()
    w, b = layer(5, x.shape[1])
    removed = [0, 5]
    fit = fit_compensation(stats_of(x), torch.tensor(removed), w, mode="mean")
    new_w, new_b = fold(w, b, torch.tensor(removed), fit)
    mean_r = x[:, removed].sum(0) / x.shape[0]
    assert torch.allclose(new_b, b + w[:, removed] @ mean_r, atol=1e-12)
    kept = [i for i in range(x.shape[1]) if i not in removed]
    assert torch.equal(new_w, w[:, kept])


def test_ridge_matches_augmented_least_squares():
    """λ > 0 against ridge solved as ordinary least squares on centred data with √(λ·s)·I rows."""
    x, _ = planted()
    x = x[:, :8]
    w, _ = layer(3, 8)
    removed, kept, lam = [2, 6], [0, 1, 3, 4, 5, 7], 0.05
    fit = fit_compensation(stats_of(x, every=0), torch.tensor(removed), w, lam=lam)
    n = x.shape[0]
    xc = x - x.mean(0)
    scale = (xc[:, kept].square().sum(0) / n).mean()
    a = torch.cat([xc[:, kept] / n**0.5, (lam * scale) ** 0.5 * torch.eye(len(kept), dtype=torch.float64)])
    y = torch.cat([xc[:, removed] / n**0.5, torch.zeros(len(kept), len(removed), dtype=torch.float64)])
    sol = torch.linalg.lstsq(a, y).solution.T  # [|R|, |K|]
    assert torch.allclose(fit.b, sol, atol=1e-10)
    assert torch.allclose(fit.c, x[:, removed].mean(0) - sol @ x[:, kept].mean(0), atol=1e-10)


def test_lambda_chosen_on_heldout_and_reported():
    """Few noisy rows: the plain least-squares fit overfits and a ridge λ wins on held-out rows."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(60, 3, generator=g, dtype=torch.float64)
    x = z @ torch.randn(3, 30, generator=g, dtype=torch.float64) + 0.3 * torch.randn(60, 30, generator=g, dtype=torch.float64)
    w, _ = layer(4, 30)
    fit = fit_compensation(stats_of(x), torch.tensor([0, 1, 2]), w, mode="ridge")
    grid = {k: v for k, v in fit.heldout.items() if k.startswith("lambda=")}
    assert len(grid) == 7
    best = min(grid, key=grid.get)
    assert fit.lam == float(best.split("=")[1]) and fit.lam > 0
    assert grid[best] < 0.5 * min(fit.heldout["mean"], fit.heldout["none"])
    assert fit.summary()["lambda"] == fit.lam


def test_gram_streams_and_merges():
    x, _ = planted()
    whole = Gram(12).update(x)
    a, b = Gram(12).update(x[:150]), Gram(12).update(x[150:])
    for m in (Gram(12).merge(a).merge(b), Gram(12).merge(b).merge(a)):
        assert m.n == whole.n
        assert torch.allclose(m.xtx, x.T @ x) and torch.allclose(m.sum, x.sum(0))
    split_a, split_b = stats_of(x[:200]), stats_of(x[200:])
    assert split_a.merge(split_b).whole().n == x.shape[0]


def test_columns_of_heads():
    assert columns_of([0, 2], 3).tolist() == [0, 1, 2, 6, 7, 8]


def test_bad_mode_and_no_data():
    from fitcli.errors import UsageError
    with pytest.raises(UsageError, match="unknown compensation"):
        fit_compensation(Gram(3).update(torch.randn(5, 3)), torch.tensor([0]), torch.randn(2, 3), mode="lsq")
    with pytest.raises(UsageError, match="calibration data"):
        fit_compensation(Gram(3), torch.tensor([0]), torch.randn(2, 3))


# ---- redundancy ---------------------------------------------------------------------------------

def brute_r2(x: torch.Tensor) -> torch.Tensor:
    """Per unit: lstsq of the unit on [the others, 1]; R² = 1 − SS_res/SS_tot (1 when SS_tot = 0)."""
    out = []
    for i in range(x.shape[1]):
        others = torch.cat([x[:, :i], x[:, i + 1:], torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        y = x[:, i:i + 1]
        sol = torch.linalg.lstsq(others, y, driver="gelsd").solution
        res = ((y - others @ sol) ** 2).sum()
        tot = ((y - y.mean()) ** 2).sum()
        out.append(1.0 if tot <= 1e-20 else float(1 - res / tot))
    return torch.tensor(out, dtype=torch.float64)


def test_redundancy_conforms():
    check_metric(Redundancy)


def test_redundancy_matches_brute_force():
    x, planted_cols = planted(n=300)
    m = Redundancy(x.shape[1])
    act = x.reshape(30, 10, 12).transpose(1, 2)  # [batch, units, positions]
    for part in act.chunk(3):
        m.update(UnitBatch(weight=None, act=part))
    got = m.compute()
    ref = brute_r2(x)
    assert torch.allclose(got, ref, atol=1e-6), (got, ref)
    assert torch.allclose(got[planted_cols], torch.ones(4, dtype=torch.float64), atol=1e-6)
    assert float(got[[0, 4, 5, 6, 7]].max()) < 0.2  # independent: not rebuildable (1, 2, 3 are, from 10 and 11)


def test_redundancy_respects_padding_mask():
    x, _ = planted(n=40)
    act = x.reshape(4, 10, 12).transpose(1, 2)
    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[:, 7:] = False
    act = act.clone()
    act[:, :, 7:] = 1e6  # padding garbage must not count
    m = Redundancy(12)
    m.update(UnitBatch(weight=None, act=act, mask=mask))
    ref = brute_r2(x.reshape(4, 10, 12)[:, :7].reshape(-1, 12))
    assert torch.allclose(m.compute(), ref, atol=1e-6)


def test_redundancy_registered(tmp_path, monkeypatch):
    """pyproject.toml's entry point names the class; through the registry (the line installed as
    a dist-info, since the editable install's entry points are read at install time)."""
    from fitcli.metrics.registry import get_metric, load_registry
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split('[project.entry-points."fitcli.metrics"]')[1].split("\n[")[0]
    eps = dict(line.replace('"', "").split(" = ") for line in section.strip().splitlines())
    assert eps["redundancy"] == "fitcli.metrics.redundancy:Redundancy"
    info = tmp_path / "redundancytest-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: redundancytest\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[fitcli.metrics]\nredundancy = {eps['redundancy']}\n")
    try:
        with monkeypatch.context() as mp:
            mp.syspath_prepend(str(tmp_path))
            importlib.invalidate_caches()
            load_registry(refresh=True)
            assert get_metric("redundancy") is Redundancy
    finally:
        importlib.invalidate_caches()
        load_registry(refresh=True)
    assert "redundancytest" not in sys.modules


def test_redundancy_says_why_not_on_huge_layers():
    from types import SimpleNamespace
    assert Redundancy.unavailable(SimpleNamespace(units=49152)).startswith("needs a 49152x49152 float64 Gram")
    assert Redundancy.unavailable(SimpleNamespace(units=1536)) is None
