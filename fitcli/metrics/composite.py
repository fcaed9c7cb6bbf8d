"""Composite fitness: layer-mean-normalised weighted sum of weight_norm, grad_norm, act_mean."""

from __future__ import annotations

import torch

from fitcli.metrics.activations import ActMean
from fitcli.metrics.base import Metric, UnitBatch
from fitcli.metrics.gradients import GradNorm
from fitcli.metrics.weights import Idempotent, WeightNorm

COMPONENTS: dict[str, tuple[type[Metric], float]] = {
    "weight_norm": (WeightNorm, 0.4),
    "grad_norm": (GradNorm, 0.4),
    "act_mean": (ActMean, 0.2),
}


class Composite(Metric):
    name = "composite"
    needs = frozenset({"weights"})
    optional_needs = frozenset({"activations", "gradients"})
    higher_is_better = True
    cost = "as its components"
    description = ("Σ_k w_k·m_k/mean_layer(m_k) over weight_norm 0.4, grad_norm 0.4, act_mean 0.2; "
                   "missing components dropped and weights renormalised")
    batch_dependent = True  # through grad_norm
    shares = frozenset({"moments", "weight_grad_norm"})  # through act_mean and grad_norm

    def setup(self) -> None:
        self.parts = {k: cls(self.units) for k, (cls, _) in COMPONENTS.items()}
        for k, part in self.parts.items():
            for sname, (default, reduce) in part._states.items():
                self.add_state(f"{k}__{sname}", default, reduce)

    def _sync_in(self) -> None:
        for k, part in self.parts.items():
            for sname in part._states:
                setattr(part, sname, getattr(self, f"{k}__{sname}"))

    def _sync_out(self) -> None:
        for k, part in self.parts.items():
            for sname in part._states:
                setattr(self, f"{k}__{sname}", getattr(part, sname))

    def update(self, batch: UnitBatch) -> None:
        self._sync_in()
        for part in self.parts.values():
            if isinstance(part, Idempotent) and bool((part.value > float("-inf")).all()):
                continue  # weights only: every batch would set the same value again
            part.update(batch)
        self._sync_out()

    def used(self) -> list[str]:
        """Components with at least one finite value (one never fed, e.g. no gradients, is dropped)."""
        self._sync_in()
        return [k for k, part in self.parts.items() if bool(torch.isfinite(part.compute()).any())]

    def compute(self) -> torch.Tensor:
        self._sync_in()
        used = self.used()
        if not used:
            return torch.full((self.units,), float("nan"), dtype=torch.float64)
        total_w = sum(COMPONENTS[k][1] for k in used)
        out = torch.zeros(self.units, dtype=torch.float64)
        for k in used:
            m = self.parts[k].compute().to(out.device)
            mean = m[torch.isfinite(m)].mean()  # a non-finite unit makes only itself NaN
            if mean != 0:
                sign = 1.0 if self.parts[k].higher_is_better else -1.0  # every term oriented "higher is fit"
                out = out + sign * (COMPONENTS[k][1] / total_w) * m / mean
            else:
                out = out + torch.where(torch.isfinite(m), torch.zeros_like(m), m)
        return out

    def info(self) -> dict:
        return {"components": self.used(), "weights": {k: COMPONENTS[k][1] for k in self.used()}}
