"""What pruning measures: parameters, FLOPs per example, the loss and accuracy over the data,
and each unit's range over the data (a unit whose range is within ``CONST_TOL`` is constant and
is folded into its consumers' bias instead of being zeroed)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fitcli.data import Batch
from fitcli.errors import InputError, guarded
from fitcli.losses import primary_output

CONST_TOL = 1e-6  # a unit is constant when max - min <= CONST_TOL * (1 + |mean|) over the data


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_flops(module: nn.Module, example: Batch) -> int:
    """FLOPs of one forward on ``example`` (``torch.utils.flop_counter``: matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fcm:
        module(*example.args, **example.kwargs)
    return int(fcm.get_total_flops())


def evaluate(run: Callable[[Batch], Any], data, loss_fn, device: torch.device, graph=None
             ) -> tuple[float | None, float | None]:
    """Mean per-sample loss and accuracy (class targets) of ``run(batch)`` over the data."""
    total = correct = 0.0
    n = 0
    acc_known = True
    with torch.no_grad():
        for i, b in enumerate(data):
            b = b.to(device)
            out = guarded(b, graph, i, run, b) if graph is not None else run(b)
            if loss_fn is not None:
                total += float(loss_fn(out, b).detach().to(torch.float64).sum())
            o = primary_output(out)
            t = b.targets
            if t is not None and not t.is_floating_point() and t.dim() == 1 and o.dim() == 2:
                correct += float((o.argmax(dim=-1) == t.to(o.device)).sum())
            else:
                acc_known = False
            n += b.size
    if n == 0:
        raise InputError("the data yields no batches (empty data)")
    return (total / n if loss_fn is not None else None), (correct / n if acc_known else None)


def unit_ranges(graph, names: list[str], data, device: torch.device, loss_fn
                ) -> tuple[dict[str, tuple[torch.Tensor, ...]], tuple[float | None, float | None]]:
    """Per unit of each layer, over every observation at its activation point: (min, max, mean);
    and the model's loss and accuracy on the data (the same pass)."""
    lays = {lay.name: lay for lay in graph.layers}
    acc: dict[str, list[Any]] = {}

    def grab(n: str):
        def fn(t: torch.Tensor) -> torch.Tensor:
            v = lays[n].view(t.detach()).to(torch.float64)  # [B, U, P]
            lo, hi, s, k = v.amin(dim=(0, 2)), v.amax(dim=(0, 2)), v.sum(dim=(0, 2)), v.shape[0] * v.shape[2]
            a = acc.setdefault(n, [lo, hi, s * 0, 0])
            a[0], a[1], a[2], a[3] = torch.minimum(a[0], lo), torch.maximum(a[1], hi), a[2] + s, a[3] + k
            return t
        return fn

    with graph.tap({n: grab(n) for n in names}):
        base = evaluate(graph, data, loss_fn, device, graph)
    return {n: (a[0].cpu(), a[1].cpu(), (a[2] / max(a[3], 1)).cpu()) for n, a in acc.items()}, base


def is_constant(lo: float, hi: float, mean: float) -> bool:
    return math.isfinite(lo) and math.isfinite(hi) and hi - lo <= CONST_TOL * (1.0 + abs(mean))
