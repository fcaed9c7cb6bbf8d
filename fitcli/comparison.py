"""Regressions between two audits: ``compare(base, new) -> Comparison`` (schema ``fitcli.compare/1``).

Per layer: the dead fraction on each side and its change, the units that died (dead in ``new``,
alive in ``base``) and revived (the reverse), units that became non-finite, and the largest drift
of every metric both sides computed. A gate (``max_new_dead``, percent) fails when more of the
compared units died than allowed.

>>> cmp = fitcli.compare("main.json", "branch.json", max_new_dead=1)
>>> cmp.died                 # {"fc1": [8], "fc2": [1, 12]}
>>> cmp.gate.passed, cmp.to_dict()["summary"]

``base`` and ``new`` are reports (an ``AuditReport``, a report dict, or the path of a JSON report)
or models (an ``nn.Module``, a loaded model, or a checkpoint path with ``arch``); models are
audited through ``fitcli.api.audit`` on the same data with the same settings. Layers are matched
by name; unit ``i`` of a layer is the same unit on both sides only when the layer has the same
number of units on both sides, so a layer whose size changed (pruned) is reported, not zipped.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fitcli import __version__
from fitcli.discovery.kinds import entry_kind
from fitcli.errors import UsageError
from fitcli.report import SCHEMA_ID as REPORT_SCHEMA_ID
from fitcli.report import AuditReport, GateResult, dumps, marks_dead, write_atomic

SCHEMA_ID = "fitcli.compare/1"
DEFAULT_TOP = 5
DRIFT_MEASURE = ("drift = |new - base| / spread, where spread is the population standard deviation of the "
                 "metric's finite base values over the layer's units (1 when those are all equal); units with "
                 "a non-finite value on either side are left out")


# --------------------------------------------------------------------------------------------
# the typed comparison


@dataclass
class Drift:
    """One unit's change in one metric: raw values, ``change = new - base``, normalised ``drift``."""

    unit: int
    base: float
    new: float
    change: float
    drift: float

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "base": self.base, "new": self.new, "change": self.change, "drift": self.drift}


@dataclass
class LayerComparison:
    """One layer, matched by name. ``status``: ``compared`` (on both sides, same number of units),
    ``units_differ`` (on both sides, sizes differ: unit indices do not correspond), ``base_only``
    or ``new_only``. ``died``/``revived`` are None where dead units are not known on both sides
    (a final layer, embedding rows, weight metrics only) or the units do not correspond."""

    name: str
    status: str
    type: str
    final: bool
    units_base: int | None
    units_new: int | None
    dead_base: list[int] | None = None
    dead_new: list[int] | None = None
    died: list[int] | None = None
    revived: list[int] | None = None
    became_nonfinite: list[int] = field(default_factory=list)
    drifts: dict[str, list[Drift]] = field(default_factory=dict)
    note: str | None = None

    @property
    def units(self) -> int | None:
        """Units compared one by one (the layer is on both sides with the same size)."""
        return self.units_base if self.status == "compared" else None

    @property
    def dead_fraction_base(self) -> float | None:
        return _fraction(self.dead_base, self.units_base)

    @property
    def dead_fraction_new(self) -> float | None:
        return _fraction(self.dead_new, self.units_new)

    @property
    def dead_fraction_change(self) -> float | None:
        b, n = self.dead_fraction_base, self.dead_fraction_new
        return None if b is None or n is None else n - b

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "type": self.type, "final": self.final,
                "units": self.units, "units_base": self.units_base, "units_new": self.units_new,
                "dead_base": self.dead_base, "dead_new": self.dead_new,
                "dead_fraction_base": self.dead_fraction_base, "dead_fraction_new": self.dead_fraction_new,
                "dead_fraction_change": self.dead_fraction_change, "died": self.died, "revived": self.revived,
                "became_nonfinite": self.became_nonfinite,
                "drifts": {m: [d.to_dict() for d in rows] for m, rows in self.drifts.items()}, "note": self.note}


@dataclass
class Side:
    """What one side of the comparison was: a saved report or a model audited here."""

    kind: str  # "report" or "model"
    source: str | None  # the path given, or None for a live object
    report: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        r = self.report
        return {"kind": self.kind, "source": self.source, "created": r.get("created"), "command": r.get("command"),
                "model": r.get("model"), "data": r.get("data"), "settings": r.get("settings"),
                "summary": r.get("summary")}


