"""The report: schema ``fitcli.report/1`` (``spec/cli.md``), built from an audit, read back for
``gate``, validated against the JSON Schema shipped in ``fitcli/schema/``, written atomically."""

from __future__ import annotations

import datetime as _dt
import heapq
import json
import math
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from fitcli import __version__
from fitcli.errors import InputError, UsageError

SCHEMA_ID = "fitcli.report/1"
AGGREGATES = ("mean", "max", "min", "var")


def schema() -> dict:
    return json.loads(resources.files("fitcli").joinpath("schema/report.schema.json").read_text())


def validate(report: dict) -> None:
    """Raise jsonschema.ValidationError when ``report`` does not follow the shipped schema."""
    import jsonschema

    jsonschema.validate(report, schema())


def _floats(t: torch.Tensor) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in t.tolist()]


def aggregate(values: torch.Tensor) -> dict[str, float | None]:
    v = values[torch.isfinite(values)].to(torch.float64)
    if v.numel() == 0:
        return {k: None for k in AGGREGATES}
    return {"mean": float(v.mean()), "max": float(v.max()), "min": float(v.min()),
            "var": float(v.var(unbiased=False))}


def nonfinite_units(metrics: dict[str, torch.Tensor], exclude: tuple[str, ...] = ("output_corr",)) -> list[int]:
    """Units with a non-finite value in any metric. ``output_corr`` is NaN by definition when a
    class group is empty, which says nothing about the unit, so it is not counted."""
    bad: set[int] = set()
    for name, v in metrics.items():
        if name in exclude:
            continue
        bad.update(int(i) for i in torch.nonzero(~torch.isfinite(v)).flatten().tolist())
    return sorted(bad)


def default_rank_by(available: set[str]) -> str:
    for name in ("taylor", "act_mean", "weight_norm"):
        if name in available:
            return name
    return sorted(available)[0] if available else "weight_norm"


def rank_units(layers: list[dict], metric: str, top: int) -> list[dict]:
    """The ``top`` least-fit units across the model by per-layer ℓ2-normalised ``metric``.

    Final layers and units whose ranked value is not finite (null) are left out: a NaN is never
    "least fit". A unit flagged non-finite only in another metric keeps its finite rank.
    """
    rows = []
    for lay in layers:
        if lay.get("final") or metric not in lay["metrics"]:
            continue
        vals = lay["metrics"][metric]
        norm = math.sqrt(sum(v * v for v in vals if v is not None))
        for i, v in enumerate(vals):
            if v is not None:
                rows.append((v / norm if norm > 0 else 0.0, lay["name"], i, v, lay))
    best = heapq.nsmallest(top, rows, key=lambda r: (r[0], r[1], r[2]))
    return [{"layer": name, "unit": i, "value": v, "normalized": nv, "dead": i in set(lay.get("dead") or [])}
            for nv, name, i, v, lay in best]


