"""Gradient magnitude of each unit's incoming weights, and how the engine collects weight
gradients without holding them: ``WeightGradients`` reduces each weight's gradient the moment
autograd produces it (a tensor hook) and lets it go."""

from __future__ import annotations

from typing import Any

import torch

from fitcli.metrics.base import Metric, UnitBatch, rownorm, zeros


class GradNorm(Metric):
    name = "grad_norm"
    needs = frozenset({"weights", "gradients"})
    higher_is_better = True
    cost = "1 forward + backward"
    description = "mean over batches of ‖∂L_batch/∂W[i, ...]‖₂ (batch-mean loss; depends on batch size)"
    batch_dependent = True
    shares = frozenset({"weight_grad_norm"})

    def setup(self) -> None:
        self.add_state("total", zeros(self.units), "sum")
        self.add_state("batches", torch.zeros((), dtype=torch.float64), "sum")

    def update(self, batch: UnitBatch) -> None:
        if not batch.has_weight_grad():
            return
        self.total = self.total + batch.weight_grad_norm().to(self.total.device)
        self.batches = self.batches + 1

    def compute(self) -> torch.Tensor:
        if self.batches == 0:
            return torch.full((self.units,), float("nan"), dtype=torch.float64)
        return self.total / self.batches


class WeightGradients:
    """Weight gradients of ``layers`` consumed as autograd produces them.

    Inside the context, a hook on each weight tensor receives that tensor's whole gradient (every
    use summed: a tied weight's too), turns it into what the layer's metrics read (the per-unit
    norms, or for ``full`` layers the ``[units, ...]`` rows) divided by ``batch_size`` (the
    batch-mean loss), and hands autograd back a zero-strided stand-in, so the gradient itself is
    freed at once: at most one layer's weight gradients are alive at a time (the parts of a layer
    with several wait for each other). ``params``: the tensors to name as ``autograd.grad``
    inputs; ``norms``/``rows``: per layer, after the backward. ``peak``: the most weight-gradient
    tensors held at once."""

    def __init__(self, layers: list, batch_size: int, full: set[str] | None = None):
        self.layers, self.size, self.full = layers, batch_size, full or set()
        self.norms: dict[str, torch.Tensor] = {}
        self.rows: dict[str, torch.Tensor] = {}
        self.params: list[torch.Tensor] = []
        self.peak = 0
        self._users: dict[int, list[tuple[Any, int]]] = {}
        self._pending: dict[str, dict[int, torch.Tensor]] = {}
        self._handles: list[Any] = []
        for lay in layers:
            for i, t in enumerate(lay.tensors):
                if id(t) not in self._users:
                    self._users[id(t)] = []
                    self.params.append(t)
                self._users[id(t)].append((lay, i))

    def __enter__(self) -> WeightGradients:
        for t in self.params:
            if t.requires_grad:
                self._handles.append(t.register_hook(self._hook(self._users[id(t)])))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if exc[0] is None:  # a layer only some of whose parts got a gradient: the rest are zero
            for name in list(self._pending):
                lay = next(lay for lay in self.layers if lay.name == name)
                got = self._pending.pop(name)
                self._finish(lay, [got[i] if i in got else torch.zeros_like(t) for i, t in enumerate(lay.tensors)])
        self._pending.clear()

    def held(self) -> int:
        return sum(len(p) for p in self._pending.values())

    def _hook(self, users: list[tuple[Any, int]]):
        def hook(g: torch.Tensor) -> torch.Tensor:
            g = g.detach()
            for lay, i in users:
                got = self._pending.setdefault(lay.name, {})
                got[i] = g
                self.peak = max(self.peak, self.held())
                if len(got) == len(lay.parts):
                    del self._pending[lay.name]
                    self._finish(lay, [got[j] for j in range(len(lay.parts))])
            return g.new_zeros(()).expand(g.shape)  # what autograd keeps: no memory

        return hook

    def _finish(self, lay: Any, parts: list[torch.Tensor]) -> None:
        with torch.no_grad():
            if lay.name in self.full:
                self.rows[lay.name] = lay.rows(parts) / self.size
            else:
                self.norms[lay.name] = rownorm(lay.rows(parts)).div_(self.size)