@dataclass
class CompareGate(GateResult):
    """The new-deaths gate: fails when ``died / units`` in percent exceeds ``max_new_dead``, or
    when no unit could be compared (a gate never passes on nothing)."""

    max_new_dead: float | None = None
    died: int = 0
    units: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"max_new_dead": self.max_new_dead, "died": self.died, "units": self.units,
                "died_percent": 100.0 * self.died / self.units if self.units else None,
                "passed": self.passed, "failures": list(self.failures)}


@dataclass
class Comparison:
    """The result of ``compare``: both sides, per-layer comparisons, notes and the gate."""

    base: Side
    new: Side
    layers: list[LayerComparison]
    notes: list[str] = field(default_factory=list)
    top: int = DEFAULT_TOP
    gate: CompareGate | None = None
    created: str = ""

    def layer(self, name: str) -> LayerComparison:
        for lay in self.layers:
            if lay.name == name:
                return lay
        from fitcli.errors import close_matches

        raise KeyError(f"no layer {name!r} in this comparison" + close_matches(name, [x.name for x in self.layers]))

    @property
    def died(self) -> dict[str, list[int]]:
        """Units dead in ``new`` and alive in ``base``, per layer where both are known."""
        return {lay.name: list(lay.died) for lay in self.layers if lay.died is not None}

    @property
    def revived(self) -> dict[str, list[int]]:
        """Units dead in ``base`` and alive in ``new``, per layer where both are known."""
        return {lay.name: list(lay.revived) for lay in self.layers if lay.revived is not None}

    @property
    def summary(self) -> dict[str, Any]:
        known = [lay for lay in self.layers if lay.died is not None]
        units = sum(lay.units or 0 for lay in known)
        died = sum(len(lay.died or []) for lay in known)
        revived = sum(len(lay.revived or []) for lay in known)
        dead_b = sum(len(lay.dead_base or []) for lay in known)
        dead_n = sum(len(lay.dead_new or []) for lay in known)
        frac_b, frac_n = (dead_b / units, dead_n / units) if units else (None, None)

        def names(status: str) -> list[str]:
            return [lay.name for lay in self.layers if lay.status == status]

        return {"layers_compared": len(names("compared")), "base_only": names("base_only"),
                "new_only": names("new_only"), "units_differ": names("units_differ"),
                "units_compared": units, "dead_known": bool(known), "died": died, "revived": revived,
                "died_percent": 100.0 * died / units if units else None,
                "revived_percent": 100.0 * revived / units if units else None,
                "dead_base": dead_b, "dead_new": dead_n, "dead_fraction_base": frac_b,
                "dead_fraction_new": frac_n,
                "dead_fraction_change": None if frac_b is None or frac_n is None else frac_n - frac_b,
                "largest_drifts": self.largest_drifts(1)}

    def largest_drifts(self, per_metric: int | None = 1) -> list[dict[str, Any]]:
        """For each metric, its ``per_metric`` largest drifts across layers (None: all kept):
        rows ``{layer, metric, unit, base, new, change, drift}``, by metric, the largest first."""
        rows = [{"layer": lay.name, "metric": m, **d.to_dict()}
                for lay in self.layers for m, ds in lay.drifts.items() for d in ds]
        rows.sort(key=lambda r: (r["metric"], -r["drift"], r["layer"], r["unit"]))
        if per_metric is None:
            return rows
        seen: dict[str, int] = {}
        out = []
        for r in rows:
            seen[r["metric"]] = seen.get(r["metric"], 0) + 1
            if seen[r["metric"]] <= per_metric:
                out.append(r)
        return out

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"schema": SCHEMA_ID, "tool": {"name": "fitcli", "version": __version__},
                             "created": self.created, "command": "compare",
                             "base": self.base.to_dict(), "new": self.new.to_dict(),
                             "drift_measure": DRIFT_MEASURE, "top": self.top,
                             "layers": [lay.to_dict() for lay in self.layers], "summary": self.summary,
                             "notes": list(self.notes)}
        if self.gate is not None:
            d["gate"] = self.gate.to_dict()
        return d

    def to_json(self) -> str:
        return dumps(self.to_dict())

    def save(self, path: str | Path, protect: list[str | Path] = ()) -> Path:
        """Write the JSON comparison atomically (a temporary file and a rename); returns the path."""
        write_atomic(path, self.to_json(), protect=protect)
        return Path(path)


