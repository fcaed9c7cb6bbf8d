"""Attention entropy per head: how spread out each head's attention is."""

from __future__ import annotations

import torch

from fitcli.metrics.base import Metric, UnitBatch, safe_div, zeros


class AttnEntropy(Metric):
    """H = −Σ_k p_k log p_k (nats) of each query position's attention distribution over the
    keys, averaged over query positions (padding queries excluded) and samples, per head.

    0: the head always attends to one key; log(keys): uniform attention. A diagnostic more than
    a fitness: heads that spread their attention evenly average their inputs and are often the
    first that can go, so lower is counted fitter (``--validate`` says whether that holds on a
    given model)."""

    name = "attn_entropy"
    needs = frozenset({"attention"})
    higher_is_better = False
    cost = "1 forward"
    description = "mean entropy (nats) of each head's attention over the keys; 0 = one key, log(keys) = uniform"

    def setup(self) -> None:
        self.add_state("ent_sum", zeros(self.units), "sum")
        self.add_state("n", zeros(self.units), "sum")

    @classmethod
    def unavailable(cls, layer) -> str | None:
        if not getattr(getattr(layer, "kind", None), "is_head", False):
            return "attention entropy is for attention heads (layers named <attention>.heads)"
        if getattr(layer, "attention", None) is None:
            return ("the attention probabilities are not reachable: a Hugging Face model returns them only in eager "
                    "mode (attn_implementation='eager'); fused attention never")
        return None

    def update(self, batch: UnitBatch) -> None:
        p = batch.attention  # [batch, heads, queries, keys]
        if p is None or p.shape[1] != self.units:
            return
        ent = torch.special.entr(p.to(torch.float64)).sum(dim=-1)  # [batch, heads, queries]; 0·log 0 = 0
        m = batch.query_mask
        if m is not None and m.shape == (p.shape[0], p.shape[2]):
            w = m.to(device=ent.device, dtype=torch.float64)[:, None, :]
            self.ent_sum = self.ent_sum + (ent * w).sum(dim=(0, 2)).to(self.ent_sum.device)
            self.n = self.n + w.sum().expand(self.units).to(self.n.device)
        else:
            self.ent_sum = self.ent_sum + ent.sum(dim=(0, 2)).to(self.ent_sum.device)
            self.n = self.n + float(ent.shape[0] * ent.shape[2])

    def compute(self) -> torch.Tensor:
        return safe_div(self.ent_sum, self.n)
