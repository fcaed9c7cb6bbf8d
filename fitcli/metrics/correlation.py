"""Output correlation: does the unit fire more on correctly classified samples?"""

from __future__ import annotations

import torch

from fitcli.metrics.base import Metric, UnitBatch, safe_div, zeros


class OutputCorr(Metric):
    name = "output_corr"
    needs = frozenset({"activations", "labels"})
    higher_is_better = True  # fires more on correct predictions
    nan_expected = True  # NaN when every prediction is right (or wrong): says nothing about the unit
    cost = "1 forward"
    shares = frozenset({"moments"})
    description = "E[h̄ | correct] − E[h̄ | wrong], h̄ the sample's mean over positions; NaN when a group is empty"

    def setup(self) -> None:
        self.add_state("n_right", torch.zeros((), dtype=torch.float64), "sum")
        self.add_state("n_wrong", torch.zeros((), dtype=torch.float64), "sum")
        self.add_state("s_right", zeros(self.units), "sum")
        self.add_state("s_wrong", zeros(self.units), "sum")

    def update(self, batch: UnitBatch) -> None:
        if batch.act is None or batch.correct is None:
            return
        c = batch.correct.to(batch.act.device, torch.float64)  # 1 correct, 0 wrong
        right, total = batch.hbar_sums(c)  # Σ h̄ over correct samples (one matmul), and over all
        self.n_right = self.n_right + c.sum()
        self.n_wrong = self.n_wrong + (c.numel() - c.sum())
        self.s_right = self.s_right + right
        self.s_wrong = self.s_wrong + (total - right)

    def compute(self) -> torch.Tensor:
        return safe_div(self.s_right, self.n_right.expand(self.units)) - safe_div(self.s_wrong, self.n_wrong.expand(self.units))
