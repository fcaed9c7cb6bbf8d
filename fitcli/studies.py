"""The API's requests into reports: an audit of every chosen metric (``fitcli.audit``), exact
ablation of each unit of chosen layers (``fitcli.ablate``) and of each residual block
(``fitcli.blocks``).

An audit is the engine's plan, stream and collect, then validation when asked for. Ablated units
go through the engine's plan (layers, loss, one metric state per layer) and the metric
contract: the ablation engine (``fitcli.ablation``) measures the loss and accuracy changes, and
they reach the registered ``ablation`` and ``ablation_accuracy`` metrics through
``update_ablation``, each taking the sums its ``ablation_of`` names. Blocks are measured by
``fitcli.residual``. The caller (``fitcli.api``) has checked the settings, loaded the model and
the data, and holds the model's state (RNG, eval mode, device) around these calls.
"""

from __future__ import annotations

from typing import Any

import torch

from fitcli import distributed, report_build
from fitcli.ablation import ablate_layers
from fitcli.data import HALF, Batch, DataSource
from fitcli.engine import (
    AuditPlan,
    AuditResult,
    Float32Loss,
    ablation_wanted,
    coverage,
    dtype_name,
    model_dtype,
    peek,
    plan,
)
from fitcli.errors import InputError, UsageError
from fitcli.loading import LoadedModel
from fitcli.progress import NO_PROGRESS, Progress
from fitcli.report import AuditReport
from fitcli.settings import Settings
from fitcli.validate import block_validation, validation_metrics

REMOVABLE_EPS = report_build.REMOVABLE_EPS


def report_settings(s: Settings, loaded: LoadedModel | None = None, **more: Any) -> dict[str, Any]:
    """The report's ``settings``. model_mode: audits run the model in eval mode (BatchNorm running
    statistics, dropout off); dtype: the floating dtype the model computed in (statistics
    accumulate in float32/float64)."""
    out = {"tau": float(s.tau), "seed": int(s.seed), "ablation_mode": s.ablation_mode, "model_mode": "eval"}
    dt = dtype_name(model_dtype(loaded.module)) if loaded is not None else None
    if dt is not None:
        out["dtype"] = dt
    return {**out, **more}


def class_targets(example: Batch | None) -> bool:
    """One integer class id per sample: accuracy changes can be measured (token labels of a
    language model are not: their loss is per token)."""
    t = example.targets if example is not None else None
    return t is not None and not t.is_floating_point() and t.dim() == 1


def distributed_field(d: distributed.Dist | None) -> dict[str, Any] | None:
    """The report says how many ranks ran it (``data.samples``/``batches`` are the global totals)."""
    return distributed.report_field(d) if d is not None else None


# --------------------------------------------------------------------------------------------
# audit


def audit_units(loaded: LoadedModel, ds: Any, baseline: LoadedModel | None, s: Settings, loss: Any,
                progress: Progress, d: distributed.Dist | None = None) -> AuditReport:
    """Every chosen metric of every chosen layer on ``ds`` (the engine), validated against exact
    ablation with ``s.validate`` -> the report."""
    from fitcli import residual
    from fitcli.engine import audit as run_audit

    watches: list[residual.InfluenceWatch] = []

    def watch(kinds, graph):  # Block Influence from the audit's own forward, where the blocks run as modules
        if not kinds.blocks or d is not None or graph.runner is None:
            return None
        watches.append(residual.InfluenceWatch(loaded.module, kinds.blocks))
        return watches[-1]

    metrics = validation_metrics(s.metrics) if s.validate else s.metrics  # validation compares redundancy too
    result = run_audit(loaded, ds, metrics=metrics, layers=s.layers, loss=loss, baseline=baseline,
                       device=s.device, progress=progress, ablation_mode=s.ablation_mode,
                       chunk_size=s.chunk_size, rank_by=s.rank_by, group=d, ablate=feed_plan, kinds=s.kinds,
                       watch=watch)
    blocks = watches[0].result() if watches else None
    if result.kinds.blocks and d is not None:  # each rank sees its shard: measured in one process only
        result.notes.append("blocks: Block Influence is measured in one process (not under torchrun)")
    elif blocks is None and result.kinds.blocks and result.graph.runner is not None and ds is not None:
        blocks = residual.influence(loaded.module, ds, result.kinds.blocks, torch.device(result.device), progress)
    report = report_build.build(result, loaded, ds, report_settings(s, loaded), rank_by=s.rank_by, top=s.top,
                                distributed=distributed_field(d), blocks=blocks)
    if s.validate:
        from fitcli.validate import validate_report

        report = validate_report(report, graph=result.graph, data=ds, loss_fn=result.loss_fn, units=s.validate_units,
                        seed=s.seed, device=result.device, chunk_size=s.chunk_size,
                        rank_auto=s.rank_by == "auto", top=s.top, progress=progress, group=d,
                        model=loaded.module)
    return report