# --------------------------------------------------------------------------------------------
# per layer


def _fraction(dead: list[int] | None, units: int | None) -> float | None:
    return None if dead is None or not units else len(dead) / units


def _spread(values: list[float]) -> float:
    if not values:
        return 1.0
    mean = math.fsum(values) / len(values)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
    return sd if sd > 0 and math.isfinite(sd) else 1.0


def _drifts(base: dict, new: dict, top: int) -> dict[str, list[Drift]]:
    """Per metric both layers have, the ``top`` units with the largest normalised change."""
    out: dict[str, list[Drift]] = {}
    for m in sorted(set(base["metrics"]) & set(new["metrics"])):
        bv, nv = base["metrics"][m], new["metrics"][m]
        spread = _spread([v for v in bv if v is not None])
        rows = [Drift(i, x, y, y - x, abs(y - x) / spread) for i, (x, y) in enumerate(zip(bv, nv, strict=True))
                if x is not None and y is not None and y != x]
        rows.sort(key=lambda r: (-r.drift, r.unit))
        out[m] = rows[:top]
    return out


def _dead_known(lay: dict, report: dict) -> bool:
    """Whether the layer's dead list was decided (the units ``report_build.build`` counts)."""
    if lay.get("final") or entry_kind(lay).weight_only:
        return False
    if not report.get("summary", {}).get("dead_known", True):
        return False
    return any(marks_dead(m, report.get("metric_info")) for m in lay["metrics"])


def _one_side(name: str, lay: dict, report: dict, status: str) -> LayerComparison:
    dead = list(lay["dead"]) if _dead_known(lay, report) else None
    units = int(lay["units"])
    where = "base" if status == "base_only" else "new"
    return LayerComparison(name=name, status=status, type=lay["type"], final=bool(lay.get("final")),
                           units_base=units if status == "base_only" else None,
                           units_new=units if status == "new_only" else None,
                           dead_base=dead if status == "base_only" else None,
                           dead_new=dead if status == "new_only" else None,
                           note=f"only in {where}")


def _both_sides(name: str, b: dict, n: dict, base: dict, new: dict, top: int) -> LayerComparison:
    known = _dead_known(b, base) and _dead_known(n, new)
    lc = LayerComparison(name=name, status="compared", type=n["type"], final=bool(b.get("final") or n.get("final")),
                         units_base=int(b["units"]), units_new=int(n["units"]),
                         dead_base=list(b["dead"]) if _dead_known(b, base) else None,
                         dead_new=list(n["dead"]) if _dead_known(n, new) else None)
    if b["type"] != n["type"]:
        lc.note = f"type changed: {b['type']} in base, {n['type']} in new"
    if lc.units_base != lc.units_new:
        lc.status = "units_differ"
        lc.note = (f"units differ: {lc.units_base} in base, {lc.units_new} in new (pruned or resized?): unit "
                   "indices do not correspond, so died, revived and drifts are not computed")
        return lc
    if known:
        db, dn = set(b["dead"]), set(n["dead"])
        lc.died, lc.revived = sorted(dn - db), sorted(db - dn)
    lc.became_nonfinite = sorted(set(n.get("nonfinite") or []) - set(b.get("nonfinite") or []))
    lc.drifts = _drifts(b, n, top)
    return lc


def compare_reports(base: dict, new: dict, *, top: int = DEFAULT_TOP) -> list[LayerComparison]:
    """Layer by layer (matched by name; base's order, then the layers only ``new`` has)."""
    new_by = {lay["name"]: lay for lay in new["layers"]}
    base_names = {lay["name"] for lay in base["layers"]}
    out = []
    for b in base["layers"]:
        n = new_by.get(b["name"])
        out.append(_one_side(b["name"], b, base, "base_only") if n is None
                   else _both_sides(b["name"], b, n, base, new, top))
    out += [_one_side(n["name"], n, new, "new_only") for n in new["layers"] if n["name"] not in base_names]
    return out


