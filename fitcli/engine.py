"""One pass over the data feeding every chosen metric, in three named stages:

- ``plan``: discover the layers, work out what this run can give (weights, activations,
  gradients, labels, a baseline, ablation), pick the metrics whose needs are met (the others are
  skipped with the reason) and make one metric state per layer;
- ``stream``: per batch, one forward with the activation points tapped and one backward
  (``autograd.grad`` of the summed per-sample losses, so the user's ``.grad`` fields are never
  touched); metrics that need a second pass (entropy) get one more forward without gradients.
  Only per-unit states are kept between batches, so memory does not grow with the batches;
- ``collect``: each state's ``compute()``, with the metrics' declared facts for the report.

Metrics that need exact ablation get it from the ablation engine (``fitcli.ablation``) through
``Metric.update_ablation``. Nothing here asks a metric its name: what a metric needs and how it is
fed comes from its declared contract.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from fitcli import distributed
from fitcli.attention import attention_probabilities
from fitcli.data import Batch, half_data
from fitcli.discovery import Layer, ModelGraph, discover
from fitcli.discovery.blocks import find_blocks
from fitcli.discovery.roles import KindChoice, choose
from fitcli.errors import (
    InputError,
    RuntimeAuditError,
    UsageError,
    close_matches,
    forward_error,
)
from fitcli.feeder import (
    HALF,
    OVERWRITTEN,
    ablation_wanted,
    activation_batch,
    add_gradient,
    data_driven,
    feed_metrics,
    norms_suffice,
    overwritten,
    reads_late,
    weight_grad_readers,
    weights_batch,
)
from fitcli.losses import LossFn, OutputChange, primary_output, resolve_loss
from fitcli.metrics.base import NEEDS, Metric, Scratch, UnitBatch
from fitcli.metrics.gradients import WeightGradients
from fitcli.metrics.registry import default_metrics, get_metric
from fitcli.precision import DTYPES, Float32Loss, cast_model, dtype_name, model_dtype  # noqa: F401  (re-exported)
from fitcli.progress import NO_PROGRESS, Progress

RUN_NEEDS = ("activations", "gradients", "labels", "ablation", "attention")  # what a forward over data gives


@dataclass
class AuditResult:
    graph: ModelGraph
    layers: list[Layer]
    values: dict[str, dict[str, torch.Tensor]]  # layer -> metric -> [units]
    metric_info: dict[str, dict]  # metric -> declared contract, description, per-layer info
    skipped: list[dict[str, str]]
    samples: int = 0
    batches: int = 0
    device: str = "cpu"
    loss_name: str | None = None
    nonfinite_loss_batches: int = 0
    notes: list[str] = field(default_factory=list)
    layer_extra: dict[str, dict] = field(default_factory=dict)  # per-layer report fields (ablate)
    loss_fn: LossFn | None = field(default=None, repr=False)  # the loss the audit used (for validation)
    coverage: dict = field(default_factory=dict)  # what was audited, of what the model has
    reached: set[str] = field(default_factory=set)  # layers whose activation got a gradient
    overwritten: set[str] = field(default_factory=set)  # layers whose activation the model wrote into later
    kinds: KindChoice = field(default_factory=KindChoice)  # the unit kinds audited, each layer's kind


@dataclass
class AuditPlan:
    """What one audit will compute, decided before any data is read beyond one example batch."""

    graph: ModelGraph
    layers: list[Layer]
    classes: dict[str, type[Metric]]
    state: dict[str, dict[str, Metric]]  # layer -> metric -> state
    have: dict[str, str | None]  # need -> None when available, else the reason it is not
    skipped: list[dict[str, str]]
    device: torch.device
    loss_fn: LossFn | None = None
    loss_name: str | None = None
    notes: list[str] = field(default_factory=list)
    kinds: KindChoice = field(default_factory=KindChoice)  # the unit kinds audited, each layer's kind

    def fed(self, layer: str, pass_index: int) -> list[Metric]:
        """The metrics of ``layer`` that learn from batches in pass ``pass_index``."""
        return [m for m in self.state[layer].values() if data_driven(m) and pass_index < m.passes]

    @property
    def passes(self) -> int:
        return max((m.passes for ms in self.state.values() for m in ms.values() if data_driven(m)), default=1)

    @property
    def wants_gradients(self) -> bool:
        return self.have["gradients"] is None and self.loss_fn is not None and any(
            "gradients" in m.all_needs() for ms in self.state.values() for m in ms.values())

    def weight_grad_layers(self) -> list[Layer]:
        """The layers with a metric that reads the weight gradient (one that needs both the weights
        and gradients: grad_norm, the composite); the backward asks autograd for those alone."""
        return [lay for lay in self.layers if not lay.weight_only
                and any({"weights", "gradients"} <= m.all_needs() for m in self.state[lay.name].values())]

    @property
    def wants_labels(self) -> bool:
        return self.have["labels"] is None

    @property
    def streams(self) -> bool:
        return bool(self.layers) and self.have["activations"] is None and any(
            data_driven(c) for c in self.classes.values())


def pick_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec not in ("cpu", "cuda") and not spec.startswith("cuda:"):
        raise UsageError(f"device {spec!r}: use cpu, cuda or auto")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("device cuda: no CUDA device is available here", hint="use the cpu (or auto) device")
    return torch.device(spec)


def select_layers(graph: ModelGraph, patterns: list[str] | None) -> list[Layer]:
    """Layers matching any of the patterns (names or globs); by default every layer except the
    opt-in ones (attention heads: asked for by name or glob, e.g. ``*.heads``)."""
    if not patterns:
        return [lay for lay in graph.layers if not opt_in_layer(lay)]
    names = [lay.name for lay in graph.layers]
    chosen: set[str] = set()
    for pat in patterns:
        if len(pat) > 500:  # fnmatch is quadratic on unclosed brackets: refuse before matching
            raise UsageError(f"layer pattern of {len(pat)} characters is too long (at most 500)")
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise UsageError(f"layer {pat!r} matches no auditable layer" + close_matches(pat, names),
                             hint="fitcli.inspect(model) lists the layers",
                             cli_hint="`fitcli inspect MODEL` lists the layers")
        chosen.update(hits)
    return [lay for lay in graph.layers if lay.name in chosen]


def opt_in_layer(lay: Layer) -> bool:
    """Is ``lay`` audited only when asked for by name or glob (attention heads)?"""
    return lay.kind.opt_in


def kind_skips(chosen: list[Layer], classes: dict[str, type[Metric]], skipped: list[dict]) -> list[dict]:
    """The metrics of the run that an opt-in layer asked for cannot have (a head has no consumer
    layer; attention probabilities not reachable), each with its reason and the layers: skipped in
    the report, never a NaN in the table."""
    listed = {s["metric"] for s in skipped}
    found: dict[tuple[str, str], list[str]] = {}
    for lay in chosen:
        if not opt_in_layer(lay):
            continue
        for n, cls in classes.items():
            why = cls.unavailable(lay) or ("no activations on weight-only layers"
                                           if lay.weight_only and data_driven(cls) else None)
            if why and n not in listed:
                found.setdefault((n, why), []).append(lay.name)
    return [{"metric": n, "reason": why, "layers": names} for (n, why), names in found.items()]


def peek(data: Iterable[Batch]) -> Batch | None:
    for b in data:
        return b
    return None


@contextmanager
def weights_require_grad(layers: list[Layer]) -> Iterator[None]:
    """Make audited weights differentiable for the pass; flags restored after (values untouched)."""
    saved = [(t, t.requires_grad) for lay in layers for t in lay.tensors]
    try:
        for w, _ in saved:
            if not w.requires_grad and w.is_floating_point():
                w.requires_grad_(True)
        yield
    finally:
        for w, flag in saved:
            w.requires_grad_(flag)


# --------------------------------------------------------------------------------------------
# plan


def _available(loaded, data, example: Batch | None, graph: ModelGraph, loss, baseline
               ) -> tuple[dict[str, str | None], LossFn | None, str | None]:
    """For each need, None when this run can give it, else the reason it cannot."""
    have: dict[str, str | None] = dict.fromkeys(NEEDS)
    have["graph"] = None if graph.method != "weights" else "no model graph: the consumers of each unit are unknown"
    have["baseline"] = None if baseline is not None else "no baseline checkpoint"
    if not loaded.runnable:
        why = "no runnable model: give the architecture (" + ("; ".join(loaded.notes) or "bare state dict") + ")"
        have.update(dict.fromkeys(RUN_NEEDS, why))
        return have, None, None
    if data is None:
        have.update(dict.fromkeys(RUN_NEEDS, "no data"))
        return have, None, None
    targets = example.targets if example is not None else None
    loss_fn, loss_name, why = resolve_loss(loss, targets, getattr(loaded, "task", None))
    if why and loss is None:  # no target at all: exact ablation measures how far the output moves
        loss_fn, loss_name = OutputChange(), "output"
        have["gradients"] = why
    elif why:
        have["gradients"] = have["ablation"] = why
    if isinstance(loss_fn, OutputChange):
        have["gradients"] = have["gradients"] or ("the output-change loss is 0 with a zero gradient at the "
                                                  "model itself: gradient metrics need targets or another loss")
    if targets is None or targets.is_floating_point():
        have["labels"] = "no integer class targets in the data"
    return have, loss_fn, loss_name


def _choose(names: list[str], have: dict[str, str | None]) -> tuple[dict[str, type[Metric]], list[dict[str, str]]]:
    classes: dict[str, type[Metric]] = {}
    skipped: list[dict[str, str]] = []
    for n in names:
        cls = get_metric(n)  # UsageError for unknown or broken
        missing = [have[k] for k in sorted(cls.needs) if have.get(k) is not None]
        if missing:
            skipped.append({"metric": n, "reason": missing[0]})
        else:
            classes[n] = cls
    return classes, skipped


def _weights_update(plan: AuditPlan, baseline) -> None:
    """Feed each metric that reads weights the weights-only batch (weights, baseline, consumers)."""
    baseline_sd = baseline.state_dict if baseline is not None else {}
    for lay in plan.layers:
        base_w = None
        if baseline is not None:
            parts = [baseline_sd.get(pname) for pname, _, _ in lay.parts]
            missing = [pname for (pname, _, _), b in zip(lay.parts, parts, strict=True) if b is None]
            if missing:
                plan.skipped.append({"metric": "weight_change", "reason": f"the baseline has no {missing[0]}"})
            for (pname, t, _), b in zip(lay.parts, parts, strict=True):
                if b is not None and tuple(b.shape) != tuple(t.shape):
                    raise InputError(f"baseline {pname} has shape {tuple(b.shape)}, model has {tuple(t.shape)}")
            base_w = lay.rows(parts) if not missing else None
        ub = weights_batch(lay, plan.graph, plan.device, base_w)
        for m in plan.state[lay.name].values():
            if "weights" in m.all_needs():
                m.update(ub)


def plan(loaded, data, *, metrics: list[str] | None = None, layers: list[str] | None = None, loss=None,
         baseline=None, device: str | torch.device = "auto", rank_by: str | None = None,
         kinds: list[str] | None = None) -> AuditPlan:
    """Layers, metrics and their states for an audit of ``loaded`` on ``data``. ``kinds``: the unit
    kinds (``discovery.roles``; None: heads, mlp and blocks for a transformer, else by layers)."""
    dev = device if isinstance(device, torch.device) else pick_device(device)
    example = peek(data) if data is not None and loaded.runnable else None
    if data is not None and loaded.runnable and example is None:
        raise InputError(f"data {getattr(data, 'spec', '')}: yields no batches (empty data)")
    graph = discover(loaded.module, loaded.state_dict, example=example, exported=loaded.format == "export")
    if not graph.layers:  # still a report: its coverage says that nothing was audited, and why
        graph.notes.append("no auditable layer found (nn.Linear, nn.ConvNd, Conv1D, nn.Bilinear, recurrent, "
                           "embedding): nothing was audited")
    chosen, kind_choice = choose(graph.layers, select_layers(graph, layers), bool(layers), kinds, loaded.module,
                                 lambda: find_blocks(loaded.module, example) if example is not None else [])
    have, loss_fn, loss_name = _available(loaded, data, example, graph, loss, baseline)
    if loss_fn is not None and model_dtype(loaded.module) in HALF and not isinstance(loss_fn, Float32Loss):
        loss_fn = Float32Loss(loss_fn)  # a half-precision output: the per-sample losses in float32
    names = list(dict.fromkeys(metrics)) if metrics else default_metrics()
    classes, skipped = _choose(names, have)
    if rank_by not in (None, "auto") and rank_by not in classes:
        why = next((s["reason"] for s in skipped if s["metric"] == rank_by), "it was not asked for")
        raise UsageError(f"cannot rank by {rank_by!r}: this run cannot compute it ({why})")
    state: dict[str, dict[str, Metric]] = {lay.name: {} for lay in chosen}
    for lay in chosen:
        for n, cls in classes.items():
            if cls.unavailable(lay) is None and not (lay.weight_only and data_driven(cls)):
                state[lay.name][n] = cls(lay.units).to(dev)
    for n, cls in classes.items():  # asked for by name and possible on none of the chosen layers: say why
        if metrics and n in metrics and chosen and not any(n in state[lay.name] for lay in chosen):
            why = sorted({cls.unavailable(lay) or "no activations on weight-only layers" for lay in chosen})
            skipped.append({"metric": n, "reason": "; ".join(why)})
    skipped.extend(kind_skips(chosen, classes, skipped))
    notes = list(loaded.notes) + list(graph.notes)
    if loss_name == "lm" and classes:
        notes.append("loss lm: next-token cross-entropy; the targets (labels, else input_ids) are shifted by one "
                     "token, and padding is ignored")
    p = AuditPlan(graph=graph, layers=chosen, classes=classes, state=state, have=have, skipped=skipped,
                  device=dev, loss_fn=loss_fn, loss_name=loss_name, notes=notes, kinds=kind_choice)
    _weights_update(p, baseline)
    return p


# --------------------------------------------------------------------------------------------
# stream


class _Tap:
    """The callback run at one layer's activation point during a forward: keeps the activation for
    the backward and lets the metrics take what they can from it while it is in cache."""

    def __init__(self, lay: Layer, metrics: list[Metric], pass_index: int, batch_index: int, grads: bool,
                 scratch: Scratch, acts: dict[str, torch.Tensor], ubs: dict[str, UnitBatch],
                 mask: torch.Tensor | None = None):
        self.lay, self.metrics, self.p, self.bi, self.grads = lay, metrics, pass_index, batch_index, grads
        self.scratch, self.acts, self.ubs, self.mask = scratch, acts, ubs, mask

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.p > 0 and not self.metrics:
            return t  # nothing to learn from this layer in this pass
        if self.p == 0 and self.grads and not t.requires_grad and t.is_floating_point():
            t = t.detach().requires_grad_(True)
        if self.p == 0:
            self.acts[self.lay.name] = t  # kept for the backward
        self.ubs[self.lay.name] = activation_batch(self.lay, t, self.metrics, self.bi, pass_index=self.p,
                                                   scratch=self.scratch, mask=self.mask)
        return t


def _forward(plan: AuditPlan, batch: Batch, callbacks: dict, use_grad: bool, acts: dict[str, torch.Tensor],
             result: AuditResult, bi: int):
    try:
        with plan.graph.tap(callbacks), torch.set_grad_enabled(use_grad):
            if not use_grad:
                return plan.graph(batch), None, {}, {}
            owners = plan.weight_grad_layers()
            full = {lay.name for lay in owners if not norms_suffice(weight_grad_readers(plan.state[lay.name]))}
            with weights_require_grad(owners):
                outputs = plan.graph(batch)
                return (outputs, *_backward(outputs, batch, plan.loss_fn, owners, acts, result, full))
    except (InputError, RuntimeAuditError):
        raise
    except Exception as e:  # the model or the data: an input problem, with both shapes
        raise forward_error(e, batch, plan.graph, bi) from e


def _correct(outputs, batch: Batch) -> torch.Tensor | None:
    if batch.targets is None:
        return None
    out = primary_output(outputs)
    if out.dim() >= 2 and batch.targets.dim() == 1:
        return out.argmax(dim=-1) == batch.targets.to(out.device)
    return None


def stream(plan: AuditPlan, data, result: AuditResult, progress: Progress = NO_PROGRESS, group: Any = None,
           watch: Callable[[Batch], Any] | None = None) -> None:
    """Every batch of ``data`` through the model, once per pass, feeding the planned metrics.
    ``watch(batch)``: a context manager around each forward of the first pass (observers that
    read the same forward, such as ``residual.InfluenceWatch``).

    ``group``: a process group (or ``distributed.Dist``): this rank streams its shard of the
    batches (batch i on rank i % world), and after each pass the metric states and counts are
    all-reduced with their declared reductions, so every rank ends with the global states."""
    d = _dist(group)
    local = distributed.shard(data, d)
    grads = plan.wants_gradients
    scratch = Scratch()  # temporaries reused across batches and layers
    metrics = [m for lay in plan.layers for m in plan.state[lay.name].values()]
    # the states the plan left (weights) are the same on every rank: not to be summed again
    snap = distributed.snapshot(metrics) if d is not None else None
    finite_batches = 0
    for p in range(plan.passes):
        with distributed.phase(d):
            finite = _stream_pass(plan, local, result, p, grads, scratch, progress, watch if p == 0 else None)
        if p == 0:
            finite_batches = finite
        if d is not None:
            if p == 0:
                finite_batches = _reduce_counts(d, plan, result, finite)
            snap = distributed.reduce_states(d, metrics, snap)
        if p == 0 and grads and result.batches and finite_batches == 0:
            raise RuntimeAuditError("the loss is non-finite (NaN or Inf) on every batch",
                                    hint="check the model's weights and the data for NaN/Inf")


def _stream_pass(plan: AuditPlan, data, result: AuditResult, p: int, grads: bool, scratch: Scratch,
                 progress: Progress, watch: Callable[[Batch], Any] | None = None) -> int:
    """One pass over ``data``; returns how many batches had a finite loss (pass 0)."""
    fed = {lay.name: plan.fed(lay.name, p) for lay in plan.layers}
    use_grad = p == 0 and grads
    finite_batches = 0
    with progress.task("scoring" if p == 0 else "entropy pass", getattr(data, "total", None)) as bar:
        for bi, cpu_batch in enumerate(data):
            batch = cpu_batch.to(plan.device)
            acts: dict[str, torch.Tensor] = {}
            ubs: dict[str, UnitBatch] = {}
            callbacks = {lay.name: _Tap(lay, fed[lay.name], p, bi, grads, scratch, acts, ubs, batch.mask)
                         for lay in plan.layers if not lay.weight_only}
            with attention_probabilities(plan, fed) as probs, (watch(batch) if watch else nullcontext()):
                outputs, losses, g, wg = _forward(plan, batch, callbacks, use_grad, acts, result, bi)
            if p == 0:
                result.batches += 1
                result.samples += batch.size
                finite_batches += int(losses is not None and bool(torch.isfinite(losses).any()))
            correct = _correct(outputs, batch) if plan.wants_labels else None
            for lay in plan.layers:
                ub = ubs.get(lay.name)
                if ub is None:
                    continue
                if lay.name in g:
                    add_gradient(ub, lay, g[lay.name])
                ub.weight_grad, norms = wg.get(lay.name, (None, None))
                if norms is not None:  # the per-unit norms alone (every reader of this layer reads those)
                    ub.set_weight_grad_norm(norms)
                ub.correct = correct
                ub.attention = probs.get(lay.name)
                ub.query_mask = batch.mask if ub.attention is not None else None
                ms = fed[lay.name]
                if overwritten(ub):  # Σh·g would read values the model wrote over: left out, with the reason
                    result.overwritten.add(lay.name)
                    ms = [m for m in ms if not reads_late(m)]
                feed_metrics(ms, "update", ub, lay, bi)
            # nothing of this batch outlives it: its gradients would sit beside the next batch's backward
            del acts, ubs, outputs, g, wg, losses, callbacks, correct, batch, cpu_batch, probs
            bar.advance()
    return finite_batches


def _reduce_counts(d: distributed.Dist, plan: AuditPlan, result: AuditResult, finite: int) -> int:
    """Batches, samples and the loss flags summed over the ranks; the layers whose activation got
    a gradient on any rank. Returns the global count of batches with a finite loss."""
    batches, samples, nonfinite, finite_all = distributed.reduce_counts(
        d, [result.batches, result.samples, result.nonfinite_loss_batches, finite])
    result.batches, result.samples, result.nonfinite_loss_batches = int(batches), int(samples), int(nonfinite)
    if plan.layers:
        flags = torch.tensor([float(lay.name in result.reached) for lay in plan.layers], dtype=torch.float64)
        got = distributed.all_reduce(d, [flags], "max")[0]
        result.reached = {lay.name for lay, f in zip(plan.layers, got.tolist(), strict=True) if f > 0}
    return int(finite_all)


def _dist(group: Any) -> distributed.Dist | None:
    return group if group is None or isinstance(group, distributed.Dist) else distributed.of(group)


def _backward(outputs, batch: Batch, loss_fn: LossFn, chosen: list[Layer], acts: dict[str, torch.Tensor],
              result: AuditResult, full: set[str] | None = None):
    """Per-sample losses, dL_x/dh at every tapped point, and per layer of ``chosen`` the pair
    (dL_batch/dW rows for the layers in ``full``, else None; ‖dL_batch/dW[i]‖ otherwise, else None)
    (batch mean). Each weight gradient is reduced as autograd produces it and freed
    (``WeightGradients``): the weight gradients are never all alive at once."""
    losses = loss_fn(outputs, batch)
    if losses.dim() != 1 or losses.shape[0] != batch.size:
        raise InputError(f"the loss returned shape {tuple(losses.shape)}; expected one value per sample ({batch.size})")
    finite = torch.isfinite(losses)
    if not finite.all():
        result.nonfinite_loss_batches += 1
    total = torch.where(finite, losses, torch.zeros_like(losses)).sum()
    names = [n for n in acts if acts[n].requires_grad]
    owners = [lay for lay in chosen if not lay.weight_only]  # the layers whose weight gradient a metric reads
    if not total.requires_grad:
        return losses.detach(), {}, {}
    with WeightGradients(owners, batch.size, full) as wg:
        # past the activations: autograd's stand-ins for the weight gradients (zero-strided: no memory)
        gs = torch.autograd.grad(total, [acts[n] for n in names] + wg.params, allow_unused=True)[: len(names)]
    # a None gradient: the activation does not reach the loss (off the loss path), not a zero
    grads = {n: g.detach() for n, g in zip(names, gs, strict=True) if g is not None}
    result.reached.update(grads)
    wgrads = {n: (wg.rows.get(n), wg.norms.get(n)) for n in {*wg.rows, *wg.norms}}
    return losses.detach(), grads, wgrads


# --------------------------------------------------------------------------------------------
# ablation, through the contract


# --------------------------------------------------------------------------------------------
# collect


OFF_PATH = "no gradient: not on the loss path"


def collect(plan: AuditPlan, result: AuditResult, streamed: bool = False) -> AuditResult:
    off_path = {lay.name for lay in plan.layers
                if streamed and plan.wants_gradients and not lay.weight_only and lay.name not in result.reached}
    for lay in plan.layers:
        result.values[lay.name] = {}
        for n, m in plan.state[lay.name].items():
            if lay.name in off_path and "gradients" in m.needs:
                result.skipped.append({"metric": n, "layer": lay.name, "reason": OFF_PATH})
                continue
            if lay.name in result.overwritten and reads_late(m):
                result.skipped.append({"metric": n, "layer": lay.name, "reason": OVERWRITTEN})
                continue
            value = m.compute().detach().cpu()
            agg = getattr(lay.kind, "aggregate", None)  # a kind reporting per-point values summed (hidden channels)
            result.values[lay.name][n] = agg(lay, n, value) if agg is not None else value
            info = m.info()
            if info:
                result.metric_info.setdefault(n, {}).setdefault("layers", {})[lay.name] = info
    for n, cls in plan.classes.items():  # the metrics computed on some layer (not those no chosen layer can have)
        if any(n in plan.state[lay.name] for lay in plan.layers):
            result.metric_info.setdefault(n, {}).update(cls.contract())
    for name in off_path:
        result.layer_extra.setdefault(name, {})["gradient"] = OFF_PATH
    audited = [lay for lay in plan.layers if streamed and not lay.weight_only
               and any(data_driven(m) and "activations" in m.needs for m in plan.state[lay.name].values())]
    left_out = None
    if plan.kinds.kinds is not None:
        left_out = (f"not among the unit kinds audited ({', '.join(plan.kinds.kinds)}): projection rows and "
                    "other layers are audited with the kind rows")
    result.coverage = coverage(plan.graph, audited, plan.layers, left_out)
    return result


def coverage(graph: ModelGraph, audited: list[Layer], chosen: list[Layer], left_out: str | None = None) -> dict:
    """How many units were audited from their activations, the share of the model's parameters
    they own (their layers and the per-channel modules of their chains), and every parameterised
    module that was not audited, with the reason."""
    model = graph.runner
    params: dict[int, int] = {}
    owner: dict[str, list[int]] = {}
    if model is not None:
        for mname, mod in model.named_modules():
            for p in mod.parameters(recurse=False):
                params.setdefault(id(p), p.numel())
                owner.setdefault(mname, []).append(id(p))
    else:  # weights only: every tensor of the layers' state dict entries counts
        for lay in graph.layers:
            for _, t, _ in lay.parts:
                params.setdefault(id(t), t.numel())
    covered: set[int] = set()
    for lay in audited:
        covered.update(id(t) for t in lay.tensors)
        if lay.bias is not None:
            covered.add(id(lay.bias))
        for m in lay.chain_modules:
            covered.update(owner.get(m, []))
    audited_names = {lay.name for lay in audited}
    not_audited = []
    for lay in graph.layers:
        if lay.name in audited_names:
            continue
        if lay.weight_only:
            why = "weights only: embedding rows have no activation (weight metrics only)"
        elif lay not in chosen:
            why = left_out or "not among the layers asked for"
        elif graph.method == "weights":
            why = "weights only: no runnable model, or no data"
        else:
            why = "no activation metric ran (no data, or none asked for)"
        not_audited.append({"name": lay.name, "type": lay.type, "parameters": lay.n_params, "reason": why})
    for u in graph.unsupported:  # the model's own parameters (not in a submodule) are under the name ""
        n = sum(params.get(i, 0) for i in owner.get(u["name"], []))
        not_audited.append({"name": u["name"], "type": u.get("type", "?"), "parameters": n, "reason": u["reason"]})
    total = sum(params.values())
    got = sum(params[i] for i in covered if i in params)
    return {"units": sum(lay.units for lay in audited), "layers": len(audited), "parameters": got,
            "model_parameters": total, "fraction": got / total if total else 0.0, "not_audited": not_audited}


def audit(loaded, data, *, metrics: list[str] | None = None, layers: list[str] | None = None, loss=None,
          baseline=None, device: str | torch.device = "auto", progress: Progress = NO_PROGRESS,
          ablation_mode: str = "zero", chunk_size: int | None = None, rank_by: str | None = None,
          group: Any = None, ablate: Callable[..., None] | None = None, kinds: list[str] | None = None,
          watch: Callable[..., Any] | None = None) -> AuditResult:
    """Plan, stream, collect: every chosen metric over the data in one streamed pass (plus one for
    entropy, plus exact ablation for the metrics that need it). ``group``: a process group; each
    rank streams its shard and every rank ends with the global result (``fitcli.distributed``).
    ``ablate``: the exact-ablation pass for metrics that need it (``fitcli.ablation.feed_plan``,
    which the API passes in: the engine does not depend on the ablation engine). ``watch``: see
    ``stream``; ``watch(kinds)`` is called once the plan has chosen the kinds and returns the
    per-batch context manager (or None)."""
    d = _dist(group)
    data = half_data(data, model_dtype(getattr(loaded, "module", None)))
    with distributed.phase(d):  # discovery reads batch 0 on every rank (a probe: no statistics)
        p = plan(loaded, data, metrics=metrics, layers=layers, loss=loss, baseline=baseline, device=device,
                 rank_by=rank_by, kinds=kinds)
        result = AuditResult(graph=p.graph, layers=p.layers, values={}, metric_info={}, skipped=p.skipped,
                             device=str(p.device), loss_name=p.loss_name, notes=p.notes, loss_fn=p.loss_fn,
                             kinds=p.kinds)
        if p.graph.runner is not None and (p.streams or p.have["ablation"] is None):
            p.graph.runner.to(p.device)
    if p.streams:
        stream(p, data, result, progress, group=d, watch=watch(p.kinds, p.graph) if watch is not None else None)
    if p.have["ablation"] is None and ablation_wanted(p):
        if ablate is None:
            raise UsageError("metrics that need exact ablation need the ablation pass (ablate=fitcli.ablation.feed_plan)")
        ablate(p, data, mode=ablation_mode, chunk_size=chunk_size, progress=progress, group=d)
    return collect(p, result, streamed=p.streams)
