"""First-order Taylor importance (Molchanov et al. 2017) from per-sample-loss gradients."""

from __future__ import annotations

import torch

from fitcli.metrics.base import Metric, UnitBatch, safe_div, zeros


class Taylor(Metric):
    name = "taylor"
    needs = frozenset({"activations", "gradients"})
    higher_is_better = True
    rank_priority = 30
    cost = "1 forward + backward"
    description = "mean_x |Σ_p h·∂L_x/∂h|: first-order Taylor importance (per-sample loss)"
    shares = frozenset({"hg"})  # the gradient only through hg_sums(): a feeder may fold it in at once

    def setup(self) -> None:
        self.add_state("n", torch.zeros((), dtype=torch.float64), "sum")
        self.add_state("total", zeros(self.units), "sum")

    def update(self, batch: UnitBatch) -> None:
        if batch.act is None or not batch.has_grad():
            return
        self.n = self.n + batch.act.shape[0]
        self.total = self.total + batch.hg_sums()["abs"].to(self.total.device)

    def compute(self) -> torch.Tensor:
        return safe_div(self.total, self.n.expand(self.units))


class TaylorDelta(Taylor):
    name = "taylor_delta"
    rank_priority = 0  # signed: higher (removal hurts more) is fitter, like ablation
    description = "−mean_x Σ_p h·∂L_x/∂h: signed first-order estimate of the zero-ablation loss change"

    def update(self, batch: UnitBatch) -> None:
        if batch.act is None or not batch.has_grad():
            return
        self.n = self.n + batch.act.shape[0]
        self.total = self.total + batch.hg_sums()["sum"].to(self.total.device)

    def compute(self) -> torch.Tensor:
        return -safe_div(self.total, self.n.expand(self.units))