# --------------------------------------------------------------------------------------------
# inputs


def _is_report_path(x: Any) -> bool:
    return isinstance(x, (str, Path)) and str(x).lower().endswith(".json")


def _as_report(x: Any, which: str) -> dict | None:
    """A report dict, or None when ``x`` is a model to audit."""
    if isinstance(x, AuditReport):
        return x.to_dict()
    if isinstance(x, dict):
        if x.get("schema") != REPORT_SCHEMA_ID:
            found = x.get("schema")
            raise UsageError(f"{which} is not a fitcli report (schema {REPORT_SCHEMA_ID!r} expected"
                             + (f", found {found!r})" if found else ")"))
        _validate(x, which)
        return x
    if _is_report_path(x):
        from fitcli.report import read

        return read(x)
    return None


def _validate(report: dict, which: str) -> None:
    from fitcli.report import validate

    try:
        validate(report)
    except ImportError:  # jsonschema is a dev extra; _check looks at what compare reads
        pass
    except Exception as e:
        raise UsageError(f"{which} does not follow the report schema: {str(e).splitlines()[0][:200]}") from e


def _check(report: dict, which: str) -> None:
    if report.get("command") == "blocks":
        raise UsageError(f"{which} is a blocks report (residual blocks as units): it has no units to compare; "
                         "compare reports of score or ablate")
    layers = report.get("layers")
    if not isinstance(layers, list) or not all(isinstance(x, dict) and {"name", "units", "metrics", "dead"} <= set(x)
                                               for x in layers):
        raise UsageError(f"{which}: the report's layers lack name, units, metrics or dead")


def _audit_models(sides: dict[str, Any], data: Any, s: Any, loss: Any, arch: Any, arch_kwargs: Any,
                  trust_checkpoint: bool, progress: Any) -> dict[str, dict]:
    from fitcli import api

    loaded = {}
    for which, x in sides.items():  # load both before auditing either: a bad checkpoint fails fast
        lm = api.load(x, arch=arch if isinstance(x, (str, Path)) else None, arch_kwargs=arch_kwargs,
                      trust_checkpoint=trust_checkpoint)
        if not lm.runnable:
            raise UsageError(f"{lm.path}: comparing dead units needs a runnable model; give its architecture ({{arch}})"
                             + (" (" + "; ".join(lm.notes) + ")" if lm.notes else ""), setting="arch")
        loaded[which] = lm
    ds = api.load_data(data, batch_size=s.batch_size, max_batches=s.max_batches, seed=s.seed)
    return {which: api.audit(lm, ds, loss=loss, settings=s, progress=progress).to_dict()
            for which, lm in loaded.items()}


def _notes(base: dict, new: dict, data_unused: bool) -> list[str]:
    notes = []
    if data_unused:
        notes.append("data was not used: both sides are reports")
    tb, tn = (base.get("settings") or {}).get("tau"), (new.get("settings") or {}).get("tau")
    if tb != tn:
        notes.append(f"the sides were audited with different tau ({tb} in base, {tn} in new): dead units are "
                     "decided differently")
    db, dn = (base.get("data") or {}).get("spec"), (new.get("data") or {}).get("spec")
    if db != dn:
        notes.append(f"the sides were audited on different data ({db} in base, {dn} in new)")
    mb, mn = set((base.get("settings") or {}).get("metrics", [])), set((new.get("settings") or {}).get("metrics", []))
    if mb != mn:
        notes.append("metrics on one side only (no drift for them): " + ", ".join(sorted(mb ^ mn)))
    hb, hn = (base.get("model") or {}).get("sha256"), (new.get("model") or {}).get("sha256")
    if hb and hb == hn:
        notes.append("base and new are the same checkpoint (equal sha256)")
    return notes


def _check_threshold(max_new_dead: Any) -> None:
    if max_new_dead is None:
        return
    if isinstance(max_new_dead, bool) or not isinstance(max_new_dead, (int, float)) or not math.isfinite(max_new_dead):
        raise UsageError(f"{{max_new_dead}} must be a finite number, got {max_new_dead!r}", setting="max_new_dead")
    if max_new_dead < 0:
        raise UsageError(f"{{max_new_dead}} must be ≥ 0, got {max_new_dead!r}", setting="max_new_dead")


