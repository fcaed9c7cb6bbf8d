"""The report: schema ``fitcli.report/1`` (``docs/report.md``), built from an audit, read back for
``gate``, validated against the JSON Schema shipped in ``fitcli/schema/``, written atomically."""

from __future__ import annotations

import datetime as _dt
import heapq
import json
import math
import os
import stat
import tempfile
from dataclasses import dataclass, field
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


def direction(metric: str, metric_info: dict | None = None) -> bool:
    """``higher_is_better`` of ``metric``: from the report's metric_info (what the metric declared
    when the report was made), else the registry; True when neither knows it."""
    info = (metric_info or {}).get(metric) or {}
    if isinstance(info.get("higher_is_better"), bool):
        return info["higher_is_better"]
    from fitcli.metrics.registry import load_registry

    entry = load_registry().get(metric)
    if entry is not None and entry.cls is not None and isinstance(entry.cls.higher_is_better, bool):
        return entry.cls.higher_is_better
    return True


def nonfinite_units(metrics: dict[str, torch.Tensor], nan_expected: set[str] | frozenset[str] = frozenset()) -> list[int]:
    """Units with a non-finite value in any metric. Metrics that declare ``nan_expected`` (a NaN
    that says nothing about the unit, e.g. an empty class group) are not counted."""
    bad: set[int] = set()
    for name, v in metrics.items():
        if name in nan_expected:
            continue
        bad.update(int(i) for i in torch.nonzero(~torch.isfinite(v)).flatten().tolist())
    return sorted(bad)


def default_rank_by(available: set[str] | list[str], metric_info: dict | None = None) -> str | None:
    """The computed metric with the highest declared ``rank_priority`` (ties: by name)."""
    info = metric_info or {}
    if not available:
        return None
    return max(sorted(available), key=lambda m: (info.get(m) or {}).get("rank_priority", 0))


def fitness_values(layers: list[dict], metric: str, higher_is_better: bool = True,
                   include_final: bool = False) -> dict[str, list[float | None]]:
    """Each layer's ``metric`` oriented so that higher is fitter and the least-fit extreme is 0.

    A metric where higher is fit is taken as it is. One where lower is fit (APoZ) is reflected at
    its largest value across the layers, ``max − m``: a unit at the model-wide worst value gets 0
    in every layer, as a dead unit does under a higher-is-fit metric, so the per-layer ℓ2
    normalisation that follows cannot move it behind fitter units of another layer.
    """
    chosen = [lay for lay in layers if (include_final or not lay.get("final")) and metric in lay["metrics"]]
    out: dict[str, list[float | None]] = {lay["name"]: list(lay["metrics"][metric]) for lay in chosen}
    if not higher_is_better:
        top = max((v for vals in out.values() for v in vals if v is not None), default=0.0)
        out = {name: [None if v is None else top - v for v in vals] for name, vals in out.items()}
    return out


def rank_units(layers: list[dict], metric: str, top: int | None, higher_is_better: bool = True,
               include_final: bool = False) -> list[dict]:
    """The ``top`` least-fit units across the model by per-layer ℓ2-normalised ``metric``, in the
    metric's direction (see ``fitness_values``): ``normalized`` is the normalised fitness, the
    smallest first; ``value`` the metric's own value.

    Final layers (unless ``include_final``) and units whose ranked value is not finite (null) are
    left out: a NaN is never "least fit". A unit flagged non-finite only in another metric keeps
    its finite rank.
    """
    fit = fitness_values(layers, metric, higher_is_better, include_final)
    by_name = {lay["name"]: lay for lay in layers}
    rows = []
    for name, vals in fit.items():
        lay = by_name[name]
        norm = math.sqrt(sum(v * v for v in vals if v is not None))
        for i, v in enumerate(vals):
            if v is not None:
                rows.append((v / norm if norm > 0 else 0.0, name, i, lay["metrics"][metric][i], lay))
    n = len(rows) if top is None else top
    best = heapq.nsmallest(n, rows, key=lambda r: (r[0], r[1], r[2]))
    return [{"layer": name, "unit": i, "value": v, "normalized": nv, "dead": i in set(lay.get("dead") or [])}
            for nv, name, i, v, lay in best]


