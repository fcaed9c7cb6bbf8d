"""The report (schema ``fitcli.report/1``): ``AuditReport``, the typed report an audit returns,
built once from typed sections (``fitcli.report_types``) and turned into JSON only at the edge
(``to_dict``/``to_json``/``save``); reading a saved report back (``load``, old reports included),
the JSON Schema shipped in ``fitcli/schema/``, rankings in each metric's direction, atomic writes.
Building one from an audit is ``fitcli.report_build``."""

from __future__ import annotations

import dataclasses
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

from fitcli.errors import InputError, UsageError
from fitcli.report_types import (
    BlockRow,
    BlockValidation,
    Coverage,
    GateResult,
    GreedyStep,
    LayerReport,
    Section,
    Summary,
    Validation,
    unit_floats,
)

SCHEMA_ID = "fitcli.report/1"
AGGREGATES = ("mean", "max", "min", "var")


def schema() -> dict:
    return json.loads(resources.files("fitcli").joinpath("schema/report.schema.json").read_text())


def validate(report: dict) -> None:
    """Raise jsonschema.ValidationError when ``report`` does not follow the shipped schema."""
    import jsonschema

    jsonschema.validate(report, schema())


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


def marks_dead(metric: str, metric_info: dict | None = None) -> bool:
    """Whether ``metric`` decides dead units (its value ≤ τ): as the report's metric_info declared
    it, else as the registry's metric does (a report from before metric_info)."""
    info = (metric_info or {}).get(metric)
    if info is not None:
        return bool(info.get("marks_dead"))
    from fitcli.metrics.registry import load_registry

    entry = load_registry().get(metric)
    return bool(entry is not None and entry.cls is not None and entry.cls.marks_dead)


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




def scalar_text(x: Any) -> str:
    """One number (or null, true, false) as ``json.dumps`` writes it; a non-finite float is refused."""
    if x is None:
        return "null"
    if x is True or x is False:
        return "true" if x else "false"
    if isinstance(x, float):
        if not math.isfinite(x):
            raise ValueError(f"Out of range float values are not JSON compliant: {x!r}")
        return float.__repr__(x)
    return int.__repr__(x)


def is_scalar_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(x is None or isinstance(x, (int, float)) for x in value)


def layout(value: Any, level: int) -> str:
    """``value`` as ``json.dumps(indent=2)`` lays it out, except that a list of numbers (a
    per-unit list, a list of unit indices) stays on one line."""
    pad = "  " * (level + 1)
    if isinstance(value, dict):
        if not value:
            return "{}"
        rows = [pad + json.dumps(k if isinstance(k, str) else scalar_text(k), ensure_ascii=False) + ": "
                + layout(v, level + 1) for k, v in value.items()]
        return "{\n" + ",\n".join(rows) + "\n" + "  " * level + "}"
    if isinstance(value, (list, tuple)):
        if not value:
            return "[]"
        if is_scalar_list(value):
            return "[" + ", ".join(map(scalar_text, value)) + "]"
        return "[\n" + ",\n".join(pad + layout(v, level + 1) for v in value) + "\n" + "  " * level + "]"
    return json.dumps(value, allow_nan=False, ensure_ascii=False)


def ranking_layers(layers: list[LayerReport], metric: str) -> list[dict]:
    """What ``rank_units`` reads of each layer, ``metric`` as the report writes it: a ranking made
    in memory is the one a reader recomputes from the file, each row's ``value`` the unit's value there."""
    return [{"name": lay.name, "final": lay.final, "dead": lay.dead,
             "metrics": {metric: unit_floats(lay.metrics[metric])} if metric in lay.metrics else {}}
            for lay in layers]


def dumps(report: dict) -> str:
    """The report's JSON text: indented by two, each list of numbers on one line."""
    return layout(report, 0) + "\n"


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
                raise UsageError(f"{{output}} {path} is one of the inputs; refusing to overwrite it", setting="output")
        except OSError:
            pass
        if q and Path(q).resolve() == p.resolve():
            raise UsageError(f"{{output}} {path} is one of the inputs; refusing to overwrite it", setting="output")
    if p.is_dir():
        raise UsageError(f"{{output}} {path} is a directory", setting="output")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise UsageError(f"{{output}} {path}: folder {parent} does not exist", setting="output")
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

# the JSON fields in the order a report is written, and the attribute that holds each
JSON_FIELDS = ("schema", "tool", "created", "command", "model", "data", "settings", "discovery", "layers", "summary",
               "ranked", "skipped", "unsupported", "coverage", "metric_info", "blocks", "base", "greedy",
               "block_validation", "distributed", "validation", "offload", "gate")
REQUIRED = ("schema", "tool", "created", "model", "data", "settings", "layers", "summary", "skipped")
ATTRIBUTE = {"ranked": "ranking"}  # ``ranked`` is the method that ranks in any metric


def _json(value: Any) -> Any:
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, list):
        return [_json(x) for x in value]
    return value


def _listed(items: list | None, cls: Any) -> list | None:
    return None if items is None else [cls.from_dict(x) for x in items]


