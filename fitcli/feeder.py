"""The metric feeder: what a forward and a backward give one layer, as the ``UnitBatch`` its
metrics read. The offline audit (``fitcli.engine``) and the training-time tracker
(``fitcli.tracker``) both feed through here, so the same batch and weights give the same values:

- ``activation_batch``: the tapped activation as ``[batch, units, positions]`` (half precision
  widened to float32: the model ran in its dtype, the statistics do not), the padding mask, and
  the shared per-batch statistics computed once per layer during the forward (``prepare``);
- ``add_gradient``: the per-sample-loss gradient at the activation point (with the factor a
  batch-mean loss leaves on it, multiplied in only where a metric reads the gradient itself);
- ``weights_batch``: the weights-only batch (weights, baseline, consumers' weights);
- ``dead_marker``: which metric of a layer marks dead units (``Metric.marks_dead``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fitcli.data import HALF
from fitcli.discovery import Layer, ModelGraph, token_mask
from fitcli.errors import FitcliError, Interrupted, RuntimeAuditError
from fitcli.metrics.base import Metric, Scratch, UnitBatch

DATA_NEEDS = frozenset({"activations", "gradients", "labels", "attention"})


def widen(t: torch.Tensor) -> torch.Tensor:
    """A half-precision activation or gradient as float32, for the statistics (the model itself
    ran in half precision); anything else as it is."""
    return t.float() if t.dtype in HALF else t


def data_driven(m: Metric | type[Metric]) -> bool:
    """Does this metric learn from batches (as opposed to weights alone)?"""
    return bool(m.all_needs() & DATA_NEEDS)


def reads_weights(metrics: list[Metric]) -> bool:
    return any("weights" in m.all_needs() for m in metrics)


def weight_grad_readers(metrics: Mapping[str, Metric] | list[Metric]) -> list[Metric]:
    """The metrics that read the weight gradient (they need both the weights and gradients)."""
    ms = metrics.values() if isinstance(metrics, Mapping) else metrics
    return [m for m in ms if {"weights", "gradients"} <= m.all_needs()]


def norms_suffice(metrics: list[Metric]) -> bool:
    """Do these weight-gradient readers read it only through its row norms?"""
    return all("weight_grad_norm" in m.shares for m in metrics)


def dead_marker(metrics: Mapping[str, Metric]) -> str | None:
    """The name of the metric among ``metrics`` whose value ≤ τ marks a unit dead, if any."""
    return next((n for n, m in metrics.items() if m.marks_dead), None)


def feed_metrics(metrics: list[Metric], method: str, ub: UnitBatch, lay: Layer, batch_index: int) -> None:
    """Call ``prepare`` or ``update`` of each metric. A metric that raises (a plugin's bug) is
    named as such, not mistaken for a data/model mismatch (prepare() runs inside the forward)."""
    m = None
    try:
        for m in metrics:
            getattr(m, method)(ub)
    except (FitcliError, Interrupted):
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise RuntimeAuditError(f"metric {m.name if m is not None else '?'!r} failed on layer {lay.name}, "
                                f"batch {batch_index}: {type(e).__name__}{': ' + msg if msg else ''}") from e


def activation_batch(lay: Layer, t: torch.Tensor, metrics: list[Metric], batch_index: int, *, pass_index: int = 0,
                     scratch: Scratch | None = None, mask: torch.Tensor | None = None,
                     quick_moments: bool = False, keep: bool = False) -> UnitBatch:
    """The batch of one layer from its tapped activation ``t``, with the metrics' shared
    statistics computed now, while the activation is in cache (``Metric.prepare``).
    ``quick_moments``: see ``UnitBatch.quick_moments`` (the tracker). ``keep``: the model writes
    into ``t`` after the point (``out += identity``): the batch reads a copy taken now."""
    w = lay.weight.detach() if reads_weights(metrics) else None
    src = t.detach()
    ub = UnitBatch(weight=w, act=widen(lay.view(src.clone() if keep else src)), pass_index=pass_index,
                   scratch=scratch, mask=token_mask(t, lay, mask), quick_moments=quick_moments,
                   relu_output=type(t.grad_fn).__name__ == "ReluBackward0",
                   source=None if keep else mark(t))
    with torch.no_grad():
        feed_metrics(metrics, "prepare", ub, lay, batch_index)
    return ub


def mark(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A tensor and its version counter now: ``written_since`` tells whether it was written into."""
    return t, t._version


def written_since(marked: tuple[torch.Tensor, int] | None) -> bool:
    return marked is not None and marked[0]._version != marked[1]


def overwritten(ub: UnitBatch) -> bool:
    """Did the model write into the tensor ``ub.act`` views after the tap (an in-place op after the
    activation point, as ``out += identity``)? Then ``act`` no longer holds the activation: what
    was taken during the forward (``prepare``) stands, what reads it later (Σh·g) would be wrong."""
    return written_since(ub.source)


def reads_late(m: Metric | type[Metric]) -> bool:
    """Does this metric read the activation after the forward (with the gradient: Σh·g)?"""
    return {"activations", "gradients"} <= m.needs


OVERWRITTEN = ("the model writes into this activation in place after its point (as `out += identity`), so "
               "its values are gone by the backward")


def folds_gradient(metrics: list[Metric]) -> bool:
    """May the activation's gradient be folded into Σh·g as it arrives? Yes when every metric that
    reads gradients declares how: through ``hg`` (Σh·g), or the weight gradient's row norms only."""
    return all(m.shares & {"hg", "weight_grad_norm"} for m in metrics if "gradients" in m.all_needs())


def add_gradient(ub: UnitBatch, lay: Layer, g: torch.Tensor, scale: float = 1.0, fold: bool = False) -> None:
    """Give ``ub`` the gradient ``g * scale`` at the activation point (``g`` as the model's
    output has it; ``scale`` turns it into the per-sample-loss gradient). A second one (two
    backward passes through one forward) adds to the first. ``fold``: kept only as Σ_p h·g
    (``UnitBatch.fold_grad``; see ``folds_gradient``)."""
    g = lay.view(g.detach())
    if fold:
        ub.fold_grad(g.float() if g.dtype in HALF else g, scale)
        return
    if g.dtype in HALF:  # widened before scaling: no rounding to 8 bits of the scaled values
        g = g.float()
        if scale != 1.0:
            g.mul_(scale)
        scale = 1.0
    if not ub.has_grad():
        ub.set_grad(g, scale)
    else:
        ub.grad = ub.grad + (g if scale == 1.0 else g * scale)


def weights_batch(lay: Layer, graph: ModelGraph, device: torch.device | None = None,
                  baseline: torch.Tensor | None = None) -> UnitBatch:
    """The weights-only batch of a layer: its weights, the baseline's (if any) and the weights of
    the layers that consume its units."""
    cons = [w.detach() for c in (lay.consumers or []) if (w := graph.layer(c).in_weight) is not None]
    w = lay.weight.detach()
    return UnitBatch(weight=w if device is None else w.to(device), baseline_weight=baseline,
                     consumer_weights=cons or None)


def ablation_wanted(plan: Any) -> dict[str, list[Metric]]:
    """Per audited layer, the metrics of the plan that need exact ablation (none: empty)."""
    wanting = {lay.name: [m for m in plan.state[lay.name].values() if "ablation" in m.needs]
               for lay in plan.layers if not lay.weight_only}
    return {n: ms for n, ms in wanting.items() if ms}
