"""The Python API, for people holding live objects: ``audit``, ``ablate``, ``inspect``, ``gate``,
``load``, ``load_data``. The command line (``fitcli.cli``) parses its strings and calls these.

>>> import fitcli
>>> report = fitcli.audit(model, loader)                 # an nn.Module and a DataLoader
>>> report.dead                                          # {"fc1": [3, 17], ...}
>>> report.ranked(by="apoz", top=10)                     # least fit first

Settings are checked before any model is loaded or data read; the caller's global RNG state and
the model's train/eval mode are as they were afterwards; the model's weights are never changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fitcli import distributed
from fitcli import report as rep
from fitcli.data import Batch, DataSource, as_batch
from fitcli.data import load_data as load_data_spec
from fitcli.engine import (
    HALF,
    Float32Loss,
    cast_model,
    dtype_name,
    half_data,
    model_dtype,
    peek,
    plan,
)
from fitcli.engine import audit as run_audit
from fitcli.errors import InputError, UsageError
from fitcli.loading import LoadedModel, from_module, load_model
from fitcli.losses import check_loss
from fitcli.progress import NO_PROGRESS, Progress
from fitcli.report import AuditReport, GateResult
from fitcli.settings import Settings

REMOVABLE_EPS = 1e-6


# --------------------------------------------------------------------------------------------
# what the caller holds -> what the engine takes


def load(model: Any, *, arch: Any = None, arch_kwargs: dict[str, Any] | None = None,
         trust_checkpoint: bool = False, arch_label: str | None = None, lazy: bool = False) -> LoadedModel:
    """An ``nn.Module``, a loaded model, or a checkpoint path (with ``arch``: a callable returning
    the ``nn.Module`` that its state dict fills) -> the model an audit runs on. ``lazy``: a
    ``.safetensors`` file's weights are not read now but mapped block by block during an audit with
    ``max_memory`` (models larger than memory)."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        if arch is not None:
            raise UsageError("arch is for checkpoint files; the model given is already a module")
        return from_module(model)
    if isinstance(model, (str, Path)):
        return load_model(model, arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint,
                          arch_label=arch_label, lazy=lazy)
    raise UsageError(f"model must be an nn.Module or a checkpoint path, not {type(model).__name__}")


