"""The Python API: ``inspect``, ``score``, ``ablate``, ``gate``. The CLI is a thin layer on top.

>>> from fitcli import api
>>> report = api.score("m.safetensors", arch="models.py:MLP", data="d.safetensors")
>>> report["summary"]["dead_fraction"]
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from fitcli import report as rep
from fitcli.data import DataSource, load_data
from fitcli.engine import audit, peek, pick_device, select_layers
from fitcli.errors import InputError, UsageError
from fitcli.loading import LoadedModel, load_model
from fitcli.units import discover


def _load(model: str | LoadedModel, arch: str | None, arch_kwargs: str | None, trust_checkpoint: bool) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    return load_model(model, arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint)


def _data(data: str | DataSource | None, batch_size: int, max_batches: int | None, seed: int) -> DataSource | None:
    if data is None or isinstance(data, DataSource):
        return data
    return load_data(data, batch_size=batch_size, max_batches=max_batches, seed=seed)


def inspect(model: str | LoadedModel, arch: str | None = None, arch_kwargs: str | None = None,
            trust_checkpoint: bool = False, data: str | None = None, batch_size: int = 8) -> dict:
    """Layers, unit counts, activation points and formats found in a checkpoint."""
    loaded = _load(model, arch, arch_kwargs, trust_checkpoint)
    ds = _data(data, batch_size, 1, 0) if loaded.runnable else None
    example = peek(ds) if ds is not None else None
    graph = discover(loaded.module, loaded.state_dict, example=example, exported=loaded.format == "export")
    return {
        "model": {"path": loaded.path, "format": loaded.format, "sha256": loaded.sha256, "arch": loaded.arch},
        "discovery": {"method": graph.method, "notes": loaded.notes + graph.notes},
        "layers": [
            {"name": lay.name, "type": lay.type, "units": lay.units, "activation_point": lay.point,
             "activation_point_kind": lay.point_kind, "parameters": lay.params, "final": lay.final,
             "consumers": lay.consumers}
            for lay in graph.layers
        ],
        "unsupported": graph.unsupported,
    }


def score(
    model: str | LoadedModel,
    *,
    arch: str | None = None,
    arch_kwargs: str | None = None,
    trust_checkpoint: bool = False,
    data: str | DataSource | None = None,
    batch_size: int = 64,
    max_batches: int | None = None,
    loss: str | None = None,
    layers: list[str] | None = None,
    metrics: list[str] | None = None,
    device: str = "auto",
    seed: int = 0,
    tau: float = 0.0,
    top: int = 20,
    rank_by: str | None = None,
    baseline: str | None = None,
    max_dead: float | None = None,
    max_dead_layer: float | None = None,
    progress: bool = False,
    ablation_mode: str = "zero",
    chunk_size: int | None = None,
    validate: bool = False,
    validate_units: int | None = None,
) -> dict:
    """Score every chosen metric; returns the report dict (schema fitcli.report/1)."""
    if tau < 0 or not math.isfinite(tau):
        raise UsageError("--tau must be a finite number ≥ 0")
    if ablation_mode not in ("zero", "mean"):
        raise UsageError(f"--mode {ablation_mode!r}: use zero or mean")
    if validate_units is not None and validate_units < 2:
        raise UsageError("--validate-units must be at least 2 (a rank correlation needs two units)")
    torch.manual_seed(seed)
    loaded = _load(model, arch, arch_kwargs, trust_checkpoint)
    base = load_model(baseline, arch=None) if baseline else None
    ds = _data(data, batch_size, max_batches, seed)
    want = list(metrics) if metrics else None
    result = audit(loaded, ds, metrics=want, layers=layers, loss=loss, baseline=base, device=device,
                   progress=progress, ablation_mode=ablation_mode, chunk_size=chunk_size)
    settings = {"tau": float(tau), "seed": int(seed), "ablation_mode": ablation_mode}
    if rank_by == "auto" and not validate:
        raise UsageError("--rank-by auto picks the best-validated metric: it needs --validate")
    report = rep.build(result, loaded, ds, settings, rank_by=None if rank_by == "auto" else rank_by, top=top)
    if rank_by and rank_by != "auto" and rank_by not in report["settings"]["metrics"]:
        raise UsageError(f"--rank-by {rank_by!r} was not computed in this run"
                         + rep_close(rank_by, report["settings"]["metrics"]))
    _removable(report)
    if validate:
        from fitcli.validate import validate_report

        validate_report(report, graph=result.graph, data=ds, loss=loss, units=validate_units, seed=seed,
                        device=result.device, chunk_size=chunk_size, rank_auto=rank_by == "auto", top=top,
                        progress=progress)
    if max_dead is not None or max_dead_layer is not None:
        rep.gate(report, max_dead, max_dead_layer)
    return report


def rep_close(word: str, choices: list[str]) -> str:
    from fitcli.errors import close_matches

    return close_matches(word, choices) or f" (computed: {', '.join(choices)})"


def _removable(report: dict, eps: float = 1e-6) -> None:
    """Units whose exact ablation changes the loss by at most ``eps`` (spec: removable)."""
    for lay in report["layers"]:
        ab = lay["metrics"].get("ablation")
        if ab is not None:
            lay["removable"] = [i for i, v in enumerate(ab) if v is not None and abs(v) <= eps]


_RANGE = re.compile(r"^\s*(\d{1,12})\s*(?:-\s*(\d{1,12})\s*)?$")


def parse_units(spec: str | None, n: int) -> list[int] | None:
    """``0,3,7-9`` -> [0, 3, 7, 8, 9]; every index must be < n."""
    if spec is None or spec.strip() == "":
        return None
    out: list[int] = []
    for part in spec.split(","):
        m = _RANGE.match(part)
        if not m:
            raise UsageError(f"--units {spec!r}: {part!r} is not an index or a range like 7-9")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if b < a:
            raise UsageError(f"--units {spec!r}: range {part.strip()} runs backwards")
        if b >= n:
            raise UsageError(f"--units {spec!r}: unit {b} is out of range (the layer has {n} units: 0-{n - 1})")
        out.extend(range(a, b + 1))
    return sorted(set(out))


def ablate(
    model: str | LoadedModel,
    *,
    layers: list[str],
    arch: str | None = None,
    arch_kwargs: str | None = None,
    trust_checkpoint: bool = False,
    data: str | DataSource | None = None,
    batch_size: int = 64,
    max_batches: int | None = None,
    loss: str | None = None,
    units: str | None = None,
    mode: str = "zero",
    whole_layer: bool = False,
    chunk_size: int | None = None,
    device: str = "auto",
    seed: int = 0,
    tau: float = 0.0,
    top: int = 20,
    progress: bool = False,
) -> dict:
    """Exact per-unit (or whole-layer) ablation; returns a report with ``metrics.ablation``."""
    from fitcli.ablation import ablate_layers
    from fitcli.engine import AuditResult
    from fitcli.losses import resolve_loss

    if not layers:
        raise UsageError("ablate needs at least one --layer")
    if mode not in ("zero", "mean"):
        raise UsageError(f"--mode {mode!r}: use zero or mean")
    if chunk_size is not None and chunk_size <= 0:
        raise UsageError("--chunk-size must be positive")
    torch.manual_seed(seed)
    loaded = _load(model, arch, arch_kwargs, trust_checkpoint)
    if not loaded.runnable:
        raise InputError(f"{loaded.path}: ablation needs a runnable model; pass --arch "
                         + ("(" + "; ".join(loaded.notes) + ")" if loaded.notes else ""))
    ds = _data(data, batch_size, max_batches, seed)
    if ds is None:
        raise UsageError("ablate needs --data")
    dev = pick_device(device)
    example = peek(ds)
    if example is None:
        raise InputError(f"--data {ds.spec}: yields no batches (empty data)")
    graph = discover(loaded.module, loaded.state_dict, example=example, exported=loaded.format == "export")
    chosen = select_layers(graph, layers)
    loss_fn, loss_name, why = resolve_loss(loss, example.targets)
    if loss_fn is None:
        raise InputError(f"ablation needs a loss: {why}")
    unit_sel = {lay.name: parse_units(units, lay.units) for lay in chosen}
    accuracy = example.targets is not None and not example.targets.is_floating_point()
    if graph.runner is not None:
        graph.runner.to(dev)
    ab = ablate_layers(graph, [lay.name for lay in chosen], ds, loss_fn, mode=mode, device=dev,
                       chunk_size=chunk_size, progress=progress, units=unit_sel, whole_layer=whole_layer,
                       accuracy=accuracy)
    result = AuditResult(graph=graph, layers=chosen, values={}, metric_info={}, skipped=[], device=str(dev),
                         loss_name=loss_name, notes=list(loaded.notes) + list(graph.notes) + ab.notes)
    result.samples, result.batches = ab.samples, ab.batches
    from fitcli.metrics.ablation import Ablation

    for lay in chosen:
        vals = {"ablation": ab.metrics[lay.name].compute()}
        if ab.accuracy.get(lay.name) is not None:
            vals["ablation_accuracy"] = ab.accuracy[lay.name]
        sel = unit_sel[lay.name]
        if sel is not None:  # units not asked for are not finite values: null in JSON, not ranked
            mask = torch.ones(lay.units, dtype=torch.bool)
            mask[sel] = False
            for k in vals:
                vals[k] = vals[k].masked_fill(mask, float("nan"))
        result.values[lay.name] = vals
        extra: dict[str, Any] = {}
        if whole_layer:
            extra["layer_ablation"] = ab.layer_delta.get(lay.name)
            if ab.layer_accuracy.get(lay.name) is not None:
                extra["layer_ablation_accuracy"] = ab.layer_accuracy[lay.name]
        if sel is not None:
            extra["ablated_units"] = sel
        result.layer_extra[lay.name] = extra
    result.metric_info["ablation"] = {"description": Ablation.description, "needs": sorted(Ablation.needs),
                                      "method": ab.method}
    if accuracy:
        result.metric_info["ablation_accuracy"] = {
            "description": "accuracy(ablated) − accuracy: change in the fraction of correct predictions",
            "needs": ["activations", "labels", "ablation"]}
    settings = {"tau": float(tau), "seed": int(seed), "ablation_mode": mode, "whole_layer": whole_layer}
    report = rep.build(result, loaded, ds, settings, rank_by="ablation", top=top, command="ablate")
    # for ablation the most important units have the largest loss increase: rank descending
    report["ranked"] = _rank_ablation(report, top)
    for lay in report["layers"]:
        if unit_sel[lay["name"]] is not None:
            sel = set(unit_sel[lay["name"]])
            lay["nonfinite"] = [u for u in lay["nonfinite"] if u in sel]
    _removable(report)
    return report


def _rank_ablation(report: dict, top: int) -> list[dict]:
    rows = []
    for lay in report["layers"]:
        vals = lay["metrics"]["ablation"]
        acc = lay["metrics"].get("ablation_accuracy")
        for i, v in enumerate(vals):
            if v is None:
                continue
            row = {"layer": lay["name"], "unit": i, "value": v, "normalized": v}
            if acc is not None and acc[i] is not None:
                row["accuracy_change"] = acc[i]
            rows.append(row)
    rows.sort(key=lambda r: (-r["value"], r["layer"], r["unit"]))
    return rows[:top]


def gate(report_path: str, max_dead: float | None, max_dead_layer: float | None) -> dict:
    """Re-check a saved report against thresholds (percent)."""
    report = rep.read(report_path)
    if max_dead is None and max_dead_layer is None:
        g = report.get("gate") or {}
        max_dead, max_dead_layer = g.get("max_dead"), g.get("max_dead_layer")
        if max_dead is None and max_dead_layer is None:
            raise UsageError("gate needs --max-dead and/or --max-dead-layer (or a report that was scored with them)")
    return rep.gate(report, max_dead, max_dead_layer) and report
