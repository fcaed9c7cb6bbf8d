"""Calibration sums for compensation: the inputs of each consumer (the down projection for MLP
channels, the output projection for heads), streamed once over the data into float64 Gram
sums (``SplitGram``). The model is left as it was: hooks removed, train/eval mode restored."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fitcli.compensate import SplitGram
from fitcli.surgery.arch import find_family
from fitcli.surgery.hf import Plan


def _inputs(batch) -> tuple[dict, torch.Tensor | None]:
    """Model keyword arguments and the real-token mask of one batch (a dict of tensors, or a
    tensor of token ids)."""
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch}, None
    if isinstance(batch, dict):
        mask = batch.get("attention_mask")
        return dict(batch), mask
    raise TypeError(f"a calibration batch is a tensor of token ids or a dict of tensors, not {type(batch).__name__}")


def consumers(model: nn.Module, plan: Plan) -> dict[tuple[str, int], nn.Module]:
    """``("mlp", i)`` / ``("heads", i)`` -> the module whose input holds those units."""
    fam = find_family(model)
    out = {("mlp", int(i)): fam.mlp(int(i)).consumer.m for i in plan.mlp}
    out.update({("heads", int(i)): fam.attn(int(i)).o.m for i in plan.heads})
    return out


def collect_stats(model: nn.Module, batches: Iterable, plan: Plan, every: int = 5) -> dict[tuple[str, int], SplitGram]:
    """One pass over ``batches``: for every consumer the plan cuts, Σxxᵀ, Σx and the count of its
    input rows (real tokens only), with every ``every``-th row of a batch held out for choosing λ."""
    targets = consumers(model, plan)
    stats: dict[tuple[str, int], SplitGram] = {}
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def hook_for(key):
        def hook(_module, args):
            x = args[0].detach()
            rows = x.reshape(-1, x.shape[-1])
            mask = current["mask"]
            if mask is not None and mask.numel() * x.shape[-1] == x.numel():
                rows = rows[mask.reshape(-1).to(torch.bool).to(rows.device)]
            if key not in stats:
                stats[key] = SplitGram(x.shape[-1], every=every, device=x.device)
            stats[key].update(rows)
        return hook

    handles = [m.register_forward_pre_hook(hook_for(k)) for k, m in targets.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                kwargs, current["mask"] = _inputs(batch)
                model(**kwargs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats


__all__ = ["collect_stats", "consumers"]