def _layer_entry(lay: Any, vals: dict[str, torch.Tensor], info: dict[str, dict], tau: float,
                 extra: dict | None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": lay.name, "type": lay.type, "units": lay.units,
        "activation_point": lay.point, "activation_point_kind": lay.point_kind,
        "activation_chain": lay.chain_text,
        "final": bool(lay.final),
        "metrics": {k: _floats(v) for k, v in sorted(vals.items())},
        "aggregate": {k: aggregate(v) for k, v in sorted(vals.items())},
        "nonfinite": nonfinite_units(vals, {m for m in vals if (info.get(m) or {}).get("nan_expected")}),
    }
    marker = next((m for m in sorted(vals) if (info.get(m) or {}).get("marks_dead")), None)
    entry["dead"] = []
    entry["dead_fraction"] = 0.0
    if marker is not None and not lay.final:
        d = vals[marker]
        entry["dead"] = [i for i, v in enumerate(d.tolist()) if math.isfinite(v) and v <= tau]
        entry["dead_fraction"] = len(entry["dead"]) / lay.units if lay.units else 0.0
    if lay.members:
        entry["members"] = list(lay.members)
    if extra:
        entry.update(extra)
    return entry


def _empty_group_notes(layers: list[dict], info: dict[str, dict]) -> list[str]:
    for e in layers:
        for m, vals in e["metrics"].items():
            if (info.get(m) or {}).get("nan_expected") and vals and all(v is None for v in vals):
                return [f"{m} is null for {e['name']}: its definition has no value on this data "
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


def build(result: Any, loaded: Any, data: Any, settings: dict[str, Any], rank_by: str | None = None,
          top: int = 20, command: str = "score", include_final: bool = False) -> dict:
    """Report dict from an ``engine.AuditResult``."""
    tau = float(settings.get("tau", 0.0))
    info = result.metric_info
    layers = [_layer_entry(lay, result.values.get(lay.name, {}), info, tau, result.layer_extra.get(lay.name))
              for lay in result.layers]
    notes = list(result.notes) + _empty_group_notes(layers, info)
    # the units whose deadness is known: non-final layers with a dead-marking metric (activations)
    counted = [e for e in layers if not e["final"] and e.get("activation_point_kind") != "weights"
               and any((info.get(m) or {}).get("marks_dead") for m in e["metrics"])]
    units = sum(e["units"] for e in counted)
    dead = sum(len(e["dead"]) for e in counted)
    have_dead = any((info.get(m) or {}).get("marks_dead") for e in layers for m in e["metrics"])
    available = set().union(*(set(e["metrics"]) for e in layers)) if layers else set()
    if rank_by in (None, "auto") or rank_by not in available:
        rank_by = default_rank_by(available, info)
    report: dict[str, Any] = {
        **envelope(command, loaded, data, result.samples, result.batches),
        "settings": {**settings, "metrics": sorted({m for e in layers for m in e["metrics"]}),
                     "rank_by": rank_by, "loss": result.loss_name, "device": result.device},
        "discovery": {"method": result.graph.method, "notes": notes},
        "layers": layers,
        "summary": {"layers": len(layers), "units": units, "dead": dead,
                    "dead_fraction": dead / units if units else 0.0, "dead_known": have_dead,
                    "nonfinite_loss_batches": result.nonfinite_loss_batches},
        "ranked": rank_units(layers, rank_by, top, direction(rank_by, info), include_final) if rank_by else [],
        "skipped": result.skipped,
        "unsupported": result.graph.unsupported,
        "coverage": getattr(result, "coverage", None) or {},
        "metric_info": {k: v for k, v in sorted(info.items())},
    }
    return report


def gate(report: dict, max_dead: float | None, max_dead_layer: float | None,
         min_coverage: float | None = None) -> dict:
    """Check dead percentages (and coverage) against thresholds in percent. A dead-unit gate never
    passes on nothing: with no unit audited it fails, saying so. Adds and returns ``report['gate']``."""
    failures = []
    s = report["summary"]
    if (max_dead is not None or max_dead_layer is not None) and not s.get("units"):
        failures.append("no unit was audited, so none could be checked for dead ones: a gate cannot pass on "
                        "nothing (the report's coverage lists what was not audited and why)")
    if min_coverage is not None:
        cov = report.get("coverage") or {}
        if "fraction" not in cov:
            failures.append("the report has no coverage figure (made by an older fitcli): min_coverage cannot hold")
        elif 100.0 * cov["fraction"] < min_coverage:
            failures.append(f"the audited units cover {100.0 * cov['fraction']:.2f}% of the model's parameters "
                            f"< min_coverage {min_coverage:g}%")
    pct = 100.0 * s["dead_fraction"]
    if max_dead is not None and pct > max_dead:
        failures.append(f"{s['dead']}/{s['units']} units dead ({pct:.2f}%) > max_dead {max_dead:g}%")
    if max_dead_layer is not None:
        for lay in report["layers"]:
            lp = 100.0 * lay.get("dead_fraction", 0.0)
            if not lay.get("final") and lp > max_dead_layer:
                failures.append(f"layer {lay['name']}: {len(lay['dead'])}/{lay['units']} dead ({lp:.2f}%) > max_dead_layer {max_dead_layer:g}%")
    g = {"max_dead": max_dead, "max_dead_layer": max_dead_layer, "passed": not failures, "failures": failures}
    if min_coverage is not None:
        g["min_coverage"] = min_coverage
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


def new_file_mode(p: Path) -> int:
    """The permissions the written file gets: those of the file it replaces, else what a plain
    ``open()`` would give a new file (0666 less the umask). ``mkstemp`` makes its file 0600."""
    try:
        return stat.S_IMODE(p.stat().st_mode)
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def check_output(path: str | Path, protect: list[str | Path] = ()) -> Path:
    """An output path that may be written: not one of the inputs in ``protect`` (the checkpoint,
    the data...), not a folder, in a folder that exists."""
    p = Path(path)
    for q in protect:
        try:
            if q and Path(q).exists() and p.exists() and os.path.samefile(p, q):
                raise UsageError(f"output {path} is one of the inputs; refusing to overwrite it")
        except OSError:
            pass
        if q and Path(q).resolve() == p.resolve():
            raise UsageError(f"output {path} is one of the inputs; refusing to overwrite it")
    if p.is_dir():
        raise UsageError(f"output {path} is a directory")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise UsageError(f"output {path}: folder {parent} does not exist")
    return p


def replace_atomically(path: str | Path, write: Any) -> None:
    """``write(temporary path)`` fills a temporary file beside ``path``, which then replaces it by a
    rename (with the permissions a plain write would give it): a reader never sees half a file, and
    a failure leaves the old file and no temporary."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp" + p.suffix, dir=parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, new_file_mode(p))
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_atomic(path: str | Path, text: str, protect: list[str | Path] = ()) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename.

    ``protect``: input files that must never be overwritten (the checkpoint, the data...).
    """
    p = check_output(path, protect)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    replace_atomically(p, write)


# --------------------------------------------------------------------------------------------
# the typed report


def _tensor(values: list[float | None]) -> torch.Tensor:
    return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float64)


