"""Weight metrics: incoming norm, outgoing norm, change against a baseline checkpoint."""

from __future__ import annotations

import torch

from fitcli.metrics.base import Metric, UnitBatch, rownorm, safe_div, zeros


class Idempotent(Metric):
    """State is a per-unit value that every batch sets to the same thing: merged by max."""

    higher_is_better = True

    def setup(self) -> None:
        self.add_state("value", torch.full((self.units,), float("-inf"), dtype=torch.float64), "max")

    def _set(self, v: torch.Tensor) -> None:
        self.value = torch.maximum(self.value, v.to(self.value.device))

    def compute(self) -> torch.Tensor:
        v = self.value.clone()
        return torch.where(torch.isneginf(v), torch.full_like(v, float("nan")), v)


class WeightNorm(Idempotent):
    name = "weight_norm"
    rank_priority = 10
    needs = frozenset({"weights"})
    cost = "weights only"
    description = "‖W[i, ...]‖₂: ℓ2 norm of unit i's incoming weights (bias excluded)"

    def update(self, batch: UnitBatch) -> None:
        self._set(rownorm(batch.weight))


class WeightNormOut(Idempotent):
    name = "weight_norm_out"
    needs = frozenset({"weights", "graph"})
    cost = "weights only"
    description = "‖W_next[:, i, ...]‖₂ over the layer(s) that consume unit i directly (through elementwise ops)"

    @classmethod
    def unavailable(cls, layer) -> str | None:
        if getattr(getattr(layer, "kind", None), "is_head", False):
            return ("a head's outgoing weights are a slice of the output projection's input, not a consuming "
                    "layer's: not computed for heads")
        return None if getattr(layer, "consumers", None) else "the layers consuming this one are unknown"

    def update(self, batch: UnitBatch) -> None:
        if not batch.consumer_weights:
            return
        sq = zeros(self.units).to(batch.weight.device)
        for w in batch.consumer_weights:
            if w.dim() < 2 or w.shape[1] != self.units:
                return  # grouped/ reshaped consumer: not unit-aligned
            # float64 sums of squares over every axis but the input one (once per audit: weights only)
            w = w.detach().to(torch.float64).transpose(0, 1).reshape(w.shape[1], -1)  # [in, out*k]
            sq = sq + (w**2).sum(dim=1)
        self._set(sq.sqrt())


class WeightChange(Idempotent):
    name = "weight_change"
    needs = frozenset({"weights", "baseline"})
    cost = "weights only"
    description = "‖W[i] − W_base[i]‖₂ against the baseline checkpoint"

    def update(self, batch: UnitBatch) -> None:
        if batch.baseline_weight is None:
            return
        d = batch.weight.detach().to(torch.float64) - batch.baseline_weight.to(batch.weight.device, torch.float64)
        self._set(rownorm(d))


class WeightChangeRel(Idempotent):
    name = "weight_change_rel"
    needs = frozenset({"weights", "baseline"})
    cost = "weights only"
    description = "‖W[i] − W_base[i]‖₂ / ‖W_base[i]‖₂ against the baseline checkpoint"

    def update(self, batch: UnitBatch) -> None:
        if batch.baseline_weight is None:
            return
        base = batch.baseline_weight.to(batch.weight.device, torch.float64)
        d = batch.weight.detach().to(torch.float64) - base
        self._set(safe_div(rownorm(d), rownorm(base)))
