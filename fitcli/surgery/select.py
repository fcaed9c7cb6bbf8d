"""Uniform plans from per-unit scores: the same number of units goes from every block (and, with
grouped-query attention, the same number of query heads from every key-value group), so the
result fits a stock config. The units with the lowest fitness go."""

from __future__ import annotations

import torch

from fitcli.errors import UsageError
from fitcli.surgery.arch import find_family
from fitcli.surgery.hf import Plan


def lowest(scores: torch.Tensor, remove: int, higher_is_better: bool = True) -> list[int]:
    """The ``remove`` least fit indices of ``scores`` (ties: the lower index goes first)."""
    s = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    s = torch.nan_to_num(s, nan=float("-inf") if higher_is_better else float("inf"))
    order = sorted(range(s.numel()), key=lambda i: (float(s[i]) if higher_is_better else -float(s[i]), i))
    return sorted(order[:remove])


def uniform_plan(model, mlp_scores: dict[int, torch.Tensor] | None = None, mlp_remove: int = 0,
                 head_scores: dict[int, torch.Tensor] | None = None, heads_remove_per_group: int = 0,
                 higher_is_better: bool = True) -> Plan:
    """A ``Plan`` that removes ``mlp_remove`` MLP channels from every block in ``mlp_scores``
    and ``heads_remove_per_group`` query heads from each key-value group of every block in
    ``head_scores`` (without GQA a group is all the heads), the least fit by the scores."""
    fam = find_family(model)
    plan = Plan()
    for i, sc in sorted((mlp_scores or {}).items()):
        width = fam.mlp(int(i)).consumer.weight.shape[1]
        if len(sc) != width or not 0 <= mlp_remove < width:
            raise UsageError(f"block {i}: {len(sc)} MLP scores for {width} channels, {mlp_remove} to remove")
        gone = set(lowest(sc, mlp_remove, higher_is_better))
        plan.mlp[int(i)] = [j for j in range(width) if j not in gone]
    for i, sc in sorted((head_scores or {}).items()):
        a = fam.attn(int(i))
        per = a.heads // a.kv_heads
        if len(sc) != a.heads or not 0 <= heads_remove_per_group < per:
            raise UsageError(f"block {i}: {len(sc)} head scores for {a.heads} heads in groups of {per}, "
                             f"{heads_remove_per_group} to remove per group")
        gone = set()
        for g in range(a.kv_heads):
            local = lowest(torch.as_tensor(sc)[g * per:(g + 1) * per], heads_remove_per_group, higher_is_better)
            gone.update(g * per + j for j in local)
        plan.heads[int(i)] = [j for j in range(a.heads) if j not in gone]
    return plan


__all__ = ["lowest", "uniform_plan"]