class _Tensors:
    """A tensor of inputs (and optional targets) in batches of ``batch_size``."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor | None, batch_size: int):
        self.inputs, self.targets, self.batch_size = inputs, targets, batch_size

    def __call__(self) -> Iterator[Batch]:
        for i in range(0, self.inputs.shape[0], self.batch_size):
            t = None if self.targets is None else self.targets[i : i + self.batch_size]
            yield Batch((self.inputs[i : i + self.batch_size],), {}, t)


def load_data(data: Any, *, batch_size: int = 64, max_batches: int | None = None, seed: int = 0) -> DataSource | None:
    """What the caller holds -> re-iterable batches. ``data``: a DataLoader or any re-iterable of
    batches (tensors, ``(inputs, targets)`` pairs, dicts of model keyword inputs with optional
    ``labels``/``targets``), a function returning such an iterable, a tensor of inputs (split
    into ``batch_size`` batches), or a tensor file / data spec path."""
    if data is None or isinstance(data, DataSource):
        return data
    if isinstance(data, (str, Path)):
        return load_data_spec(str(data), batch_size=batch_size, max_batches=max_batches, seed=seed)
    if isinstance(data, torch.Tensor):
        if data.dim() == 0 or data.shape[0] == 0:
            raise InputError(f"data tensor of shape {tuple(data.shape)} holds no samples")
        n = -(-data.shape[0] // batch_size)
        return DataSource(f"<tensor {list(data.shape)}>", _Tensors(data, None, batch_size), max_batches,
                          has_targets=False, batches=n)
    name = f"<{type(data).__name__}>"
    if callable(data) and not isinstance(data, Iterable):
        return DataSource(name, data, max_batches)
    if not isinstance(data, Iterable) or isinstance(data, (dict, bytes)):
        raise UsageError(f"data must be an iterable of batches (a DataLoader, a list...), a function returning "
                         f"one, a tensor or a path, not {type(data).__name__}")
    if isinstance(data, Iterator):  # (calling iter() to find out would start a DataLoader: RNG draws)
        raise UsageError("data is a one-shot iterator (a generator?): give something that can be iterated "
                         "more than once (a list, a DataLoader) or a function that returns a fresh iterator")
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError:
        n = None
    return DataSource(name, lambda: data, max_batches, batches=n)


@contextlib.contextmanager
def _caller_state(model: nn.Module | None, seed: int, device: torch.device | None = None) -> Iterator[None]:
    """The audit's own RNG (seeded), eval mode and no fused attention fast path; the caller's RNG
    state, every module's train flag and the fast-path setting are restored on the way out,
    whatever happens."""
    modes = [(m, m.training) for m in model.modules()] if model is not None else []
    devices = [device.index or 0] if device is not None and device.type == "cuda" else []
    mha = getattr(torch.backends, "mha", None)
    fast = mha.get_fastpath_enabled() if mha is not None else None
    try:
        if mha is not None:  # the fused attention fast path bypasses the layers inside nn.Transformer*
            mha.set_fastpath_enabled(False)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            if model is not None:
                with contextlib.suppress(NotImplementedError):  # a torch.export module has no eval()
                    model.eval()
            yield
    finally:
        for m, flag in modes:
            m.training = flag
        if mha is not None:
            mha.set_fastpath_enabled(fast)


@contextlib.contextmanager
def _offload(loaded: LoadedModel, s: Settings) -> Iterator[Any]:
    """With ``max_memory``: the audit runs with the weights memory-mapped from the checkpoint, at
    most that many bytes of them resident, block by block (``fitcli.offload``)."""
    if s.max_memory is None or loaded.module is None:
        if loaded.lazy:
            raise UsageError("this model was loaded without its weights (lazy): audit it with max_memory")
        yield None
        return
    from fitcli.loading import offload_source

    source = offload_source(loaded)  # the checkpoint, or a Hugging Face folder's model.safetensors
    if source is None:
        raise UsageError("max_memory maps the weights from a .safetensors checkpoint; this model is not one")
    from fitcli.engine import pick_device
    from fitcli.offload import offloaded

    if pick_device(s.device).type != "cpu":
        raise UsageError("max_memory: the block-by-block audit runs on the cpu device for now")
    with offloaded(loaded.module, max_bytes=s.max_memory, source=source) as off:
        yield off


def _settings(settings: Settings | None, options: dict[str, Any]) -> Settings:
    return Settings.make(settings, **options).check()


def _report_settings(s: Settings, loaded: LoadedModel | None = None, **more: Any) -> dict[str, Any]:
    # model_mode: audits run the model in eval mode (BatchNorm running statistics, dropout off);
    # dtype: the floating dtype the model computed in (statistics accumulate in float32/float64)
    out = {"tau": float(s.tau), "seed": int(s.seed), "ablation_mode": s.ablation_mode, "model_mode": "eval"}
    dt = dtype_name(model_dtype(loaded.module)) if loaded is not None else None
    if dt is not None:
        out["dtype"] = dt
    return {**out, **more}


def _class_targets(example: Batch | None) -> bool:
    """One integer class id per sample: accuracy changes can be measured (token labels of a
    language model are not: their loss is per token)."""
    t = example.targets if example is not None else None
    return t is not None and not t.is_floating_point() and t.dim() == 1


def _offloaded(report: dict, off: Any) -> None:
    """A block-by-block audit (max_memory) says so, with the most weight bytes resident at once."""
    if off is not None:
        report["offload"] = {"max_memory": int(off.max_bytes), "high_water": int(off.high_water),
                             "blocks": len(off.blocks), "loads": int(off.loads), "recomputed": int(off.recomputed)}


def _distributed(report: dict, d: distributed.Dist | None) -> None:
    """The report says how many ranks ran it (``data.samples``/``batches`` are the global totals)."""
    if d is not None:
        report["distributed"] = distributed.report_field(d)


def _group(group: Any) -> distributed.Dist | None:
    return distributed.of(group)


def _removable(report: dict, eps: float = REMOVABLE_EPS) -> None:
    """Units whose exact ablation changes the loss by at most ``eps`` (removable), for every metric
    that carries exact ablation results (it declares the ``ablation`` need)."""
    exact = [m for m, info in (report.get("metric_info") or {}).items() if "ablation" in info.get("needs", [])]
    for lay in report["layers"]:
        for m in exact:
            ab = lay["metrics"].get(m)
            if ab is not None:
                lay["removable"] = [i for i, v in enumerate(ab) if v is not None and abs(v) <= eps]
                break


# --------------------------------------------------------------------------------------------
# audit


def audit(model: Any, data: Any = None, *, loss: Any = None, metrics: list[str] | None = None,
          layers: list[str] | None = None, baseline: Any = None, arch: Any = None,
          arch_kwargs: dict[str, Any] | None = None, trust_checkpoint: bool = False,
          settings: Settings | None = None, progress: Progress | None = None, group: Any = None,
          **options: Any) -> AuditReport:
    """Score every chosen metric of every audited layer on ``data``; returns an ``AuditReport``.

    ``model``: an ``nn.Module`` or a checkpoint path (``arch`` builds the module a state dict
    fills). ``data``: any re-iterable of batches, a function returning one, a tensor, or a path or
    data spec. ``loss``: a callable ``(output, batch) -> per-sample losses``, a ``torch.nn`` loss
    module, a name (``cross_entropy``, ``mse``), or None (chosen from the targets).
    ``metrics``/``layers``: names (layers: globs too). Further keyword options are the fields of
    ``fitcli.Settings`` (``tau``, ``device``, ``rank_by``, ``validate``, ``max_dead``, ``dtype``...).

    ``group``: a ``torch.distributed`` process group the caller initialised (every rank calls
    ``audit`` with the same arguments): each rank reads its shard of the batches, the metric
    states are all-reduced, and every rank returns the same report (``docs/distributed.md``).
    """
    s = _settings(settings, dict(options, metrics=metrics, layers=layers))
    check_loss(loss)
    d = _group(group)
    progress = progress or NO_PROGRESS
    loaded = cast_model(load(model, arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint,
                             lazy=s.max_memory is not None), s.dtype)
    base = load(baseline) if baseline is not None else None
    ds = half_data(load_data(data, batch_size=s.batch_size, max_batches=s.max_batches, seed=s.seed), loaded)
    with _caller_state(loaded.module, s.seed), _offload(loaded, s) as off:
        result = run_audit(loaded, ds, metrics=s.metrics, layers=s.layers, loss=loss, baseline=base,
                           device=s.device, progress=progress, ablation_mode=s.ablation_mode,
                           chunk_size=s.chunk_size, rank_by=s.rank_by, group=d)
        report = rep.build(result, loaded, ds, _report_settings(s, loaded), rank_by=s.rank_by, top=s.top)
        _removable(report)
        _distributed(report, d)
        if s.validate:
            from fitcli.validate import validate_report

            validate_report(report, graph=result.graph, data=ds, loss_fn=result.loss_fn, units=s.validate_units,
                            seed=s.seed, device=result.device, chunk_size=s.chunk_size,
                            rank_auto=s.rank_by == "auto", top=s.top, progress=progress, group=d)
        _offloaded(report, off)
    if s.max_dead is not None or s.max_dead_layer is not None or s.min_coverage is not None:
        rep.gate(report, s.max_dead, s.max_dead_layer, s.min_coverage)
    return AuditReport(report)


# --------------------------------------------------------------------------------------------
# ablate


def _unit_selection(units: Any, chosen: list) -> dict[str, list[int] | None]:
    """``units``: None (all), a list of indices (every chosen layer), or {layer: indices}."""
    if units is None:
        return {lay.name: None for lay in chosen}
    if isinstance(units, dict):
        unknown = [k for k in units if k not in {lay.name for lay in chosen}]
        if unknown:
            raise UsageError(f"units given for {unknown[0]!r}, which is not among the layers ablated")
        sel = {lay.name: (sorted(set(units[lay.name])) if units.get(lay.name) is not None else None) for lay in chosen}
    else:
        idx = sorted(set(units))
        sel = {lay.name: idx for lay in chosen}
    for lay in chosen:
        for i in sel[lay.name] or []:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < lay.units:
                raise UsageError(f"unit {i!r} is out of range for {lay.name} "
                                 f"(the layer has {lay.units} units: 0-{lay.units - 1})")
    return sel


def _ablate_extra(lay, ab, sel: list[int] | None, whole_layer: bool) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if whole_layer:
        extra["layer_ablation"] = ab.layer_delta(lay.name)
        if ab.accuracy_known:
            extra["layer_ablation_accuracy"] = ab.layer_accuracy(lay.name)
    if sel is not None:
        extra["ablated_units"] = sel
    return extra


def ablate(model: Any, data: Any = None, *, layers: list[str] | None = None, units: Any = None,
           loss: Any = None, arch: Any = None, arch_kwargs: dict[str, Any] | None = None,
           trust_checkpoint: bool = False, settings: Settings | None = None, progress: Progress | None = None,
           group: Any = None, **options: Any) -> AuditReport:
    """Exact ablation of each unit of ``layers`` (and of each whole layer with ``whole_layer=True``):
    the mean loss change when the unit is masked at its activation point. Returns an
    ``AuditReport`` whose layers carry ``metrics["ablation"]`` (and ``ablation_accuracy`` for class
    targets) and ``removable``. ``units``: a list of indices, or ``{layer: indices}``. ``group``: a
    process group; the batches are sharded over its ranks and the sums all-reduced."""
    s = _settings(settings, dict(options, layers=layers, metrics=["ablation"]))
    if not s.layers:
        raise UsageError("ablation needs at least one layer", hint="`fitcli inspect MODEL` lists the layers")
    check_loss(loss)
    d = _group(group)
    progress = progress or NO_PROGRESS
    loaded = cast_model(load(model, arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint,
                             lazy=s.max_memory is not None), s.dtype)
    if not loaded.runnable:
        raise InputError(f"{loaded.path}: ablation needs a runnable model; give its architecture"
                         + (" (" + "; ".join(loaded.notes) + ")" if loaded.notes else ""))
    ds = half_data(load_data(data, batch_size=s.batch_size, max_batches=s.max_batches, seed=s.seed), loaded)
    if ds is None:
        raise UsageError("ablation needs data")
    with _caller_state(loaded.module, s.seed), _offload(loaded, s):
        with distributed.phase(d):  # every rank plans on batch 0; a failure on one is every rank's
            p = plan(loaded, ds, metrics=["ablation"], layers=s.layers, loss=loss, device=s.device)
            wonly = [lay.name for lay in p.layers if lay.weight_only]
            if wonly:
                raise UsageError(f"{wonly[0]} has weight-only units (embedding rows): there is no activation to ablate")
            if p.have["ablation"] is not None:
                raise InputError(f"ablation needs a loss: {p.have['ablation']}")
        report = _run_ablate(loaded, ds, p, s, units, progress, d)
    return AuditReport(report)


def _run_ablate(loaded: LoadedModel, ds: DataSource, p, s: Settings, units: Any, progress: Progress,
                d: distributed.Dist | None = None) -> dict:
    from fitcli.ablation import ablate_layers
    from fitcli.engine import AuditResult, coverage

    sel = _unit_selection(units, p.layers)
    example = peek(ds)
    accuracy = _class_targets(example)
    if p.graph.runner is not None:
        p.graph.runner.to(p.device)
    ab = ablate_layers(p.graph, [lay.name for lay in p.layers], ds, p.loss_fn, mode=s.ablation_mode,
                       device=p.device, chunk_size=s.chunk_size, progress=progress, units=sel,
                       whole_layer=s.whole_layer, accuracy=accuracy, group=d)
    result = AuditResult(graph=p.graph, layers=p.layers, values={}, metric_info={}, skipped=[], device=str(p.device),
                         loss_name=p.loss_name, notes=p.notes + ab.notes, samples=ab.samples, batches=ab.batches)
    for lay in p.layers:
        metric = p.state[lay.name]["ablation"]
        metric.update_ablation(ab.delta_sum[lay.name], ab.samples)  # the results reach the metric through its contract
        vals = {"ablation": metric.compute().cpu()}
        if accuracy:
            vals["ablation_accuracy"] = ab.accuracy(lay.name)
        if sel[lay.name] is not None:  # units not asked for have no value: null in JSON, not ranked
            mask = torch.ones(lay.units, dtype=torch.bool)
            mask[sel[lay.name]] = False
            vals = {k: v.masked_fill(mask, float("nan")) for k, v in vals.items()}
        result.values[lay.name] = vals
        result.layer_extra[lay.name] = _ablate_extra(lay, ab, sel[lay.name], s.whole_layer)
    result.coverage = coverage(p.graph, [lay for lay in p.layers if not lay.weight_only], p.layers)
    result.metric_info["ablation"] = {**p.classes["ablation"].contract(), "method": ab.method}
    if accuracy:
        result.metric_info["ablation_accuracy"] = {
            "description": "accuracy(ablated) − accuracy: change in the fraction of correct predictions",
            "needs": ["activations", "labels", "ablation"], "higher_is_better": True}
    settings = _report_settings(s, loaded, whole_layer=s.whole_layer)
    report = rep.build(result, loaded, ds, settings, rank_by="ablation", top=s.top, command="ablate",
                       include_final=True)
    for row in report["ranked"]:
        acc = next(lay for lay in report["layers"] if lay["name"] == row["layer"])["metrics"].get("ablation_accuracy")
        if acc is not None and acc[row["unit"]] is not None:
            row["accuracy_change"] = acc[row["unit"]]
    for lay in report["layers"]:
        if sel[lay["name"]] is not None:
            keep = set(sel[lay["name"]])
            lay["nonfinite"] = [u for u in lay["nonfinite"] if u in keep]
    _removable(report)
    _distributed(report, d)
    return report


# --------------------------------------------------------------------------------------------
# blocks


def blocks(model: Any, data: Any = None, *, greedy: int = 0, loss: Any = None, arch: Any = None,
           arch_kwargs: dict[str, Any] | None = None, trust_checkpoint: bool = False,
           settings: Settings | None = None, progress: Progress | None = None, **options: Any) -> AuditReport:
    """Residual blocks as units: Block Influence, angular distance and the exact loss (and
    accuracy) change with each block replaced by the identity; with ``greedy=N`` the layer-removal
    curve (remove the cheapest block, re-measure exactly, N times). The report's ``blocks`` and
    ``greedy`` fields hold them."""
    from fitcli import residual as blk
    from fitcli.engine import pick_device
    from fitcli.losses import resolve_loss

    s = _settings(settings, options)
    if not isinstance(greedy, int) or isinstance(greedy, bool) or greedy < 0:
        raise UsageError(f"greedy must be a non-negative number of blocks, got {greedy!r}")
    check_loss(loss)
    loaded = cast_model(load(model, arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint,
                             lazy=s.max_memory is not None), s.dtype)
    if not loaded.runnable:
        raise InputError(f"{loaded.path}: block ablation needs a runnable model; give its architecture")
    ds = half_data(load_data(data, batch_size=s.batch_size, max_batches=s.max_batches, seed=s.seed), loaded)
    if ds is None:
        raise UsageError("block ablation needs data")
    dev = pick_device(s.device)
    with _caller_state(loaded.module, s.seed), _offload(loaded, s):
        example = peek(ds)
        if example is None:
            raise InputError("the data yields no batches (empty data)")
        loss_fn, loss_name, why = resolve_loss(loss, example.targets, loaded.task)
        if loss_fn is None:
            raise InputError(f"block ablation needs a loss: {why}")
        if model_dtype(loaded.module) in HALF:
            loss_fn = Float32Loss(loss_fn)  # half-precision outputs: the losses in float32
        module = loaded.module.to(dev)
        names = blk.find_blocks(module, example.to(dev))
        if not names:
            raise InputError("no residual block found: no item of an nn.ModuleList or nn.Sequential keeps its "
                             "input's shape")
        acc = _class_targets(example)
        first = blk.measure(module, ds, names, loss_fn, dev, acc, progress=progress or NO_PROGRESS)
        curve = blk.greedy(module, ds, names, loss_fn, dev, acc, greedy, first, progress or NO_PROGRESS) if greedy else []
    rows = [{"name": n, "block_influence": first.influence.get(n), "angular_distance": first.angular.get(n),
             "ablation": first.delta[n], **({"ablation_accuracy": first.accuracy[n]} if acc else {})} for n in names]
    report = {
        **rep.envelope("blocks", loaded, ds, first.samples, first.batches),
        "settings": {**_report_settings(s, loaded), "metrics": [], "loss": loss_name, "device": str(dev), "greedy": greedy},
        "discovery": {"method": "runtime", "notes": list(loaded.notes)},
        "layers": [], "summary": {"layers": 0, "units": 0, "dead": 0, "dead_fraction": 0.0, "dead_known": False},
        "skipped": [], "blocks": rows, "base": {"loss": first.base_loss, "accuracy": first.base_accuracy},
        "greedy": curve, "block_validation": _block_validation(first, names),
    }
    return AuditReport(report)


def _block_validation(first, names: list[str]) -> dict[str, Any]:
    """How well Block Influence and angular distance rank blocks like exact removal does, beside a
    random order."""
    from fitcli.validate import _corr, random_baseline

    oracle = torch.tensor([abs(first.delta[n]) for n in names], dtype=torch.float64)
    scores = {key: _corr(torch.tensor([src.get(n, float("nan")) for n in names], dtype=torch.float64), oracle)
              for key, src in (("block_influence", first.influence), ("angular_distance", first.angular))}
    return {"oracle": "|Δloss| with the block replaced by the identity", "metrics": scores,
            "random": random_baseline({"blocks": oracle})["across_layers"]}


# --------------------------------------------------------------------------------------------
# inspect, gate


@dataclass
class Inspection:
    """What ``inspect`` found: the model, how its graph was read, its layers and what was left out."""

    model: dict[str, Any]
    discovery: dict[str, Any]
    layers: list[dict[str, Any]]
    unsupported: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]


def inspect(model: Any, data: Any = None, *, arch: Any = None, arch_kwargs: dict[str, Any] | None = None,
            trust_checkpoint: bool = False, batch_size: int = 8) -> Inspection:
    """Layers, unit counts, activation points and the format found in a model or checkpoint."""
    from fitcli.discovery import discover

    loaded = load(model, arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint)
    ds = load_data(data, batch_size=batch_size, max_batches=1) if loaded.runnable else None
    with _caller_state(loaded.module, 0):
        example = peek(ds) if ds is not None else None
        graph = discover(loaded.module, loaded.state_dict, example=example, exported=loaded.format == "export")
    return Inspection(
        model={"path": loaded.path, "format": loaded.format, "sha256": loaded.sha256, "arch": loaded.arch},
        discovery={"method": graph.method, "notes": loaded.notes + graph.notes},
        layers=[{"name": lay.name, "type": lay.type, "units": lay.units, "activation_point": lay.point,
                 "activation_point_kind": lay.point_kind, "activation_chain": lay.chain_text,
                 "parameters": lay.n_params, "final": lay.final, "consumers": lay.consumers,
                 **({"members": lay.members} if lay.members else {})} for lay in graph.layers],
        unsupported=graph.unsupported,
    )


def gate(report: AuditReport | dict | str | Path, max_dead: float | None = None,
         max_dead_layer: float | None = None, min_coverage: float | None = None) -> GateResult:
    """Check a report (or a saved report file) against dead-unit thresholds and a minimum coverage,
    in percent. Without thresholds, the ones the report was scored with. It fails when no unit was
    audited. The verdict is also stored on the report."""
    Settings.make(max_dead=max_dead, max_dead_layer=max_dead_layer, min_coverage=min_coverage).check()
    if isinstance(report, (str, Path)):
        data = rep.read(report)
    elif isinstance(report, AuditReport):
        data = report._meta | {"layers": [lay.to_dict() for lay in report.layers]}
    elif isinstance(report, dict):
        data = report
    else:
        raise UsageError(f"gate takes an AuditReport, a report dict or a path, not {type(report).__name__}")
    if max_dead is None and max_dead_layer is None and min_coverage is None:
        g = data.get("gate") or {}
        max_dead, max_dead_layer, min_coverage = g.get("max_dead"), g.get("max_dead_layer"), g.get("min_coverage")
        if max_dead is None and max_dead_layer is None and min_coverage is None:
            raise UsageError("gate needs max_dead, max_dead_layer and/or min_coverage "
                             "(or a report that was scored with them)")
    g = rep.gate(data, max_dead, max_dead_layer, min_coverage)
    if isinstance(report, AuditReport):
        report._meta["gate"] = g
    return GateResult(g["passed"], g["failures"], max_dead, max_dead_layer, min_coverage)


__all__ = ["audit", "ablate", "blocks", "inspect", "gate", "load", "load_data", "Inspection", "as_batch"]