def gate(cmp: Comparison, max_new_dead: float) -> CompareGate:
    """Fail when more than ``max_new_dead`` percent of the compared units died; never pass on
    nothing. Stores the verdict on ``cmp`` and returns it."""
    _check_threshold(max_new_dead)
    s = cmp.summary
    failures = []
    if not s["units_compared"]:
        failures.append("no unit could be compared for deaths (dead units unknown on a side, or no layer on both "
                        "sides with the same units): a gate cannot pass on nothing")
    elif s["died_percent"] > max_new_dead:
        failures.append(f"{s['died']}/{s['units_compared']} compared units died ({s['died_percent']:.2f}%) "
                        f"> max_new_dead {max_new_dead:g}%")
    cmp.gate = CompareGate(passed=not failures, failures=failures, max_new_dead=float(max_new_dead),
                           died=s["died"], units=s["units_compared"])
    return cmp.gate


def compare(base: Any, new: Any, *, data: Any = None, loss: Any = None, metrics: list[str] | None = None,
            layers: list[str] | None = None, arch: Any = None, arch_kwargs: dict[str, Any] | None = None,
            trust_checkpoint: bool = False, settings: Any = None, progress: Any = None, top: int = DEFAULT_TOP,
            max_new_dead: float | None = None, device: str | None = None, seed: int | None = None,
            tau: float | None = None, batch_size: int | None = None, max_batches: int | None = None,
            dtype: str | None = None, chunk_size: int | None = None) -> Comparison:
    """Compare two audits; see the module docstring.

    Args:
        base, new: each a model (as for ``fitcli.load``), an ``AuditReport``, a report dict or a
            saved report file; a report is taken as it was saved.
        data, loss, metrics, layers, arch, arch_kwargs, trust_checkpoint, settings, progress: how
            models are audited, as for ``fitcli.audit`` (the same data for both sides).
        top: largest drifts kept per layer and metric.
        max_new_dead: gate: most units dead in ``new`` and not in ``base``, percent.
        device, seed, tau, batch_size, max_batches, dtype, chunk_size: the ``fitcli.Settings``
            fields of these names.

    Returns:
        A ``Comparison``: per layer, the units that died or revived and the largest drifts.

    Examples:
        >>> cmp = fitcli.compare("before.json", "after.json")
        >>> cmp.died                          # {"fc1": [4], ...}
    """
    from fitcli.settings import Settings

    options = {"device": device, "seed": seed, "tau": tau, "batch_size": batch_size, "max_batches": max_batches,
               "dtype": dtype, "chunk_size": chunk_size}

    _check_threshold(max_new_dead)
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise UsageError(f"{{top}} must be an integer ≥ 0, got {top!r}", setting="top")
    s = Settings.make(settings, **dict(options, metrics=metrics, layers=layers)).check()
    reports = {"base": _as_report(base, "base"), "new": _as_report(new, "new")}
    models = {which: x for which, x in (("base", base), ("new", new)) if reports[which] is None}
    if models:
        if data is None:
            raise UsageError("comparing models needs data: give {data} to audit them with (the same for both sides)",
                             setting="data")
        reports.update(_audit_models(models, data, s, loss, arch, arch_kwargs, trust_checkpoint, progress))
    for which in ("base", "new"):
        _check(reports[which], which)
    sides = {which: Side("model" if which in models else "report",
                         str(x) if isinstance(x, (str, Path)) else None, reports[which])
             for which, x in (("base", base), ("new", new))}
    cmp = Comparison(base=sides["base"], new=sides["new"], layers=compare_reports(reports["base"], reports["new"], top=top),
                     notes=_notes(reports["base"], reports["new"], data is not None and not models), top=top,
                     created=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    for lay in cmp.layers:
        if lay.note and lay.status != "compared":
            cmp.notes.append(f"{lay.name}: {lay.note}")
    if max_new_dead is not None:
        gate(cmp, max_new_dead)
    return cmp


__all__ = ["compare", "compare_reports", "gate", "Comparison", "CompareGate", "LayerComparison", "Drift",
           "Side", "SCHEMA_ID", "DRIFT_MEASURE"]
