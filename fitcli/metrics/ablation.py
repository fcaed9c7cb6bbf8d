"""Exact ablation: the loss change (``ablation``) and the accuracy change
(``ablation_accuracy``) when a unit is masked at its activation point.

The numbers come from the batched ablation engine (``fitcli.ablation``); these classes only hold
the mergeable state so ablation joins reports, merges and the conformance check like any metric.
``ablation_of`` says which of the engine's sums a metric takes through ``update_ablation``: the
per-sample loss changes (``"loss"``) or the changes in correct predictions (``"accuracy"``).
"""

from __future__ import annotations

import torch

from fitcli.metrics.base import Metric, UnitBatch, safe_div, zeros


class Ablation(Metric):
    name = "ablation"
    needs = frozenset({"activations", "ablation"})  # a loss, through the ablation need: not a gradient
    higher_is_better = True  # a larger loss increase when removed = more important
    opt_in = True  # a forward per unit: asked for explicitly
    cost = "1 forward per unit (batched; prefix once)"
    description = "exact L(h_i := 0) − L (zero mode) or L(h_i := E[h_i]) − L (mean mode), mean loss over the data"
    ablation_of = "loss"

    def setup(self) -> None:
        self.add_state("n", torch.zeros((), dtype=torch.float64), "sum")
        self.add_state("delta_sum", zeros(self.units), "sum")

    def update(self, batch: UnitBatch) -> None:
        """Nothing to learn from a forward: the numbers come through ``update_ablation``."""

    def update_ablation(self, delta_sum: torch.Tensor, samples: int) -> None:
        self.n = self.n + samples
        self.delta_sum = self.delta_sum + delta_sum.to(self.delta_sum.device, torch.float64)

    def compute(self) -> torch.Tensor:
        return safe_div(self.delta_sum, self.n.expand(self.units))


class AblationAccuracy(Ablation):
    """The change in the fraction of correct predictions when the unit is ablated (data with one
    integer class id per sample)."""

    name = "ablation_accuracy"
    needs = frozenset({"activations", "labels", "ablation"})
    higher_is_better = True  # as the reports have always declared it
    cost = "measured with ablation (no extra forward)"
    description = "accuracy(ablated) − accuracy: change in the fraction of correct predictions"
    ablation_of = "accuracy"
