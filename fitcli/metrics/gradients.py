"""Gradient magnitude of each unit's incoming weights."""

from __future__ import annotations

import torch

from fitcli.metrics.base import Metric, UnitBatch, zeros


class GradNorm(Metric):
    name = "grad_norm"
    needs = frozenset({"weights", "gradients"})
    higher_is_better = True
    cost = "1 forward + backward"
    description = "mean over batches of ‖∂L_batch/∂W[i, ...]‖₂ (batch-mean loss; depends on batch size)"
    batch_dependent = True
    shares = frozenset({"weight_grad_norm"})

    def setup(self) -> None:
        self.add_state("total", zeros(self.units), "sum")
        self.add_state("batches", torch.zeros((), dtype=torch.float64), "sum")

    def update(self, batch: UnitBatch) -> None:
        if not batch.has_weight_grad():
            return
        self.total = self.total + batch.weight_grad_norm().to(self.total.device)
        self.batches = self.batches + 1

    def compute(self) -> torch.Tensor:
        if self.batches == 0:
            return torch.full((self.units,), float("nan"), dtype=torch.float64)
        return self.total / self.batches
