"""One pass over the data feeding every chosen metric.

Per batch: one forward with the activation points tapped and one backward (``autograd.grad`` of
the summed per-sample losses, so the user's ``.grad`` fields are never touched). Metrics that
need a second pass (entropy) get one more forward without gradients. Only per-unit states are
kept between batches, so memory does not grow with the number of batches.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from fitcli.data import Batch, DataSource
from fitcli.errors import (
    FitcliError,
    InputError,
    Interrupted,
    RuntimeAuditError,
    UsageError,
    close_matches,
)
from fitcli.loading import LoadedModel
from fitcli.losses import LossFn, primary_output, resolve_loss
from fitcli.metrics.base import NEEDS, Metric, Scratch, UnitBatch
from fitcli.metrics.registry import get_metric, load_registry
from fitcli.units import Layer, ModelGraph, discover, unit_view


@dataclass
class AuditResult:
    graph: ModelGraph
    layers: list[Layer]
    values: dict[str, dict[str, torch.Tensor]]  # layer -> metric -> [units]
    metric_info: dict[str, dict]  # metric -> description, needs, extra
    skipped: list[dict[str, str]]
    samples: int = 0
    batches: int = 0
    device: str = "cpu"
    loss_name: str | None = None
    nonfinite_loss_batches: int = 0
    notes: list[str] = field(default_factory=list)
    layer_extra: dict[str, dict] = field(default_factory=dict)  # per-layer report fields (ablate)


def pick_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec not in ("cpu", "cuda") and not spec.startswith("cuda:"):
        raise UsageError(f"--device {spec!r}: use cpu, cuda or auto")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here", hint="use --device cpu or auto")
    return torch.device(spec)


def select_layers(graph: ModelGraph, patterns: list[str] | None) -> list[Layer]:
    if not patterns:
        return list(graph.layers)
    names = [lay.name for lay in graph.layers]
    chosen: set[str] = set()
    for pat in patterns:
        if len(pat) > 500:  # fnmatch is quadratic on unclosed brackets: refuse before matching
            raise UsageError(f"--layer pattern of {len(pat)} characters is too long (at most 500)")
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise UsageError(f"--layer {pat!r} matches no auditable layer" + close_matches(pat, names),
                             hint="`fitcli inspect MODEL` lists the layers")
        chosen.update(hits)
    return [lay for lay in graph.layers if lay.name in chosen]


def peek(data: Iterable[Batch]) -> Batch | None:
    for b in data:
        return b
    return None


def forward_error(e: BaseException, batch: Batch, graph: ModelGraph, index: int = 0) -> InputError:
    """A data/model mismatch as an InputError naming both shapes."""
    first = graph.layers[0] if graph.layers else None
    expect = ""
    if first is not None:
        w = first.weight
        expect = (f"; its first layer {first.name} ({first.type}) expects "
                  + (f"[..., {w.shape[1]}]" if first.type == "Linear" else f"[batch, {w.shape[1]}, ...]"))
    msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    which = "data batch" if index == 0 else f"data batch {index}"
    return InputError(f"{which} of shape {batch.describe()} does not fit the model "
                      f"({type(e).__name__}: {msg}){expect}")


@contextmanager
def weights_require_grad(layers: list[Layer]) -> Iterator[None]:
    """Make audited weights differentiable for the pass; flags restored after (values untouched)."""
    saved = [(lay.weight, lay.weight.requires_grad) for lay in layers]
    try:
        for w, _ in saved:
            if not w.requires_grad and w.is_floating_point():
                w.requires_grad_(True)
        yield
    finally:
        for w, flag in saved:
            w.requires_grad_(flag)


class Progress:
    """A rich progress bar on stderr, or nothing (quiet, or not a terminal)."""

    def __init__(self, enabled: bool, description: str, total: int | None = None):
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RP

            console = Console(stderr=True)
            if console.is_terminal:
                self.bar = RP(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), console=console, transient=True)
                self.task = self.bar.add_task(description, total=total)

    def __enter__(self) -> Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=text, completed=0)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


DATA_NEEDS = frozenset({"activations", "gradients", "labels"})


def data_driven(m: Metric | type[Metric]) -> bool:
    """Does this metric learn from batches (as opposed to weights alone)?"""
    return bool(m.needs & DATA_NEEDS)


def default_metrics() -> list[str]:
    return [n for n, e in load_registry().items() if n != "ablation" and e.cls is not None]


def audit(
    loaded: LoadedModel,
    data: DataSource | None,
    metrics: list[str] | None = None,
    layers: list[str] | None = None,
    loss: str | None = None,
    baseline: LoadedModel | None = None,
    device: str = "auto",
    progress: bool = False,
    ablation_mode: str = "zero",
    chunk_size: int | None = None,
) -> AuditResult:
    """Run every chosen metric over the data in one streamed pass (plus one for entropy)."""
    dev = pick_device(device)
    example = peek(data) if data is not None and loaded.runnable else None
    if data is not None and loaded.runnable and example is None:
        raise InputError(f"--data {data.spec}: yields no batches (empty data)")
    graph = discover(loaded.module, loaded.state_dict, example=example, exported=loaded.format == "export")
    if not graph.layers:
        raise InputError(f"{loaded.path}: no auditable layers (nn.Linear or nn.ConvNd) found")
    chosen = select_layers(graph, layers)

    # ---- what this run can provide -------------------------------------------------------------
    have: dict[str, str | None] = {k: None for k in NEEDS}  # None = available, else the reason
    have["graph"] = None if graph.method in ("fx", "export") else "the model was not traced, so consumers are unknown"
    have["baseline"] = None if baseline is not None else "no --baseline checkpoint"
    if not loaded.runnable:
        why = "no runnable model: pass --arch (" + ("; ".join(loaded.notes) or "bare state dict") + ")"
        for k in ("activations", "gradients", "labels", "ablation"):
            have[k] = why
    elif data is None:
        for k in ("activations", "gradients", "labels", "ablation"):
            have[k] = "no --data"
    loss_fn: LossFn | None = None
    loss_name = None
    if have["activations"] is None:
        loss_fn, loss_name, why = resolve_loss(loss, example.targets if example is not None else None)
        if why:
            have["gradients"] = why
            have["ablation"] = why
        t = example.targets if example is not None else None
        if t is None or t.is_floating_point():
            have["labels"] = "no integer class targets in --data"
    explicit = metrics is not None and len(metrics) > 0
    names = list(dict.fromkeys(metrics)) if explicit else default_metrics()
    classes: dict[str, type[Metric]] = {}
    skipped: list[dict[str, str]] = []
    for n in names:
        cls = get_metric(n)  # UsageError for unknown or broken
        missing = [have[k] for k in sorted(cls.needs) if k in have and have[k] is not None]
        if cls.name == "composite" or not missing:
            classes[n] = cls
        else:
            skipped.append({"metric": n, "reason": missing[0]})

    # ---- metric instances per layer -----------------------------------------------------------
    state: dict[str, dict[str, Metric]] = {lay.name: {} for lay in chosen}
    for lay in chosen:
        for n, cls in classes.items():
            if n == "weight_norm_out" and not lay.consumers:
                continue  # absent where the consumer is unknown
            if n == "ablation":
                continue  # filled by the ablation engine below
            state[lay.name][n] = cls(lay.units).to(dev)

    baseline_sd = baseline.state_dict if baseline is not None else {}
    for lay in chosen:
        base_w = baseline_sd.get(lay.name + ".weight")
        if baseline is not None and base_w is None:
            skipped.append({"metric": "weight_change", "reason": f"--baseline has no {lay.name}.weight"})
        if base_w is not None and tuple(base_w.shape) != tuple(lay.weight.shape):
            raise InputError(f"--baseline {lay.name}.weight has shape {tuple(base_w.shape)}, model has {tuple(lay.weight.shape)}")
        cons = [graph.layer(c).weight for c in (lay.consumers or [])]
        ub = UnitBatch(weight=lay.weight.detach().to(dev), baseline_weight=base_w, consumer_weights=cons or None)
        for m in state[lay.name].values():
            if not data_driven(m) or m.name == "composite":
                m.update(ub)

    result = AuditResult(graph=graph, layers=chosen, values={}, metric_info={}, skipped=skipped,
                         device=str(dev), loss_name=loss_name, notes=list(loaded.notes) + list(graph.notes))
    need_acts = any(data_driven(c) or c.name == "composite" for c in classes.values() if c.name != "ablation")
    if need_acts and have["activations"] is None:
        assert data is not None
        if graph.runner is not None:
            graph.runner.to(dev)
        _stream(graph, chosen, data, state, loss_fn, have["gradients"] is None, have["labels"] is None,
                dev, progress, result)

    if "ablation" in classes:
        from fitcli.ablation import ablate_layers

        assert data is not None and loss_fn is not None
        ab = ablate_layers(graph, [lay.name for lay in chosen], data, loss_fn, mode=ablation_mode,
                           device=dev, chunk_size=chunk_size, progress=progress)
        for lay in chosen:
            state[lay.name]["ablation"] = ab.metrics[lay.name]

    for lay in chosen:
        result.values[lay.name] = {}
        for n, m in state[lay.name].items():
            result.values[lay.name][n] = m.compute().detach().cpu()
            info = m.info()
            if info:
                result.metric_info.setdefault(n, {}).setdefault("layers", {})[lay.name] = info
    for n, cls in classes.items():
        result.metric_info.setdefault(n, {}).update({"description": cls.description, "needs": sorted(cls.needs)})
    return result


def _stream(graph: ModelGraph, chosen: list[Layer], data: DataSource, state: dict[str, dict[str, Metric]],
            loss_fn: LossFn | None, want_grads: bool, want_labels: bool, dev: torch.device,
            progress: bool, result: AuditResult) -> None:
    grad_layers = want_grads and loss_fn is not None and any(
        "gradients" in m.needs or m.name == "composite" for ms in state.values() for m in ms.values())
    passes = max((m.passes for ms in state.values() for m in ms.values() if data_driven(m)), default=1)
    total = data.total
    finite_batches = 0
    scratch = Scratch()  # temporaries reused across batches and layers
    for p in range(passes):
        label = "scoring" if p == 0 else "entropy pass"
        active = {lay.name: [m for m in state[lay.name].values() if (data_driven(m) or m.name == "composite") and p < m.passes]
                  for lay in chosen}  # the metrics fed in this pass, per layer
        with Progress(progress, label, total) as bar:
            for bi, cpu_batch in enumerate(data):
                batch = cpu_batch.to(dev)
                acts: dict[str, torch.Tensor] = {}
                ubs: dict[str, UnitBatch] = {}

                def grab(lay: Layer, acts: dict[str, torch.Tensor] = acts, ubs: dict[str, UnitBatch] = ubs, p: int = p,
                         bi: int = bi, active: dict[str, list[Metric]] = active):
                    ms = active[lay.name]

                    def fn(t: torch.Tensor) -> torch.Tensor:
                        if p > 0 and not ms:
                            return t  # nothing to learn from this layer in this pass
                        if p == 0 and grad_layers and not t.requires_grad and t.is_floating_point():
                            t = t.detach().requires_grad_(True)
                        if p == 0:
                            acts[lay.name] = t  # kept for the backward
                        # statistics of the activation alone are taken now, while it is in cache
                        ub = UnitBatch(weight=lay.weight.detach(), act=unit_view(t.detach(), lay.unit_dim), pass_index=p,
                                       scratch=scratch)
                        with torch.no_grad():
                            _feed(ms, "prepare", ub, lay, bi)
                        ubs[lay.name] = ub
                        return t
                    return fn

                callbacks = {lay.name: grab(lay) for lay in chosen}
                use_grad = p == 0 and grad_layers
                try:
                    with graph.tap(callbacks), torch.set_grad_enabled(use_grad):
                        if use_grad:
                            with weights_require_grad(chosen):
                                outputs = graph(batch)
                                losses, grads, wgrads = _backward(outputs, batch, loss_fn, chosen, acts, result)
                        else:
                            outputs = graph(batch)
                            losses, grads, wgrads = None, {}, {}
                except (InputError, RuntimeAuditError):
                    raise
                except Exception as e:  # the model or the data: an input problem, with both shapes
                    raise forward_error(e, batch, graph, bi) from e
                if p == 0:
                    result.batches += 1
                    result.samples += batch.size
                    if losses is not None and torch.isfinite(losses).any():
                        finite_batches += 1
                correct = None
                if want_labels and batch.targets is not None:
                    out = primary_output(outputs)
                    if out.dim() >= 2 and batch.targets.dim() == 1:
                        correct = out.argmax(dim=-1) == batch.targets.to(out.device)
                for lay in chosen:
                    ub = ubs.get(lay.name)
                    if ub is None:
                        continue
                    g = grads.get(lay.name)
                    ub.grad = unit_view(g, lay.unit_dim) if g is not None else None
                    ub.weight_grad = wgrads.get(lay.name)
                    ub.correct = correct
                    _feed(active[lay.name], "update", ub, lay, bi)
                del acts, ubs, outputs
                bar.advance()
        if p == 0 and grad_layers and result.batches and finite_batches == 0:
            raise RuntimeAuditError("the loss is non-finite (NaN or Inf) on every batch",
                                    hint="check the model's weights and the data for NaN/Inf")


def _feed(metrics: list[Metric], method: str, ub: UnitBatch, lay: Layer, batch_index: int) -> None:
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


def _backward(outputs, batch: Batch, loss_fn: LossFn, chosen: list[Layer], acts: dict[str, torch.Tensor],
              result: AuditResult):
    """Per-sample losses, dL_x/dh at every tapped point, and dL_batch/dW (batch mean)."""
    losses = loss_fn(outputs, batch.targets)
    if losses.dim() != 1 or losses.shape[0] != batch.size:
        raise InputError(f"the loss returned shape {tuple(losses.shape)}; expected one value per sample ({batch.size})")
    finite = torch.isfinite(losses)
    if not finite.all():
        result.nonfinite_loss_batches += 1
    total = torch.where(finite, losses, torch.zeros_like(losses)).sum()
    names = [n for n in acts if acts[n].requires_grad]
    inputs = [acts[n] for n in names] + [lay.weight for lay in chosen]
    if not total.requires_grad:
        return losses.detach(), {}, {}
    gs = torch.autograd.grad(total, inputs, allow_unused=True)
    grads = {n: (g if g is not None else torch.zeros_like(acts[n])).detach() for n, g in zip(names, gs[: len(names)], strict=True)}
    wgrads = {}
    for lay, g in zip(chosen, gs[len(names):], strict=True):
        if g is not None:
            wgrads[lay.name] = g.detach().div_(batch.size)  # autograd.grad returned a fresh tensor: no copy
    return losses.detach(), grads, wgrads
