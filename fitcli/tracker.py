"""``Tracker``: the streaming metrics of an audit, collected during the caller's own training steps.

>>> with fitcli.Tracker(model, "history.jsonl", every=100, optimizer=opt) as tracker:
...     for x, y in loader:
...         loss = F.cross_entropy(model(x), y)      # mean over the batch: loss_reduction="mean"
...         opt.zero_grad(); loss.backward(); opt.step()   # the optimizer's step advances the tracker

What it observes (no extra forward or backward of its own):

- the *steps*: counted by ``tracker.step()``, or by the optimizer's ``step()`` when ``optimizer``
  is given. Steps 0, N, 2N, ... (``every=N``) are observed; every training-mode forward of the
  model during an observed step (several with gradient accumulation) is one batch of that step;
- each forward's activations at the activation points discovery finds (forward hooks, and for
  functional nonlinearities a ``TorchFunctionMode`` active during the model's forward only);
- the backward the caller runs, if any: tensor hooks on those activations and on the audited
  weights read the gradients and return ``None``, so every gradient the caller sees is unchanged.

At the end of an observed step (the next ``step()``, or ``close()``) one JSON line is appended to
the history file: the step, per layer and metric one value per unit, and the dead units (dormancy
score ≤ ``tau``, final layer excluded). The values are those an offline ``fitcli.audit`` of the
step's batches gives with the weights of that step and the per-sample loss whose reduction the
caller's loss is (``loss_reduction``): gradients are rescaled to per-sample-loss gradients.

Activation points are found by run-time discovery (``fitcli.discovery``) on the first observed
forward's inputs, with two extra forwards of that batch in eval mode under ``torch.no_grad`` and a
forked RNG (so the caller's random stream and BatchNorm statistics are untouched), or on
``example`` when one is given: one finds the points, one notes which points the model writes
into in place later (``out += identity``), whose activation is then copied at the tap (Σh·g
reads it at the backward). Nothing of the model is changed; ``close()`` (or leaving the
``with`` block) removes every hook.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fitcli.data import Batch
from fitcli.discovery import Layer, ModelGraph, runtime_discover
from fitcli.engine import select_layers
from fitcli.errors import InputError, UsageError
from fitcli.feeder import (
    OVERWRITTEN,
    activation_batch,
    add_gradient,
    data_driven,
    dead_marker,
    feed_metrics,
    folds_gradient,
    mark,
    norms_suffice,
    overwritten,
    reads_late,
    weight_grad_readers,
    weights_batch,
    written_since,
)
from fitcli.history import FORMAT, died_at, history_summary, read_history
from fitcli.metrics.base import Metric, Scratch, UnitBatch, rownorm
from fitcli.metrics.registry import default_metrics, get_metric

TRACKABLE_NEEDS = frozenset({"weights", "graph", "activations", "gradients"})
STREAMING_NEEDS = frozenset({"activations", "gradients"})


def trackable(cls: type[Metric]) -> str | None:
    """Why a metric cannot be tracked from training steps alone, or None when it can."""
    extra = sorted(cls.needs - TRACKABLE_NEEDS)
    if extra:
        return f"it needs {', '.join(extra)}, which a training step does not give"
    if cls.passes != 1:
        return f"it needs {cls.passes} passes over the same data (a training step has one forward)"
    return None


def _metric_classes(names: list[str] | None) -> dict[str, type[Metric]]:
    if names is None:  # the streaming ones: they need the step's activations or gradients
        return {n: c for n in default_metrics()
                if trackable(c := get_metric(n)) is None and c.needs & STREAMING_NEEDS}
    out = {}
    for n in dict.fromkeys(names):
        cls = get_metric(n)  # UsageError for an unknown name
        why = trackable(cls)
        if why:
            raise UsageError(f"metric {n!r} cannot be tracked: {why}")
        out[n] = cls
    return out


def _check_loss(loss_reduction: str, loss_scale: float) -> None:
    if loss_reduction not in ("mean", "sum"):
        raise UsageError(f"loss_reduction {loss_reduction!r}: use 'mean' (the loss is the batch mean of the "
                         "per-sample losses) or 'sum' (their sum)")
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)) or not math.isfinite(loss_scale) \
            or loss_scale <= 0:
        raise UsageError(f"loss_scale must be a positive number, not {loss_scale!r}")


DIGITS = 8  # significant digits of a value in the history file: beyond float32's ~7.2, as short as that allows


def _floats_of(values: list[dict[str, torch.Tensor]]) -> list[dict[str, list[float | None]]]:
    """Each layer's metric values as lists (None where not finite): every layer's values in one
    tensor, transferred at once (a record holds tens of thousands of values; a few operations per
    layer would cost more than the values). The history file keeps ``DIGITS`` significant digits."""
    flat = [v if v.dim() == 1 else v.reshape(-1) for d in values for v in d.values()]
    if not flat:
        return [{} for _ in values]
    try:
        table = torch.cat(flat).detach().to("cpu", torch.float64)  # one transfer (cat promotes mixed dtypes)
    except RuntimeError:  # layers on several devices (a model split across GPUs)
        table = torch.cat([v.detach().to("cpu", torch.float64) for v in flat])
    sizes = [len(t) for t in flat]
    if bool(torch.isfinite(table).all()):  # the usual case: one check for the whole record
        finite = [True] * len(flat)
    else:
        finite = [bool(torch.isfinite(t).all()) for t in table.split(sizes)]
    rows, out, at, k = table.tolist(), [], 0, 0
    for d in values:
        got = {}
        for n in d:
            row = rows[at: at + sizes[k]]
            got[n] = row if finite[k] else [v if math.isfinite(v) else None for v in row]
            at, k = at + sizes[k], k + 1
        out.append(got)
    return out


_SEP = (",", ":")
_G = "%." + str(DIGITS) + "g"  # a float's text at DIGITS significant digits
_ROW_FORMATS: dict[int, str] = {}


def _numbers(row: list[float | None]) -> str:
    """A list of values as JSON, each at ``DIGITS`` significant digits: one ``%`` over a format
    string of the row's length (made once per length) formats them all in one C call, where a
    join calls into Python per value."""
    if None in row:
        return "[" + ",".join("null" if v is None else _G % v for v in row) + "]"
    fmt = _ROW_FORMATS.get(len(row))
    if fmt is None:
        fmt = _ROW_FORMATS[len(row)] = "[" + ",".join([_G] * len(row)) + "]"
    return fmt % tuple(row)


def record_line(rec: dict[str, Any]) -> str:
    """A record's JSON line: what ``json.dumps`` writes, but each metric's list of values formatted
    with ``%.8g`` in one join (the encoder's float ``repr`` per value was most of the record's
    cost). A value that is a whole number reads back as an int."""
    head = json.dumps({k: v for k, v in rec.items() if k != "layers"}, allow_nan=False, separators=_SEP)
    parts = []
    for name, entry in rec["layers"].items():
        fields = [json.dumps(k) + ":" + ("{" + ",".join(json.dumps(m) + ":" + _numbers(row) for m, row in v.items()) + "}"
                                         if k == "metrics" else json.dumps(v, allow_nan=False, separators=_SEP))
                  for k, v in entry.items()]
        parts.append(json.dumps(name) + ":{" + ",".join(fields) + "}")
    return head[:-1] + ',"layers":{' + ",".join(parts) + "}}"


class _Roles:
    """What each metric of one layer takes from a step, decided once (the metric objects are
    reused for every window)."""

    def __init__(self, ms: dict[str, Metric]):
        self.fed = [m for m in ms.values() if data_driven(m)]  # fed from batches
        self.weights = [m for m in ms.values() if "weights" in m.all_needs()]  # fed the weights at the window's start
        self.readers = weight_grad_readers(ms)  # read the weight gradient
        self.wants_grad = any("gradients" in m.all_needs() for m in self.fed)
        self.fold = folds_gradient(self.fed)  # Σh·g taken in the gradient hook, the gradient let go
        self.marker = dead_marker(ms)


class _Window:
    """The metric states of one observed step, and the batches waiting for their gradients."""

    def __init__(self, step: int, state: dict[str, dict[str, Metric]]):
        self.step, self.state = step, state
        self.batches = self.samples = 0
        self.size = 0  # samples of the current batch
        self.pending: list[tuple[Layer, UnitBatch]] = []
        self.wgrads: dict[str, list[torch.Tensor | None]] = {}  # layer -> one gradient per part
        self.wnorms: dict[str, torch.Tensor] = {}  # layer -> row norms of its weight gradient (this batch)
        self.twice: set[str] = set()  # layers whose weight got two gradients from one forward
        self.reached: set[str] = set()  # layers whose activation got a gradient
        self.stale: set[str] = set()  # layers whose activation the model wrote into after the tap
        self.handles: list[Any] = []  # parameter gradient hooks of the current batch


class Tracker:
    """Streaming fitness metrics of ``model`` during the caller's training loop (see the module
    docstring). ``history``: the JSON-lines file each observed step appends one record to (None:
    records are kept in ``tracker.records`` only). ``every``: observe steps 0, N, 2N, ...
    ``metrics``/``layers``: names (layers: globs too); by default the streaming metrics: every
    registered default metric that needs the step's activations or gradients and that one
    training step can feed (weight-only metrics such as ``weight_norm`` on request). ``loss_reduction``: how
    the caller's loss relates to the per-sample losses L_x: ``"mean"`` (1/B·Σ_x L_x over the B
    samples of the batch, dimension 0 of the inputs) or ``"sum"`` (Σ_x L_x); ``loss_scale``: a
    factor on top (the loss backpropagated is ``loss_scale`` times that: 1/k when k accumulated
    micro-batches are averaged, an AMP GradScaler's scale). ``optimizer``: its ``step()`` advances the tracker.
    ``train_only``: observe only forwards with ``model.training`` set (not evaluation).
    ``example``: a batch (a tensor, a tuple of positional inputs, or a dict of keyword inputs)
    to discover the activation points on now, instead of on the first observed forward."""

    def __init__(self, model: nn.Module, history: str | os.PathLike | None = None, *, every: int = 1,
                 metrics: list[str] | None = None, layers: list[str] | None = None, tau: float = 0.0,
                 loss_reduction: str = "mean", loss_scale: float = 1.0, optimizer: torch.optim.Optimizer | None = None,
                 train_only: bool = True, example: Any = None):
        if not isinstance(model, nn.Module):
            raise UsageError(f"model must be an nn.Module, not {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise UsageError(f"every must be a positive integer, not {every!r}")
        if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not math.isfinite(tau) or tau < 0:
            raise UsageError(f"tau must be a finite number ≥ 0, not {tau!r}")
        self.model, self.every, self.tau, self.train_only = model, every, float(tau), train_only
        _check_loss(loss_reduction, loss_scale)
        self.loss_reduction, self.loss_scale = loss_reduction, float(loss_scale)
        self.classes = _metric_classes(metrics)
        self.layer_patterns = list(layers) if layers else None
        self.history = Path(history) if history is not None else None
        self.records: list[dict] = []
        self.last: dict | None = None
        self.steps = 0  # steps completed (the index of the current step)
        self.graph: ModelGraph | None = None
        self.layers: list[Layer] = []
        self._window: _Window | None = None
        self._made: dict[str, dict[str, Metric]] | None = None  # the metric states, reset per window
        self._roles: dict[str, _Roles] = {}
        self._norm_hooked: set[str] = set()  # layers whose weight carries the (lasting) row-norm hook
        self._norm_target: _Window | None = None  # the window those hooks feed, while a batch is open
        self._scratch = Scratch()
        self._keep: set[str] = set()  # layers whose activation the model overwrites later: copied at the tap
        self._busy = False  # inside discovery's own forward
        self._tap: contextlib.ExitStack | None = None
        self._file = None
        self._handles: list[Any] = []
        try:
            if self.history is not None:
                try:
                    self._file = open(self.history, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
                except OSError as e:
                    raise UsageError(f"history file {history}: cannot be opened for appending "
                                     f"({e.strerror or type(e).__name__})") from e
            if example is not None:
                self._discover(_as_batch(example))
            self._handles.append(model.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(model.register_forward_hook(self._post, always_call=True))
            if optimizer is not None:
                self._handles.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step()))
        except BaseException:
            self._remove()
            raise

    # ---- lifetime ------------------------------------------------------------------------------
    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None:  # the loop failed: its open step is partial, so it is not recorded
            self._remove()
            self._window = None
        self.close()

    def close(self) -> None:
        """Write the record of an observed step still open, and remove every hook. Calling it
        again does nothing."""
        try:
            if self._window is not None and self._window.batches:
                self._finish()
        finally:
            self._remove()
            self._window = None

    def _remove(self) -> None:
        self._norm_target = None
        if self._tap is not None:
            self._tap.close()
            self._tap = None
        if self._window is not None:
            for h in self._window.handles:
                h.remove()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._file is not None:
            self._file.close()
            self._file = None

    # ---- steps ---------------------------------------------------------------------------------
    @property
    def observing(self) -> bool:
        """Is the current step one that is observed?"""
        return self.steps % self.every == 0

    def step(self) -> dict | None:
        """End the current training step (call it once per step, after the optimizer's step, unless
        the tracker was given the optimizer). Returns the record written for it, if observed."""
        rec = None
        if self._window is not None and self._window.batches:
            rec = self._finish()
        self._window = None
        self.steps += 1
        return rec

    # ---- discovery -------------------------------------------------------------------------------
    def _discover(self, batch: Batch) -> None:
        """Layers and activation points, from one forward of ``batch`` in eval mode without
        gradients and with a forked RNG: the model's state and the caller's RNG are untouched."""
        model = self.model
        modes = [(m, m.training) for m in model.modules()]
        devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
        self._busy = True
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                model.eval()
                graph = runtime_discover(model, batch)
                chosen = [lay for lay in select_layers(graph, self.layer_patterns) if lay.kind.tappable(lay)]
                if not chosen:
                    raise InputError("no auditable layer with an activation point was found in the model")
                self._keep = _written_after(graph, chosen, batch)
        finally:
            for m, flag in modes:
                m.training = flag
            self._busy = False
        self.graph, self.layers = graph, chosen

    def _states(self) -> dict[str, dict[str, Metric]]:
        """Fresh metric states for a window: made once, reset for each window after."""
        if self._made is None:
            self._made = {lay.name: {n: cls(lay.units).to(lay.weight.device) for n, cls in self.classes.items()
                                     if cls.unavailable(lay) is None} for lay in self.layers}
            self._roles = {name: _Roles(ms) for name, ms in self._made.items()}  # the same objects every window
        else:  # in place: the last record holds lists, nothing of these tensors
            Metric.reset_many([m for ms in self._made.values() for m in ms.values()])
        return self._made

    def _weights_update(self, w: _Window) -> None:
        """The weights-only metrics, from the weights as they are at the step's first forward."""
        assert self.graph is not None
        for lay in self.layers:
            if self._roles[lay.name].weights:
                feed_metrics(self._roles[lay.name].weights, "update", weights_batch(lay, self.graph), lay, -1)

    # ---- hooks ---------------------------------------------------------------------------------
    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._busy or self._tap is not None or not self.observing or (self.train_only and not module.training):
            return
        batch = Batch(tuple(args), dict(kwargs))
        if self.graph is None:
            self._discover(batch)
        w = self._window
        if w is None:
            w = self._window = _Window(self.steps, self._states())
            self._weights_update(w)
        self._flush(w)
        w.batches += 1
        w.samples += batch.size
        scale = self._grad_scale(batch.size)
        mask = batch.mask
        callbacks = {lay.name: self._callback(w, lay, scale, mask) for lay in self.layers}
        self._param_hooks(w)
        w.size = batch.size
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(self.graph.tap(callbacks))
        except BaseException:
            stack.close()
            raise
        self._tap = stack

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._tap is not None and not self._busy:
            tap, self._tap = self._tap, None
            tap.close()
            w = self._window
            for lay, ub in w.pending if w is not None else ():
                if overwritten(ub):  # not seen at discovery (another path through the model): copied from now on
                    w.stale.add(lay.name)
                    self._keep.add(lay.name)

    def _grad_scale(self, size: int) -> float:
        """Factor turning the gradient of the caller's loss into that of Σ_x L_x."""
        per_sample = float(size) if self.loss_reduction == "mean" else 1.0
        return per_sample / self.loss_scale

    def _callback(self, w: _Window, lay: Layer, scale: float, mask: torch.Tensor | None):
        roles = self._roles[lay.name]
        metrics, wants_grad, bi = roles.fed, roles.wants_grad, w.batches - 1

        def tap(t: torch.Tensor) -> torch.Tensor:
            ub = activation_batch(lay, t, metrics, bi, scratch=self._scratch, mask=mask,
                                  quick_moments=True,  # below the 8 digits a record keeps
                                  keep=lay.name in self._keep)
            w.pending.append((lay, ub))
            if wants_grad and t.requires_grad:
                def on_grad(g: torch.Tensor) -> None:  # reads only: the caller's gradient is unchanged
                    add_gradient(ub, lay, g, scale, fold=roles.fold)  # scaled where a metric reads it, not here
                    w.reached.add(lay.name)
                t.register_hook(on_grad)
            return t  # the very tensor: the model computes exactly what it would without the tracker

        return tap

    def _param_hooks(self, w: _Window) -> None:
        """Per batch: the gradient of the batch-mean loss w.r.t. each audited weight (grad_norm).
        Where the layer's metrics read only its row norms (and the layer has one weight), the
        norms are taken in the hook, while the gradient is in cache, and nothing is kept: holding
        the gradient would make autograd copy it into ``.grad`` instead of handing it over."""
        for lay in self.layers:
            readers = self._roles[lay.name].readers
            if not readers:
                continue
            if len(lay.parts) == 1 and norms_suffice(readers):
                t = lay.tensors[0]
                if t.requires_grad and lay.name not in self._norm_hooked:  # once: it reads the batch's window
                    self._handles.append(t.register_hook(self._grad_norms(lay)))
                    self._norm_hooked.add(lay.name)
                continue
            parts: list[torch.Tensor | None] = [None] * len(lay.parts)
            w.wgrads[lay.name] = parts
            for i, t in enumerate(lay.tensors):
                if t.requires_grad:
                    w.handles.append(t.register_hook(self._param_grad(parts, i)))
        self._norm_target = w

    @staticmethod
    def _param_grad(parts: list[torch.Tensor | None], i: int):
        def hook(g: torch.Tensor) -> None:
            g = g.detach()
            parts[i] = g.clone() if parts[i] is None else parts[i] + g
        return hook

    def _grad_norms(self, lay: Layer):
        """The hook taking a weight gradient's row norms, registered once: it feeds the window of
        the observed batch whose backward runs (``_norm_target``), and nothing otherwise."""
        def hook(g: torch.Tensor) -> None:
            w = self._norm_target
            if w is None:
                return
            if lay.name in w.wnorms:  # a second backward through one forward: the norms of the
                w.twice.add(lay.name)  # sum are not those of the parts, and the parts are gone
            w.wnorms[lay.name] = rownorm(lay.rows([g.detach()]))
        return hook

    # ---- feeding and records -------------------------------------------------------------------
    def _flush(self, w: _Window) -> None:
        """Feed the metrics the batch of the previous forward (its backward has run, if any)."""
        self._norm_target = None
        for h in w.handles:
            h.remove()
        w.handles.clear()
        pending, w.pending = w.pending, []
        size = w.size
        factor = self._grad_scale(size) / size if size else 1.0  # to the gradient of the batch-mean loss
        for lay, ub in pending:
            parts = w.wgrads.get(lay.name)
            if lay.name in w.wnorms:
                ub.set_weight_grad_norm(w.wnorms[lay.name] * factor)
            elif parts is not None and any(p is not None for p in parts):
                full = [p if p is not None else torch.zeros_like(t) for p, t in zip(parts, lay.tensors, strict=True)]
                rows = lay.rows(full)
                ub.weight_grad = rows if factor == 1.0 else rows * factor
            with torch.no_grad():
                feed_metrics(self._roles[lay.name].fed, "update", ub, lay, w.batches - 1)
        w.wgrads.clear()
        w.wnorms.clear()

    def _computed(self, w: _Window) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, str]]]:
        """Per layer: each metric's values of this step, and the metrics skipped with the reason."""
        computed: dict[str, dict[str, torch.Tensor]] = {}
        skipped: dict[str, dict[str, str]] = {}
        for lay in self.layers:
            computed[lay.name], skipped[lay.name] = {}, {}
            readers = self._roles[lay.name].readers
            for n, m in w.state[lay.name].items():
                if "gradients" in m.needs and lay.name not in w.reached:
                    skipped[lay.name][n] = "no gradient: no backward reached this layer during the step"
                    continue
                if lay.name in w.stale and reads_late(m):
                    skipped[lay.name][n] = OVERWRITTEN + "; it is copied at the tap from the next step on"
                    continue
                if lay.name in w.twice and m in readers:
                    skipped[lay.name][n] = ("two backward passes through one forward: the weight gradient of the "
                                            "batch was not kept (one backward per forward gives it)")
                    continue
                agg = getattr(lay.kind, "aggregate", None)  # a kind reporting per-point values summed (hidden channels)
                computed[lay.name][n] = agg(lay, n, m.compute()) if agg is not None else m.compute()
        return computed, skipped

    def _finish(self) -> dict:
        w = self._window
        assert w is not None
        self._flush(w)
        self._window = None
        computed, skipped = self._computed(w)
        layers: dict[str, dict] = {}
        for lay, values in zip(self.layers, _floats_of([computed[lay.name] for lay in self.layers]), strict=True):
            entry: dict[str, Any] = {"units": lay.units, "final": bool(lay.final), "metrics": values}
            marker = self._roles[lay.name].marker
            if marker in values and not lay.final:
                entry["dead"] = [i for i, v in enumerate(values[marker]) if v is not None and v <= self.tau]
            if skipped[lay.name]:
                entry["skipped"] = skipped[lay.name]
            layers[lay.name] = entry
        rec = {"format": FORMAT, "step": w.step, "time": round(time.time(), 3), "batches": w.batches,
               "samples": w.samples, "tau": self.tau, "layers": layers}
        if self._file is not None:
            self._file.write(record_line(rec) + "\n")
            self._file.flush()
        else:
            self.records.append(rec)
        self.last = rec
        return rec


def _written_after(graph: ModelGraph, layers: list[Layer], batch: Batch) -> set[str]:
    """The layers whose activation the model writes into in place after the point (``out +=
    identity``), from one forward of ``batch`` with taps that note each point's version counter:
    their activation is copied at the tap (the tracker reads it again at the backward)."""
    seen: dict[str, tuple[torch.Tensor, int]] = {}

    def note(name: str):
        def tap(t: torch.Tensor) -> torch.Tensor:
            seen[name] = mark(t)
            return t
        return tap

    with graph.tap({lay.name: note(lay.name) for lay in layers}):
        graph(batch)
    return {name for name, marked in seen.items() if written_since(marked)}


def _as_batch(example: Any) -> Batch:
    if isinstance(example, Batch):
        return example
    if isinstance(example, torch.Tensor):
        return Batch((example,), {})
    if isinstance(example, dict):
        return Batch((), dict(example))
    if isinstance(example, (tuple, list)):
        return Batch(tuple(example), {})
    raise UsageError(f"example must be a tensor, a tuple of inputs or a dict of keyword inputs, "
                     f"not {type(example).__name__}")


__all__ = ["Tracker", "FORMAT", "trackable", "read_history", "history_summary", "died_at"]