# --------------------------------------------------------------------------------------------
# units


def unit_selection(units: Any, chosen: list) -> dict[str, list[int] | None]:
    """``units``: None (all), a list of indices (every chosen layer), or {layer: indices}."""
    if units is None:
        return {lay.name: None for lay in chosen}
    if isinstance(units, dict):
        unknown = [k for k in units if k not in {lay.name for lay in chosen}]
        if unknown:
            raise UsageError(f"{{units}} given for {unknown[0]!r}, which is not among the layers ablated",
                             setting="units")
        sel = {lay.name: (sorted(set(units[lay.name])) if units.get(lay.name) is not None else None) for lay in chosen}
    else:
        idx = sorted(set(units))
        sel = {lay.name: idx for lay in chosen}
    for lay in chosen:
        for i in sel[lay.name] or []:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < lay.units:
                raise UsageError(f"{{units}}: unit {i!r} is out of range for {lay.name} "
                                 f"(the layer has {lay.units} units: 0-{lay.units - 1})", setting="units")
    return sel


def plan_units(loaded: LoadedModel, ds: DataSource, s: Settings, loss: Any) -> AuditPlan:
    """The engine's plan for exact ablation of ``s.layers``: ``ablation``, and
    ``ablation_accuracy`` when the data has one class id per sample."""
    metrics = ["ablation", "ablation_accuracy"] if class_targets(peek(ds)) else ["ablation"]
    p = plan(loaded, ds, metrics=metrics, layers=s.layers, loss=loss, device=s.device, kinds=s.kinds)
    wonly = [lay.name for lay in p.layers if lay.weight_only]
    if wonly:
        raise UsageError(f"{wonly[0]} has weight-only units (embedding rows): there is no activation to ablate")
    if p.have["ablation"] is not None:
        raise InputError(f"ablation needs a loss: {p.have['ablation']}")
    return p


def _layer_extra(lay, ab, sel: list[int] | None, whole_layer: bool) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if whole_layer:
        extra["layer_ablation"] = ab.layer_delta(lay.name)
        if ab.accuracy_known:
            extra["layer_ablation_accuracy"] = ab.layer_accuracy(lay.name)
    if sel is not None:
        extra["ablated_units"] = sel
    return extra


def _feed(p: AuditPlan, ab, result: AuditResult, sel: dict[str, list[int] | None], whole_layer: bool) -> None:
    """The ablation engine's sums into each layer's metrics, through their contract; units not
    asked for have no value (null in JSON, not ranked)."""
    for lay in p.layers:
        vals = {}
        for name, metric in p.state[lay.name].items():
            sums = ab.acc_sum if getattr(metric, "ablation_of", "loss") == "accuracy" else ab.delta_sum
            metric.update_ablation(sums[lay.name], ab.samples)
            vals[name] = metric.compute().cpu()
        if sel[lay.name] is not None:
            mask = torch.ones(lay.units, dtype=torch.bool)
            mask[sel[lay.name]] = False
            vals = {k: v.masked_fill(mask, float("nan")) for k, v in vals.items()}
        result.values[lay.name] = vals
        result.layer_extra[lay.name] = _layer_extra(lay, ab, sel[lay.name], whole_layer)
    for name, cls in p.classes.items():
        result.metric_info[name] = cls.contract()
    result.metric_info["ablation"]["method"] = ab.method


