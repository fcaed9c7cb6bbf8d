"""Redundancy: how well the other units of a layer rebuild each unit's activation."""

from __future__ import annotations

import torch

from fitcli.compensate import r2_from_moments
from fitcli.metrics.base import Metric, UnitBatch, zeros

MAX_UNITS = 8192  # a float64 Gram of 8192 units is 512 MiB per layer


class Redundancy(Metric):
    """R² of each unit's activation regressed (least squares with an intercept) on the other
    units of its layer, over every observation (sample, position). 1: the layer can rebuild the
    unit from the others (a dead or constant unit too), and least-squares compensation removes
    it at no cost; 0: nothing else in the layer predicts it. The state is the layer's Gram
    matrix (Σhhᵀ, Σh, count in float64): memory grows with units², so it is opt-in."""

    name = "redundancy"
    needs = frozenset({"activations"})
    higher_is_better = False  # 1 = rebuildable from the others: the least needed
    opt_in = True
    cost = "1 forward; units² memory per layer"
    description = "R² of the unit's activation regressed on the other units of its layer (1: the layer rebuilds it)"

    @classmethod
    def unavailable(cls, layer) -> str | None:
        units = int(getattr(layer, "units", 0) or 0)
        if units > MAX_UNITS:
            return (f"needs a {units}x{units} float64 Gram matrix ({units * units * 8 / 2**30:.1f} GiB); "
                    f"computed for layers of at most {MAX_UNITS} units")
        return None

    def setup(self) -> None:
        self.add_state("n", torch.zeros((), dtype=torch.float64), "sum")
        self.add_state("s1", zeros(self.units), "sum")
        self.add_state("gram", torch.zeros(self.units, self.units, dtype=torch.float64), "sum")

    def update(self, batch: UnitBatch) -> None:
        if batch.act is None:
            return
        act = batch.observed()  # [observations or batch, units, positions]
        x = act.transpose(1, 2).reshape(-1, self.units).to(self.gram.device, torch.float64)
        self.n = self.n + x.shape[0]
        self.s1 = self.s1 + x.sum(dim=0)
        self.gram = self.gram + x.T @ x

    def compute(self) -> torch.Tensor:
        return r2_from_moments(self.gram, self.s1, float(self.n))
