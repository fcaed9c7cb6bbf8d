"""Building a report, once, from what an audit measured: ``build`` (score and ablate, from an
``engine.AuditResult``), ``build_blocks`` (residual blocks as units), and the verdicts computed
on a report (``gate``, ``removable_units``), returned as values."""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any

import torch

from fitcli import __version__
from fitcli.discovery.kinds import kind_of_point
from fitcli.discovery.roles import LAYER_KINDS
from fitcli.report import (
    SCHEMA_ID,
    AuditReport,
    aggregate,
    default_rank_by,
    direction,
    nonfinite_units,
    rank_units,
    ranking_layers,
)
from fitcli.report_types import (
    BlockRow,
    BlockValidation,
    Coverage,
    GateResult,
    GreedyStep,
    LayerReport,
    Summary,
)

REMOVABLE_EPS = 1e-6


def _declares(info: dict[str, dict], metric: str, key: str) -> Any:
    return (info.get(metric) or {}).get(key)


def _clean(values: torch.Tensor) -> torch.Tensor:
    """float64 on the cpu, NaN where not finite (what the JSON's null reads back as)."""
    t = values.detach().to("cpu", torch.float64)
    return torch.where(torch.isfinite(t), t, torch.full_like(t, math.nan))


def removable_units(metrics: dict[str, torch.Tensor], metric_info: dict[str, dict],
                    eps: float = REMOVABLE_EPS) -> list[int] | None:
    """Units whose exact ablation changes the loss by at most ``eps``, from the first metric (by name)
    that carries exact ablation results (it declares the ``ablation`` need); None when none does."""
    for m in sorted(metric_info):
        if "ablation" in (_declares(metric_info, m, "needs") or []) and m in metrics:
            return [i for i, v in enumerate(metrics[m].tolist()) if math.isfinite(v) and abs(v) <= eps]
    return None


def layer_report(lay: Any, vals: dict[str, torch.Tensor], info: dict[str, dict], tau: float,
                 extra: dict | None = None, asked: list[int] | None = None, kind: str | None = None) -> LayerReport:
    """One layer's entry. ``asked``: the units ablated (ablate ``units``), the only ones whose
    non-finite values count. ``kind``: its unit kind, in an audit by kinds."""
    nonfinite = nonfinite_units(vals, {m for m in vals if _declares(info, m, "nan_expected")})
    if asked is not None:
        keep = set(asked)
        nonfinite = [u for u in nonfinite if u in keep]
    marker = next((m for m in sorted(vals) if _declares(info, m, "marks_dead")), None)
    dead: list[int] = []
    if marker is not None and not lay.final:
        dead = [i for i, v in enumerate(vals[marker].tolist()) if math.isfinite(v) and v <= tau]
    metrics = {k: _clean(v) for k, v in sorted(vals.items())}
    return LayerReport(
        name=lay.name, type=lay.type, units=lay.units, activation_point=lay.point, metrics=metrics,
        aggregate={k: aggregate(v) for k, v in sorted(vals.items())}, dead=dead,
        dead_fraction=len(dead) / lay.units if dead and lay.units else 0.0, nonfinite=nonfinite, final=bool(lay.final),
        activation_point_kind=lay.point_kind, activation_chain=lay.chain_text, removable=removable_units(metrics, info),
        members=list(lay.members) if lay.members else None, extra=dict(extra or {}), kind=kind)


def _empty_group_notes(layers: list[LayerReport], info: dict[str, dict]) -> list[str]:
    for e in layers:
        for m, vals in e.metrics.items():
            if _declares(info, m, "nan_expected") and vals.numel() and not bool(torch.isfinite(vals).any()):
                return [f"{m} is null for {e.name}: its definition has no value on this data "
                        "(e.g. every prediction was correct, or every one wrong)"]
    return []


def envelope(command: str, loaded: Any, data: Any, samples: int, batches: int) -> dict[str, Any]:
    """The fields every report starts with: schema, tool, time, command, model, data."""
    return {
        "schema": SCHEMA_ID,
        "tool": {"name": "fitcli", "version": __version__},
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "model": {"path": str(loaded.path), "format": loaded.format, "sha256": loaded.sha256, "arch": loaded.arch},
        "data": {"spec": getattr(data, "spec", None) if data is not None else None, "samples": samples,
                 "batches": batches},
    }


