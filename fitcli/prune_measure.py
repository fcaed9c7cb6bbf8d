"""What pruning measures: parameters, FLOPs per example, the loss and accuracy over the data,
and each unit's range over the data (a unit whose range is within ``CONST_TOL`` is constant and
is folded into its consumers' bias instead of being zeroed: ``consumer_constants``, ``fold``)."""

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


def consumer_constants(module: nn.Module, plans: dict[str, Any], data, device: torch.device
                       ) -> dict[tuple[str, int], list[torch.Tensor] | None]:
    """Per (layer, unit): the constant value of each of its consumers' input columns over the
    data (one tensor per consumer), or None where some column varies."""
    mods = dict(module.named_modules())
    cols: dict[str, set[int]] = {}
    for p in plans.values():
        for lst in p.consumers.values():
            for cname, idxs in lst:
                cols.setdefault(cname, set()).update(idxs)
    index = {c: sorted(s) for c, s in cols.items()}
    if not index:  # no unit to fold: no pass over the data
        return {}
    stats: dict[str, list[torch.Tensor]] = {}

    def pre(cname: str):
        conv = not isinstance(mods[cname], nn.Linear)

        def hook(m, args):
            x = args[0].detach().to(torch.float64)
            idx = torch.tensor(index[cname], device=x.device)
            v = x.index_select(1 if conv else x.dim() - 1, idx)
            v = v.movedim(1, -1) if conv else v
            v = v.reshape(-1, len(index[cname]))
            lo, hi, s = v.amin(0), v.amax(0), v.sum(0)
            if cname not in stats:
                stats[cname] = [lo, hi, s, torch.tensor(float(v.shape[0]), dtype=torch.float64)]
            else:
                a = stats[cname]
                stats[cname] = [torch.minimum(a[0], lo), torch.maximum(a[1], hi), a[2] + s, a[3] + v.shape[0]]
        return hook

    handles = [mods[c].register_forward_pre_hook(pre(c)) for c in index]
    try:
        with torch.no_grad():
            for b in data:
                b = b.to(device)
                module(*b.args, **b.kwargs)
    finally:
        for h in handles:
            h.remove()
    out: dict[tuple[str, int], list[torch.Tensor] | None] = {}
    for p in plans.values():
        for u, lst in p.consumers.items():
            vals: list[torch.Tensor] | None = []  # (a unit's consumers: listed only for fold candidates)
            for cname, idxs in lst:
                lo, hi, s, n = stats[cname]
                pos = torch.tensor([index[cname].index(i) for i in idxs])
                mean = (s / n)[pos]
                if not all(is_constant(float(a), float(b), float(c)) for a, b, c in zip(lo[pos], hi[pos], mean, strict=True)):
                    vals = None
                    break
                assert vals is not None
                vals.append(mean.cpu())
            out[(p.layer, u)] = vals
    return out


def fold_reason(mod: nn.Module, c: torch.Tensor) -> str | None:
    if isinstance(mod, nn.Linear):
        return None
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if mod.groups != 1:
            return "its consumer is a grouped convolution"
        pad = mod.padding if isinstance(mod.padding, tuple) else (mod.padding,)
        if isinstance(mod.padding, str) and mod.padding != "valid":
            pad = (1,)
        if all(p == 0 for p in pad) or bool((c == 0).all()):
            return None
        return (f"its constant value feeds the padded convolution {type(mod).__name__}: the padding makes its "
                "contribution vary at the borders, so it cannot be folded into the bias exactly")
    return f"its consumer {type(mod).__name__} has no bias to fold a constant into"


def fold(mod: nn.Module, idxs: list[int], c: torch.Tensor) -> None:
    """``bias += W[:, idxs] · c`` (a ConvNd without padding: summed over the kernel too)."""
    if bool((c == 0).all()):
        return
    w = mod.weight.detach().to(torch.float64)[:, idxs]
    cc = c.to(torch.float64).to(w.device)
    add = (w * cc.reshape(1, -1, *([1] * (w.dim() - 2)))).sum(dim=tuple(range(1, w.dim())))
    with torch.no_grad():
        if mod.bias is None:
            mod.bias = nn.Parameter(torch.zeros(mod.weight.shape[0], dtype=mod.weight.dtype, device=mod.weight.device))
        mod.bias.add_(add.to(mod.bias.dtype))