_LAYER_FIELDS = ("name", "type", "units", "activation_point", "activation_point_kind", "final", "metrics",
                 "aggregate", "dead", "dead_fraction", "nonfinite", "removable", "activation_chain", "members")


@dataclass
class LayerReport:
    """One audited layer: its units' metric values as float64 tensors (NaN where not finite)."""

    name: str
    type: str
    units: int
    activation_point: str
    metrics: dict[str, torch.Tensor]
    aggregate: dict[str, dict[str, float | None]]
    dead: list[int]
    dead_fraction: float
    nonfinite: list[int]
    final: bool = False
    activation_point_kind: str | None = None
    activation_chain: str | None = None
    removable: list[int] | None = None
    members: list[str] | None = None  # the layers a gated unit is made of
    extra: dict[str, Any] = field(default_factory=dict)  # further JSON fields (layer_ablation, ...)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerReport:
        return cls(name=d["name"], type=d["type"], units=int(d["units"]), activation_point=d["activation_point"],
                   metrics={k: _tensor(v) for k, v in d["metrics"].items()}, aggregate=dict(d["aggregate"]),
                   dead=list(d["dead"]), dead_fraction=float(d["dead_fraction"]), nonfinite=list(d["nonfinite"]),
                   final=bool(d.get("final", False)), activation_point_kind=d.get("activation_point_kind"),
                   activation_chain=d.get("activation_chain"), members=d.get("members"),
                   removable=d.get("removable"),
                   extra={k: v for k, v in d.items() if k not in _LAYER_FIELDS})

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "type": self.type, "units": self.units,
                             "activation_point": self.activation_point}
        if self.activation_point_kind is not None:
            d["activation_point_kind"] = self.activation_point_kind
        if self.activation_chain is not None:
            d["activation_chain"] = self.activation_chain
        d.update({"final": self.final, "metrics": {k: _floats(v) for k, v in self.metrics.items()},
                  "aggregate": self.aggregate, "nonfinite": self.nonfinite, "dead": self.dead,
                  "dead_fraction": self.dead_fraction})
        if self.removable is not None:
            d["removable"] = self.removable
        if self.members is not None:
            d["members"] = self.members
        d.update(self.extra)
        return d


@dataclass
class GateResult:
    """A gate's verdict: ``passed``, and one line per threshold exceeded."""

    passed: bool
    failures: list[str]
    max_dead: float | None = None
    max_dead_layer: float | None = None
    min_coverage: float | None = None

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        d = {"max_dead": self.max_dead, "max_dead_layer": self.max_dead_layer, "passed": self.passed,
             "failures": list(self.failures)}
        if self.min_coverage is not None:
            d["min_coverage"] = self.min_coverage
        return d