def _dead_counts(layers: list[LayerReport], info: dict[str, dict]) -> tuple[int, int]:
    """(units, dead) over the units whose deadness is known: non-final layers with a dead-marking
    metric (activations)."""
    counted = [e for e in layers if not e.final and not kind_of_point(e.activation_point_kind).weight_only
               and any(_declares(info, m, "marks_dead") for m in e.metrics)]
    return sum(e.units for e in counted), sum(len(e.dead) for e in counted)


def kinds_of(layers: list[LayerReport]) -> list[str]:
    """The unit kinds of the layers, in the order of ``LAYER_KINDS`` (none: not an audit by kinds)."""
    have = {e.kind for e in layers if e.kind}
    return [k for k in LAYER_KINDS if k in have]


def _summary(layers: list[LayerReport], info: dict[str, dict], nonfinite_loss_batches: int) -> Summary:
    units, dead = _dead_counts(layers, info)
    known = any(_declares(info, m, "marks_dead") for e in layers for m in e.metrics)
    per_kind = None
    if len(kinds_of(layers)) > 1:  # a head is never counted with an MLP channel
        per_kind = {}
        for k in kinds_of(layers):
            mine = [e for e in layers if e.kind == k]
            u, d = _dead_counts(mine, info)
            per_kind[k] = {"layers": len(mine), "units": u, "dead": d, "dead_fraction": d / u if u else 0.0}
    return Summary(layers=len(layers), units=units, dead=dead, dead_fraction=dead / units if units else 0.0,
                   dead_known=known, nonfinite_loss_batches=nonfinite_loss_batches, kinds=per_kind)


def _ranking(layers: list[LayerReport], rank_by: str, top: int, info: dict[str, dict],
             include_final: bool) -> list[dict]:
    """The least-fit units; in an audit by kinds, one table per kind (each row says its kind, the
    kinds in the order of ``LAYER_KINDS``, ``top`` rows each): a head is never ranked against a channel."""
    kinds = kinds_of(layers)
    if not kinds:
        return rank_units(ranking_layers(layers, rank_by), rank_by, top, direction(rank_by, info), include_final)
    out = []
    for k in kinds:
        rows = rank_units(ranking_layers([lay for lay in layers if lay.kind == k], rank_by), rank_by, top,
                          direction(rank_by, info), include_final)
        out += [{"kind": k, **r} for r in rows]
    return out


def _accuracy_changes(ranking: list[dict], layers: list[LayerReport]) -> list[dict]:
    """ablate: each ranked unit's accuracy change beside its loss change, where measured."""
    by_name = {lay.name: lay for lay in layers}
    out = []
    for row in ranking:
        acc = by_name[row["layer"]].metrics.get("ablation_accuracy")
        v = float(acc[row["unit"]]) if acc is not None else math.nan
        out.append({**row, "accuracy_change": v} if math.isfinite(v) else row)
    return out


def build(result: Any, loaded: Any, data: Any, settings: dict[str, Any], rank_by: str | None = None,
          top: int = 20, command: str = "score", include_final: bool = False,
          ablated: dict[str, list[int] | None] | None = None, distributed: dict[str, Any] | None = None,
          blocks: Any = None) -> AuditReport:
    """The report of an ``engine.AuditResult``. ``ablated`` (ablate): the units asked for per layer
    (None: all); ranked units then carry their accuracy change. ``distributed``: how the ranks ran it.
    ``blocks``: the residual blocks measured (a ``residual.BlockResult``: Block Influence and
    angular distance), when blocks are among the kinds audited."""
    tau = float(settings.get("tau", 0.0))
    info = result.metric_info
    roles = result.kinds.roles if getattr(result, "kinds", None) is not None else {}
    layers = [layer_report(lay, result.values.get(lay.name, {}), info, tau, result.layer_extra.get(lay.name),
                           (ablated or {}).get(lay.name), roles.get(lay.name)) for lay in result.layers]
    available = set().union(*(set(e.metrics) for e in layers)) if layers else set()
    if rank_by in (None, "auto") or rank_by not in available:
        rank_by = default_rank_by(available, info)
    ranking = []
    if rank_by:
        ranking = _ranking(layers, rank_by, top, info, include_final)
    if ablated is not None:
        ranking = _accuracy_changes(ranking, layers)
    return AuditReport(
        **envelope(command, loaded, data, result.samples, result.batches),
        settings={**settings, "metrics": sorted(available), "rank_by": rank_by, "loss": result.loss_name,
                  "device": result.device},
        discovery={"method": result.graph.method, "notes": list(result.notes) + _empty_group_notes(layers, info)},
        layers=layers, summary=_summary(layers, info, result.nonfinite_loss_batches), ranking=ranking,
        skipped=result.skipped, unsupported=result.graph.unsupported,
        coverage=Coverage.from_dict(getattr(result, "coverage", None) or {}),
        metric_info={k: v for k, v in sorted(info.items())}, distributed=distributed,
        blocks=None if blocks is None else [BlockRow(name=n, block_influence=blocks.influence.get(n),
                                                     angular_distance=blocks.angular.get(n), ablation=None)
                                            for n in blocks.names])