def build(result: Any, loaded: Any, data: Any, settings: dict[str, Any], rank_by: str | None = None,
          top: int = 20, command: str = "score") -> dict:
    """Report dict from an ``engine.AuditResult``."""
    tau = float(settings.get("tau", 0.0))
    layers = []
    for lay in result.layers:
        vals = result.values.get(lay.name, {})
        entry: dict[str, Any] = {
            "name": lay.name, "type": lay.type, "units": lay.units,
            "activation_point": lay.point, "activation_point_kind": lay.point_kind,
            "final": bool(lay.final),
            "metrics": {k: _floats(v) for k, v in sorted(vals.items())},
            "aggregate": {k: aggregate(v) for k, v in sorted(vals.items())},
            "nonfinite": nonfinite_units(vals),
        }
        if "dormant" in vals and not lay.final:
            d = vals["dormant"]
            dead = [i for i, v in enumerate(d.tolist()) if math.isfinite(v) and v <= tau]
            entry["dead"] = dead
            entry["dead_fraction"] = len(dead) / lay.units if lay.units else 0.0
        else:
            entry["dead"] = []
            entry["dead_fraction"] = 0.0
        extra = result.layer_extra.get(lay.name)
        if extra:
            entry.update(extra)
        layers.append(entry)
    notes = list(result.notes)
    for e in layers:
        oc = e["metrics"].get("output_corr")
        if oc is not None and oc and all(v is None for v in oc):
            notes.append(f"output_corr is null for {e['name']}: every prediction was correct, or every one wrong, "
                         "so one of the two groups it compares is empty")
            break
    counted = [e for e in layers if not e["final"]]
    units = sum(e["units"] for e in counted)
    dead = sum(len(e["dead"]) for e in counted)
    have_dead = any("dormant" in e["metrics"] for e in layers)
    available = set().union(*(set(e["metrics"]) for e in layers)) if layers else set()
    if rank_by in (None, "auto"):
        rank_by = default_rank_by(available)
    report: dict[str, Any] = {
        "schema": SCHEMA_ID,
        "tool": {"name": "fitcli", "version": __version__},
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "model": {"path": str(loaded.path), "format": loaded.format, "sha256": loaded.sha256, "arch": loaded.arch},
        "data": {"spec": data.spec if data is not None else None, "samples": result.samples, "batches": result.batches},
        "settings": {**settings, "metrics": sorted({m for e in layers for m in e["metrics"]}),
                     "rank_by": rank_by, "loss": result.loss_name, "device": result.device},
        "discovery": {"method": result.graph.method, "notes": notes},
        "layers": layers,
        "summary": {"layers": len(layers), "units": units, "dead": dead,
                    "dead_fraction": dead / units if units else 0.0, "dead_known": have_dead,
                    "nonfinite_loss_batches": result.nonfinite_loss_batches},
        "ranked": rank_units(layers, rank_by, top),
        "skipped": result.skipped,
        "unsupported": result.graph.unsupported,
        "metric_info": {k: v for k, v in sorted(result.metric_info.items())},
    }
    return report


def gate(report: dict, max_dead: float | None, max_dead_layer: float | None) -> dict:
    """Check dead percentages against thresholds (percent). Adds and returns ``report['gate']``."""
    failures = []
    s = report["summary"]
    pct = 100.0 * s["dead_fraction"]
    if max_dead is not None and pct > max_dead:
        failures.append(f"{s['dead']}/{s['units']} units dead ({pct:.2f}%) > --max-dead {max_dead:g}%")
    if max_dead_layer is not None:
        for lay in report["layers"]:
            lp = 100.0 * lay.get("dead_fraction", 0.0)
            if not lay.get("final") and lp > max_dead_layer:
                failures.append(f"layer {lay['name']}: {len(lay['dead'])}/{lay['units']} dead ({lp:.2f}%) > --max-dead-layer {max_dead_layer:g}%")
    g = {"max_dead": max_dead, "max_dead_layer": max_dead_layer, "passed": not failures, "failures": failures}
    report["gate"] = g
    return g


def dumps(report: dict) -> str:
    return json.dumps(report, indent=2, allow_nan=False, ensure_ascii=False) + "\n"


def read(path: str | Path) -> dict:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise InputError(f"report not found: {path}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read report {path}: {e}") from e
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(obj, dict) or obj.get("schema") != SCHEMA_ID:
        raise InputError(f"{path} is not a fitcli report (schema {SCHEMA_ID!r} expected)")
    try:
        validate(obj)
    except ImportError:  # jsonschema is a dev extra; check the fields gate needs
        if not isinstance(obj.get("summary"), dict) or not isinstance(obj.get("layers"), list):
            raise InputError(f"{path}: report lacks 'summary' or 'layers'") from None
    except Exception as e:
        raise InputError(f"{path} does not follow the report schema: {str(e).splitlines()[0][:200]}") from e
    return obj


def write_atomic(path: str | Path, text: str, protect: list[str | Path] = ()) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename.

    ``protect``: input files that must never be overwritten (the checkpoint, the data...).
    """
    p = Path(path)
    for q in protect:
        try:
            if q and Path(q).exists() and p.exists() and os.path.samefile(p, q):
                raise UsageError(f"--output {path} is one of the inputs; refusing to overwrite it")
        except OSError:
            pass
        if q and Path(q).resolve() == p.resolve():
            raise UsageError(f"--output {path} is one of the inputs; refusing to overwrite it")
    if p.is_dir():
        raise UsageError(f"--output {path} is a directory")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise UsageError(f"--output {path}: folder {parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