class AuditReport:
    """An audit's result (schema ``fitcli.report/1``): layers with per-unit metric tensors, the
    dead and removable units, rankings in each metric's direction, and JSON in and out.

    >>> report = fitcli.audit(model, loader)
    >>> report.dead                       # {"fc1": [3, 17], ...}
    >>> report.ranked(by="apoz", top=5)   # the least fit first
    >>> report.save("report.json"); AuditReport.load("report.json")
    """

    def __init__(self, data: dict[str, Any]):
        data = dict(data)
        self.layers: list[LayerReport] = [LayerReport.from_dict(x) for x in data.pop("layers", [])]
        self._meta = data

    # ---- views ------------------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        """The JSON field ``key`` (as in ``to_dict()``), e.g. ``report["summary"]``."""
        return self.to_dict()[key] if key == "layers" else self._meta[key]

    def __contains__(self, key: str) -> bool:
        return key == "layers" or key in self._meta

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def __repr__(self) -> str:
        s = self.summary
        return (f"<AuditReport {self._meta.get('command', 'score')} {self.model.get('path')}: {len(self.layers)} layers, "
                f"{s.get('dead', 0)}/{s.get('units', 0)} units dead>")

    def layer(self, name: str) -> LayerReport:
        for lay in self.layers:
            if lay.name == name:
                return lay
        from fitcli.errors import close_matches

        raise KeyError(f"no layer {name!r} in this report" + close_matches(name, [x.name for x in self.layers]))

    @property
    def summary(self) -> dict[str, Any]:
        return self._meta["summary"]

    @property
    def settings(self) -> dict[str, Any]:
        return self._meta["settings"]

    @property
    def model(self) -> dict[str, Any]:
        return self._meta["model"]

    @property
    def skipped(self) -> list[dict[str, str]]:
        return self._meta.get("skipped", [])

    @property
    def unsupported(self) -> list[dict[str, str]]:
        return self._meta.get("unsupported", [])

    @property
    def metric_info(self) -> dict[str, dict]:
        return self._meta.get("metric_info", {})

    @property
    def validation(self) -> dict[str, Any] | None:
        return self._meta.get("validation")

    @property
    def gate_result(self) -> GateResult | None:
        g = self._meta.get("gate")
        return None if g is None else GateResult(bool(g["passed"]), list(g.get("failures", [])),
                                                 g.get("max_dead"), g.get("max_dead_layer"), g.get("min_coverage"))

    @property
    def metrics(self) -> list[str]:
        """The metrics computed in this report."""
        return list(self.settings.get("metrics", []))

    @property
    def dead(self) -> dict[str, list[int]]:
        """Dead units per non-final layer (dormancy score ≤ τ)."""
        return {lay.name: list(lay.dead) for lay in self.layers if not lay.final}

    @property
    def removable(self) -> dict[str, list[int]]:
        """Units whose exact ablation changes the loss by at most 1e-6, per layer that was ablated."""
        return {lay.name: list(lay.removable) for lay in self.layers if lay.removable is not None}

    def higher_is_better(self, metric: str) -> bool:
        return direction(metric, self.metric_info)

    def ranked(self, by: str | None = None, top: int | None = 20, include_final: bool = False) -> list[dict]:
        """The least-fit units across layers by per-layer ℓ2-normalised ``by`` (default: the report's
        ranking metric), in the metric's direction: rows ``{layer, unit, value, normalized, dead}``."""
        by = by or self.settings.get("rank_by")
        if by is None or by not in self.metrics:
            from fitcli.errors import UsageError, close_matches

            raise UsageError(f"metric {by!r} is not in this report" + close_matches(str(by), self.metrics)
                             + f" (computed: {', '.join(self.metrics) or 'none'})")
        layers = [lay.to_dict() for lay in self.layers]
        return rank_units(layers, by, top, self.higher_is_better(by), include_final)

    # ---- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in self._meta.items():
            out[k] = v
            if k == "discovery":  # keep the schema's field order: layers after discovery
                out["layers"] = [lay.to_dict() for lay in self.layers]
        out.setdefault("layers", [lay.to_dict() for lay in self.layers])
        return out

    def to_json(self) -> str:
        return dumps(self.to_dict())

    def save(self, path: str | Path, protect: list[str | Path] = ()) -> Path:
        """Write the JSON report atomically (a temporary file and a rename); returns the path."""
        write_atomic(path, self.to_json(), protect=protect)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> AuditReport:
        return cls(read(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditReport:
        return cls(data)

    def to_pandas(self):
        """One row per (layer, unit): layer, unit, dead, then one column per metric. Needs pandas."""
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("AuditReport.to_pandas() needs pandas: pip install pandas") from e
        rows = []
        for lay in self.layers:
            dead = set(lay.dead)
            for i in range(lay.units):
                row: dict[str, Any] = {"layer": lay.name, "unit": i, "final": lay.final, "dead": i in dead}
                for m, v in lay.metrics.items():
                    row[m] = float(v[i])
                rows.append(row)
        return pd.DataFrame(rows)