def build_blocks(loaded: Any, data: Any, first: Any, names: list[str], curve: list[dict[str, Any]], accuracy: bool,
                 settings: dict[str, Any], validation: BlockValidation | None) -> AuditReport:
    """The report of residual blocks as units: ``first`` is the measurement with every block in
    place (``residual.measure``), ``curve`` the greedy removal steps (``residual.greedy``)."""
    rows = [BlockRow(name=n, block_influence=first.influence.get(n), angular_distance=first.angular.get(n),
                     ablation=first.delta[n], ablation_accuracy=first.accuracy[n] if accuracy else None)
            for n in names]
    return AuditReport(
        **envelope("blocks", loaded, data, first.samples, first.batches), settings=settings,
        discovery={"method": "runtime", "notes": list(loaded.notes)}, layers=[],
        summary=Summary(layers=0, units=0, dead=0, dead_fraction=0.0, dead_known=False), skipped=[], blocks=rows,
        base={"loss": first.base_loss, "accuracy": first.base_accuracy},
        greedy=[GreedyStep.from_dict(step) for step in curve], block_validation=validation)


def gate(report: AuditReport, max_dead: float | None, max_dead_layer: float | None,
         min_coverage: float | None = None) -> GateResult:
    """Check dead percentages (and coverage) against thresholds in percent. A dead-unit gate never
    passes on nothing: with no unit audited it fails, saying so. Returns the verdict (the report is
    not changed)."""
    failures = []
    s = report.summary
    if (max_dead is not None or max_dead_layer is not None) and not s.units:
        failures.append("no unit was audited, so none could be checked for dead ones: a gate cannot pass on "
                        "nothing (the report's coverage lists what was not audited and why)")
    if min_coverage is not None:
        fraction = report.coverage.fraction if report.coverage is not None else None
        if fraction is None:
            failures.append("the report has no coverage figure (made by an older fitcli): min_coverage cannot hold")
        elif 100.0 * fraction < min_coverage:
            failures.append(f"the audited units cover {100.0 * fraction:.2f}% of the model's parameters "
                            f"< min_coverage {min_coverage:g}%")
    pct = 100.0 * s.dead_fraction
    if max_dead is not None and s.kinds:  # per unit kind: heads are not diluted by MLP channels
        for k, c in s.kinds.items():
            kp = 100.0 * c["dead_fraction"]
            if kp > max_dead:
                failures.append(f"{k}: {c['dead']}/{c['units']} units dead ({kp:.2f}%) > max_dead {max_dead:g}%")
    elif max_dead is not None and pct > max_dead:
        failures.append(f"{s.dead}/{s.units} units dead ({pct:.2f}%) > max_dead {max_dead:g}%")
    if max_dead_layer is not None:
        for lay in report.layers:
            lp = 100.0 * lay.dead_fraction
            if not lay.final and lp > max_dead_layer:
                failures.append(f"layer {lay.name}: {len(lay.dead)}/{lay.units} dead ({lp:.2f}%) > max_dead_layer {max_dead_layer:g}%")
    return GateResult(passed=not failures, failures=failures, max_dead=max_dead, max_dead_layer=max_dead_layer,
                      min_coverage=min_coverage)


__all__ = ["build", "build_blocks", "gate", "envelope", "layer_report", "removable_units", "REMOVABLE_EPS"]