@dataclass(eq=False, repr=False)
class AuditReport:
    """An audit's result (schema ``fitcli.report/1``): layers with per-unit metric tensors, the
    dead and removable units, rankings in each metric's direction, and JSON in and out.

    >>> report = fitcli.audit(model, loader)
    >>> report.dead                       # {"fc1": [3, 17], ...}
    >>> report.ranked(by="apoz", top=5)   # the least fit first
    >>> report.save("report.json"); AuditReport.load("report.json")

    Every JSON field is an attribute (``ranked``, the stored ranking, is ``ranking``); optional
    ones are None where the report has none (a blocks report has no ``coverage``, a score report no
    ``blocks``). ``report["summary"]`` reads the JSON of a field, as in ``to_dict()``.
    """

    schema: str
    tool: dict[str, Any]
    created: str
    model: dict[str, Any]
    data: dict[str, Any]
    settings: dict[str, Any]
    layers: list[LayerReport]
    summary: Summary
    skipped: list[dict[str, Any]] = field(default_factory=list)
    command: str | None = None
    discovery: dict[str, Any] | None = None
    ranking: list[dict[str, Any]] | None = None  # the JSON's "ranked": the least-fit units by settings.rank_by
    unsupported: list[dict[str, str]] | None = None
    coverage: Coverage | None = None
    metric_info: dict[str, dict] | None = None
    blocks: list[BlockRow] | None = None
    base: dict[str, Any] | None = None  # blocks: the loss (and accuracy) with every block in place
    greedy: list[GreedyStep] | None = None
    block_validation: BlockValidation | None = None
    distributed: dict[str, Any] | None = None
    validation: Validation | None = None
    offload: dict[str, Any] | None = None
    gate: GateResult | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # fields this fitcli does not know, kept as they were

    # ---- JSON in and out ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuditReport:
        """A report from its JSON (a saved report of any fitcli version that wrote schema fitcli.report/1)."""
        try:
            return cls(
                schema=d["schema"], tool=d["tool"], created=d["created"], model=d["model"], data=d["data"],
                settings=d["settings"], layers=[LayerReport.from_dict(x) for x in d.get("layers", [])],
                summary=Summary.from_dict(d["summary"]), skipped=d.get("skipped", []), command=d.get("command"),
                discovery=d.get("discovery"), ranking=d.get("ranked"), unsupported=d.get("unsupported"),
                coverage=None if d.get("coverage") is None else Coverage.from_dict(d["coverage"]),
                metric_info=d.get("metric_info"), blocks=_listed(d.get("blocks"), BlockRow), base=d.get("base"),
                greedy=_listed(d.get("greedy"), GreedyStep),
                block_validation=BlockValidation.from_dict(d.get("block_validation")),
                distributed=d.get("distributed"), validation=Validation.from_dict(d.get("validation")),
                offload=d.get("offload"), gate=GateResult.from_dict(d.get("gate")),
                extra={k: v for k, v in d.items() if k not in JSON_FIELDS})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InputError(f"not a fitcli report: {type(e).__name__} {e}") from None

    def json_field(self, key: str) -> Any:
        """The JSON of field ``key`` (None where the report has none)."""
        if key not in JSON_FIELDS:
            return self.extra.get(key)
        return _json(getattr(self, ATTRIBUTE.get(key, key)))

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for key in JSON_FIELDS:
            value = self.json_field(key)
            if value is not None or key in REQUIRED:
                out[key] = value
        return {**out, **self.extra}

    def to_json(self) -> str:
        return dumps(self.to_dict())

    def save(self, path: str | Path, protect: list[str | Path] = ()) -> Path:
        """Write the JSON report atomically (a temporary file and a rename); returns the path."""
        write_atomic(path, self.to_json(), protect=protect)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> AuditReport:
        """A saved report, checked against the schema (``InputError`` when it is not one)."""
        return cls.from_dict(read(path))

    # ---- views ------------------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        """The JSON field ``key`` (as in ``to_dict()``), e.g. ``report["summary"]``."""
        value = self.json_field(key)
        if value is None and key not in REQUIRED and key not in self.extra:
            raise KeyError(key)
        return value

    def __contains__(self, key: str) -> bool:
        return key in REQUIRED or self.json_field(key) is not None or key in self.extra

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def __repr__(self) -> str:
        s = self.summary
        return (f"<AuditReport {self.command or 'score'} {self.model.get('path')}: {len(self.layers)} layers, "
                f"{s.dead}/{s.units} units dead>")

    def layer(self, name: str) -> LayerReport:
        for lay in self.layers:
            if lay.name == name:
                return lay
        from fitcli.errors import close_matches

        raise KeyError(f"no layer {name!r} in this report" + close_matches(name, [x.name for x in self.layers]))

    @property
    def gate_result(self) -> GateResult | None:
        """The gate's verdict, if the report was gated (the same as ``gate``)."""
        return self.gate

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
            from fitcli.errors import close_matches

            raise UsageError(f"metric {by!r} is not in this report" + close_matches(str(by), self.metrics)
                             + f" (computed: {', '.join(self.metrics) or 'none'})")
        return rank_units(ranking_layers(self.layers, by), by, top, self.higher_is_better(by), include_final)

    def with_validation(self, validation: Validation, rerank: bool = False, top: int | None = 20) -> AuditReport:
        """This report with ``validation``; with ``rerank``, ranked by the metric it found best."""
        best = validation.best if rerank else None
        if not best:
            return dataclasses.replace(self, validation=validation)
        return dataclasses.replace(self, validation=validation, settings={**self.settings, "rank_by": best},
                                   ranking=rank_units(ranking_layers(self.layers, best), best, top, self.higher_is_better(best)))

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


__all__ = ["AuditReport", "LayerReport", "GateResult", "SCHEMA_ID", "AGGREGATES", "schema", "validate", "aggregate",
           "direction", "marks_dead", "nonfinite_units", "default_rank_by", "fitness_values", "rank_units", "ranking_layers", "dumps", "read",
           "check_output", "replace_atomically", "write_atomic", "new_file_mode"]