def ablate_units(loaded: LoadedModel, ds: DataSource, p: AuditPlan, s: Settings, units: Any,
                 progress: Progress, d: distributed.Dist | None = None) -> AuditReport:
    """Exact ablation of each selected unit of the plan's layers -> the report."""
    sel = unit_selection(units, p.layers)
    accuracy = "ablation_accuracy" in p.classes
    if p.graph.runner is not None:
        p.graph.runner.to(p.device)
    ab = ablate_layers(p.graph, [lay.name for lay in p.layers], ds, p.loss_fn, mode=s.ablation_mode,
                       device=p.device, chunk_size=s.chunk_size, progress=progress, units=sel,
                       whole_layer=s.whole_layer, accuracy=accuracy, group=d)
    result = AuditResult(graph=p.graph, layers=p.layers, values={}, metric_info={}, skipped=[], device=str(p.device),
                         loss_name=p.loss_name, notes=p.notes + ab.notes, samples=ab.samples, batches=ab.batches)
    _feed(p, ab, result, sel, s.whole_layer)
    result.coverage = coverage(p.graph, [lay for lay in p.layers if not lay.weight_only], p.layers)
    settings = report_settings(s, loaded, whole_layer=s.whole_layer)
    return report_build.build(result, loaded, ds, settings, rank_by="ablation", top=s.top, command="ablate",
                              include_final=True, ablated=sel, distributed=distributed_field(d))


# --------------------------------------------------------------------------------------------
# blocks


def ablate_blocks(loaded: LoadedModel, ds: DataSource, s: Settings, loss: Any, greedy: int,
                  progress: Progress) -> AuditReport:
    """Residual blocks as units: Block Influence, angular distance and the exact loss (and
    accuracy) change with each block replaced by the identity; with ``greedy`` the layer-removal
    curve -> the report."""
    from fitcli import residual as blk
    from fitcli.engine import pick_device
    from fitcli.losses import resolve_loss

    dev = pick_device(s.device)
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
        raise InputError("no residual block found: no module keeps its input's shape and adds its input "
                         "back, and no item of an nn.ModuleList or nn.Sequential keeps its input's shape")
    acc = class_targets(example)
    first = blk.measure(module, ds, names, loss_fn, dev, acc, progress=progress)
    curve = blk.greedy(module, ds, names, loss_fn, dev, acc, greedy, first, progress) if greedy else []
    settings = {**report_settings(s, loaded), "metrics": [], "loss": loss_name, "device": str(dev), "greedy": greedy}
    return report_build.build_blocks(loaded, ds, first, names, curve, acc, settings, block_validation(first, names))


def feed_plan(plan: AuditPlan, data: Any, *, mode: str = "zero", chunk_size: int | None = None,
              progress: Progress = NO_PROGRESS, group: Any = None) -> None:
    """Exact ablation of every layer of an engine plan (``fitcli.engine.AuditPlan``) whose metrics
    need it, handed to those metrics through ``update_ablation``: each takes the sums its
    ``ablation_of`` declares (loss or accuracy changes)."""
    wanting = ablation_wanted(plan)
    if not wanting:
        return
    assert data is not None and plan.loss_fn is not None
    accuracy = any(getattr(m, "ablation_of", "loss") == "accuracy" for ms in wanting.values() for m in ms)
    ab = ablate_layers(plan.graph, list(wanting), data, plan.loss_fn, mode=mode, device=plan.device,
                       chunk_size=chunk_size, progress=progress, accuracy=accuracy, group=group)
    plan.notes.extend(x for x in ab.notes if x not in plan.notes)
    for n, ms in wanting.items():
        for m in ms:
            m.update_ablation((ab.acc_sum if getattr(m, "ablation_of", "loss") == "accuracy" else ab.delta_sum)[n],
                              ab.samples)
