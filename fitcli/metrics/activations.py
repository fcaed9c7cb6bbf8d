"""Activation statistics at the activation point, over all observations (sample, position)."""

from __future__ import annotations

import math

import torch

from fitcli.metrics.base import Metric, UnitBatch, safe_div, zeros

BINS = 20


def _obs(act: torch.Tensor) -> torch.Tensor:
    """[batch, units, positions] -> [units, observations]."""
    return act.transpose(0, 1).reshape(act.shape[1], -1)


class _Stats(Metric):
    needs = frozenset({"activations"})
    cost = "1 forward"

    def setup(self) -> None:
        self.add_state("n", torch.zeros((), dtype=torch.float64), "sum")
        self.add_state("abs_sum", zeros(self.units), "sum")

    def _count(self, h: torch.Tensor) -> None:
        self.n = self.n + h.shape[1]
        self.abs_sum = self.abs_sum + h.abs().sum(dim=1)

    def _mean_abs(self) -> torch.Tensor:
        return safe_div(self.abs_sum, self.n.expand(self.units))


class ActMean(_Stats):
    name = "act_mean"
    description = "E|h|: mean absolute activation over all observations"

    def update(self, batch: UnitBatch) -> None:
        if batch.act is not None:
            self._count(_obs(batch.act))

    def compute(self) -> torch.Tensor:
        return self._mean_abs()


class Dormant(_Stats):
    name = "dormant"
    description = "s_i = E|h_i| / mean_k E|h_k| (ReDo dormancy score; layer mean is 1; dead when ≤ τ)"

    def update(self, batch: UnitBatch) -> None:
        if batch.act is not None:
            self._count(_obs(batch.act))

    def compute(self) -> torch.Tensor:
        return dormancy(self._mean_abs())


def dormancy(mean_abs: torch.Tensor) -> torch.Tensor:
    """s_i = m_i / mean(m); all zeros (a fully dead layer) -> all zeros."""
    layer_mean = mean_abs.mean()
    if layer_mean == 0:
        return torch.zeros_like(mean_abs)
    return mean_abs / layer_mean


class ActVar(Metric):
    name = "act_var"
    needs = frozenset({"activations"})
    cost = "1 forward"
    description = "population variance of h over all observations"

    def setup(self) -> None:
        self.add_state("n", torch.zeros((), dtype=torch.float64), "sum")
        self.add_state("s1", zeros(self.units), "sum")
        self.add_state("s2", zeros(self.units), "sum")

    def update(self, batch: UnitBatch) -> None:
        if batch.act is None:
            return
        h = _obs(batch.act)
        self.n = self.n + h.shape[1]
        self.s1 = self.s1 + h.sum(dim=1)
        self.s2 = self.s2 + (h * h).sum(dim=1)

    def compute(self) -> torch.Tensor:
        n = self.n.expand(self.units)
        mean = safe_div(self.s1, n)
        return (safe_div(self.s2, n) - mean * mean).clamp_min(0.0)


class APoZ(Metric):
    name = "apoz"
    needs = frozenset({"activations"})
    cost = "1 forward"
    description = "fraction of observations with h == 0 (Average Percentage of Zeros)"

    def setup(self) -> None:
        self.add_state("n", torch.zeros((), dtype=torch.float64), "sum")
        self.add_state("zeros", zeros(self.units), "sum")

    def update(self, batch: UnitBatch) -> None:
        if batch.act is None:
            return
        h = _obs(batch.act)
        self.n = self.n + h.shape[1]
        self.zeros = self.zeros + (h == 0).sum(dim=1).to(torch.float64)

    def compute(self) -> torch.Tensor:
        return safe_div(self.zeros, self.n.expand(self.units))


def entropy_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of each row of a histogram ``[units, bins]``."""
    total = counts.sum(dim=1, keepdim=True)
    p = counts / total.clamp_min(1)
    terms = torch.where(p > 0, -p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    return terms.sum(dim=1)


def bin_index(h: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int = BINS) -> torch.Tensor:
    """Bin of each value in ``bins`` equal-width bins over [lo, hi] per unit (last bin closed)."""
    width = (hi - lo).unsqueeze(1)
    scaled = torch.where(width > 0, (h - lo.unsqueeze(1)) / torch.where(width > 0, width, torch.ones_like(width)), torch.zeros_like(h))
    return (scaled * bins).floor().clamp(0, bins - 1).to(torch.int64)


class ActEntropy(Metric):
    name = "act_entropy"
    needs = frozenset({"activations"})
    cost = "2 forwards"
    description = f"entropy (nats) of h in {BINS} equal-width bins over the unit's own [min, max]; 0 for a constant unit"
    passes = 2

    def setup(self) -> None:
        self.add_state("lo", torch.full((self.units,), math.inf, dtype=torch.float64), "min")
        self.add_state("hi", torch.full((self.units,), -math.inf, dtype=torch.float64), "max")
        self.add_state("counts", torch.zeros((self.units, BINS), dtype=torch.float64), "sum")

    def update(self, batch: UnitBatch) -> None:
        if batch.act is None:
            return
        h = _obs(batch.act)
        if batch.pass_index == 0:
            self.lo = torch.minimum(self.lo, h.min(dim=1).values)
            self.hi = torch.maximum(self.hi, h.max(dim=1).values)
        else:
            idx = bin_index(h, self.lo, self.hi)
            self.counts = self.counts.scatter_add(1, idx, torch.ones_like(h))

    def compute(self) -> torch.Tensor:
        return entropy_from_counts(self.counts)
