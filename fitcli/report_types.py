"""The typed sections of a report (schema ``fitcli.report/1``): each is a dataclass built once,
with ``from_dict`` (a saved report, old ones included) and ``to_dict`` (the JSON, field order
included), so that ``from_dict(d).to_dict() == d`` for every report fitcli writes.

A section is read as a dataclass (``report.summary.dead``) or, for code written against the JSON,
by its JSON key (``report.summary["dead"]``). Optional fields that are None are left out of the
JSON (an old report without them keeps its shape); fields a newer or older fitcli wrote that this
one does not know are kept in ``extra`` and written back after the known ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


class Section:
    """Read access by JSON key, as in ``to_dict()``: ``section["dead"]``, ``section.get("dead_known")``."""

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - every section defines it
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __contains__(self, key: str) -> bool:
        return key in self.to_dict()

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)


def unknown(d: dict[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    """The fields of ``d`` a section does not type (kept as they are, written back after the known ones)."""
    return {k: v for k, v in d.items() if k not in known}


def present(pairs: list[tuple[str, Any]], always: tuple[str, ...] = ()) -> dict[str, Any]:
    """A dict of ``pairs`` in order, without the ones whose value is None (unless in ``always``)."""
    return {k: v for k, v in pairs if v is not None or k in always}


def floats(t: torch.Tensor) -> list[float | None]:
    """A tensor as JSON numbers: null where not finite."""
    return [float(v) if math.isfinite(v) else None for v in t.tolist()]


F32_TINY, F32_MAX = 2.0 ** -126, (2 - 2.0 ** -23) * 2.0 ** 127  # float32's normal range


def significant_digits(x: float) -> int:
    """Significant digits of ``repr(x)``, the shortest decimal that reads back as ``x``."""
    return len(repr(x).lstrip("-").split("e")[0].replace(".", "").strip("0"))


def unit_floats(t: torch.Tensor) -> list[float | None]:
    """Per-unit values as a report writes them: null where not finite; a value of at most 9
    significant digits (0.5, -0.166015625), 0 or one outside float32's normal range
    (0 < |v| < 2**-126, |v| > 3.4e38) exactly; any other value as the shortest decimal that reads
    back as the same float32 as the value rounded to float32, so within 2**-23 (1.2e-7) of it,
    relatively. A value read back is written the same again."""
    exact = t.detach().to("cpu", torch.float64).flatten()
    xs = exact.tolist()
    out: list[float | None] = [x if math.isfinite(x) else None for x in xs]
    todo = [i for i, x in enumerate(xs) if F32_TINY <= abs(x) <= F32_MAX and significant_digits(x) > 9]
    if not todo:
        return out
    f32 = exact[todo].to(torch.float32)
    near = f32.to(torch.float64).tolist()  # the float32 values, exactly
    for i, v in zip(todo, near, strict=True):
        out[i] = v  # when no decimal of at most 9 digits reads back (never seen): the float32 itself
    left = list(range(len(todo)))
    for digits in (6, 7, 8, 9):  # when a shorter decimal reads back, the 6-digit one is it
        tried = [float(f"{near[j]:.{digits}g}") for j in left]
        same = (torch.tensor(tried, dtype=torch.float64).to(torch.float32) == f32[left]).tolist()
        for j, y, ok in zip(left, tried, same, strict=True):
            if ok:
                out[todo[j]] = y
        left = [j for j, ok in zip(left, same, strict=True) if not ok]
        if not left:
            break
    return out


def tensor(values: list[float | None]) -> torch.Tensor:
    """JSON numbers as a float64 tensor: NaN where null."""
    return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# summary, coverage


@dataclass
class Summary(Section):
    """Dead units over the units whose deadness is known (non-final layers with a dead-marking metric)."""

    layers: int
    units: int
    dead: int
    dead_fraction: float
    dead_known: bool | None = None  # whether any metric marks dead units (absent in old reports)
    nonfinite_loss_batches: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # per unit kind (when more than one is audited): {kind: {layers, units, dead, dead_fraction}}
    kinds: dict[str, dict[str, Any]] | None = None

    FIELDS = ("layers", "units", "dead", "dead_fraction", "dead_known", "nonfinite_loss_batches", "kinds")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Summary:
        return cls(d["layers"], d["units"], d["dead"], d["dead_fraction"], d.get("dead_known"),
                   d.get("nonfinite_loss_batches"), unknown(d, cls.FIELDS), d.get("kinds"))

    def to_dict(self) -> dict[str, Any]:
        return {**present([(k, getattr(self, k)) for k in self.FIELDS], always=self.FIELDS[:4]), **self.extra}


@dataclass
class NotAudited(Section):
    """A parameterised module the audit did not cover, and why."""

    name: str
    reason: str
    type: str | None = None
    parameters: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    FIELDS = ("name", "type", "parameters", "reason")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NotAudited:
        return cls(d["name"], d["reason"], d.get("type"), d.get("parameters"), unknown(d, cls.FIELDS))

    def to_dict(self) -> dict[str, Any]:
        return {**present([(k, getattr(self, k)) for k in self.FIELDS], always=("name", "reason")), **self.extra}


@dataclass
class Coverage(Section):
    """The audited units and the share of the model's parameters they own; an empty coverage (every
    field None) is a report that recorded none."""

    units: int | None = None
    layers: int | None = None
    parameters: int | None = None
    model_parameters: int | None = None
    fraction: float | None = None
    not_audited: list[NotAudited] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    FIELDS = ("units", "layers", "parameters", "model_parameters", "fraction", "not_audited")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Coverage:
        d = d or {}
        missing = d.get("not_audited")
        return cls(d.get("units"), d.get("layers"), d.get("parameters"), d.get("model_parameters"), d.get("fraction"),
                   None if missing is None else [NotAudited.from_dict(x) for x in missing], unknown(d, cls.FIELDS))

    def to_dict(self) -> dict[str, Any]:
        na = None if self.not_audited is None else [x.to_dict() for x in self.not_audited]
        return {**present([(k, getattr(self, k)) for k in self.FIELDS[:5]] + [("not_audited", na)]), **self.extra}


# --------------------------------------------------------------------------------------------
# rank agreement with exact ablation: score --validate, and the blocks report


@dataclass
class Correlation(Section):
    """Rank agreement of a metric with exact |ablation| (the oracle) over ``units`` units."""

    spearman: float | None
    kendall: float | None
    bottom10_overlap: float | None = None
    units: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    FIELDS = ("spearman", "kendall", "bottom10_overlap", "units")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Correlation:
        return cls(d.get("spearman"), d.get("kendall"), d.get("bottom10_overlap"), d.get("units"),
                   unknown(d, cls.FIELDS))

    def to_dict(self) -> dict[str, Any]:
        return {**present([(k, getattr(self, k)) for k in self.FIELDS], always=self.FIELDS[:3]), **self.extra}


@dataclass
class RandomStats(Section):
    """What a random order scores against the oracle: mean Spearman and bottom-10% overlap over ``draws`` orders."""

    spearman: float | None
    bottom10_overlap: float | None
    units: int
    draws: int
    extra: dict[str, Any] = field(default_factory=dict)

    FIELDS = ("spearman", "bottom10_overlap", "units", "draws")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> RandomStats | None:
        if d is None:
            return None
        return cls(d.get("spearman"), d.get("bottom10_overlap"), d["units"], d["draws"], unknown(d, cls.FIELDS))

    def to_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in self.FIELDS}, **self.extra}


@dataclass
class RandomBaseline(Section):
    """The random order's scores per layer and across layers."""

    layers: dict[str, RandomStats]
    across_layers: RandomStats | None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> RandomBaseline | None:
        if d is None:
            return None
        return cls({k: RandomStats.from_dict(v) for k, v in d.get("layers", {}).items()},
                   RandomStats.from_dict(d.get("across_layers")))

    def to_dict(self) -> dict[str, Any]:
        return {"layers": {k: v.to_dict() for k, v in self.layers.items()},
                "across_layers": None if self.across_layers is None else self.across_layers.to_dict()}


@dataclass
class LayerValidation(Section):
    """One layer's validation: each metric's agreement, the best, the units ablated and their signed Δloss."""

    metrics: dict[str, Correlation]
    best: str | None
    units: list[int] | None = None
    ablation: list[float | None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    FIELDS = ("metrics", "best", "units", "ablation")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerValidation:
        return cls({k: Correlation.from_dict(v) for k, v in d.get("metrics", {}).items()}, d.get("best"),
                   d.get("units"), d.get("ablation"), unknown(d, cls.FIELDS))

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": {k: v.to_dict() for k, v in self.metrics.items()}, "best": self.best,
                **present([("units", self.units), ("ablation", self.ablation)]), **self.extra}


@dataclass
class KindValidation(Section):
    """The validation of one unit kind (heads, MLP channels, ...): each metric's agreement with exact
    ablation over the kind's layers (values normalised per layer), the best, and a random order's.
    For residual blocks (kind ``blocks``): Block Influence and angular distance against each block's
    exact removal, the blocks in ``layers`` and their loss changes in ``ablation``."""

    layers: list[str]
    metrics: dict[str, Correlation]
    best: str | None
    random: RandomStats | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # blocks: each block's exact loss change with it removed ({block: Δloss}; ``layers`` are the blocks)
    ablation: dict[str, float | None] | None = None

    FIELDS = ("layers", "metrics", "best", "random", "ablation")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KindValidation:
        return cls(list(d.get("layers", [])), {k: Correlation.from_dict(v) for k, v in d.get("metrics", {}).items()},
                   d.get("best"), RandomStats.from_dict(d.get("random")), unknown(d, cls.FIELDS), d.get("ablation"))

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "metrics": {k: v.to_dict() for k, v in self.metrics.items()},
                "best": self.best, **present([("random", None if self.random is None else self.random.to_dict()),
                                              ("ablation", self.ablation)]),
                **self.extra}


@dataclass
class Validation(Section):
    """``score --validate``: how well each metric ranks units like exact ablation does, for this model.
    ``kinds``: the same per unit kind (only when a transformer's heads are validated beside another kind)."""

    layers: dict[str, LayerValidation]
    across_layers: dict[str, Correlation]
    best: str | None
    random: RandomBaseline | None = None
    oracle: str | None = None
    seed: int | None = None
    recommendation: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    kinds: dict[str, KindValidation] | None = None

    FIELDS = ("layers", "across_layers", "best", "random", "oracle", "seed", "recommendation", "kinds")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Validation | None:
        if d is None:
            return None
        kinds = d.get("kinds")
        return cls({k: LayerValidation.from_dict(v) for k, v in d.get("layers", {}).items()},
                   {k: Correlation.from_dict(v) for k, v in d.get("across_layers", {}).items()}, d.get("best"),
                   RandomBaseline.from_dict(d.get("random")), d.get("oracle"), d.get("seed"), d.get("recommendation"),
                   unknown(d, cls.FIELDS),
                   None if kinds is None else {k: KindValidation.from_dict(v) for k, v in kinds.items()})

    def to_dict(self) -> dict[str, Any]:
        return {"layers": {k: v.to_dict() for k, v in self.layers.items()},
                "across_layers": {k: v.to_dict() for k, v in self.across_layers.items()}, "best": self.best,
                **present([("random", None if self.random is None else self.random.to_dict()), ("oracle", self.oracle),
                           ("seed", self.seed), ("recommendation", self.recommendation),
                           ("kinds", None if self.kinds is None else {k: v.to_dict() for k, v in self.kinds.items()})]),
                **self.extra}


# --------------------------------------------------------------------------------------------
# residual blocks as units


@dataclass
class BlockRow(Section):
    """One residual block: Block Influence, angular distance, and the exact mean loss (and accuracy)
    change with the block replaced by the identity."""

    name: str
    block_influence: float | None
    angular_distance: float | None
    ablation: float | None  # None in a score report (Block Influence and angular distance only)
    ablation_accuracy: float | None = None  # class targets only
    extra: dict[str, Any] = field(default_factory=dict)

    FIELDS = ("name", "block_influence", "angular_distance", "ablation", "ablation_accuracy")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlockRow:
        return cls(d["name"], d.get("block_influence"), d.get("angular_distance"), d.get("ablation"),
                   d.get("ablation_accuracy"), unknown(d, cls.FIELDS))

    def to_dict(self) -> dict[str, Any]:
        return {**present([(k, getattr(self, k)) for k in self.FIELDS], always=self.FIELDS[:3]), **self.extra}


@dataclass
class GreedyStep(Section):
    """One step of the layer-removal curve: the block removed (the one whose removal changed the loss
    least), the loss with every block removed so far, and what Block Influence would have removed."""

    step: int
    removed: str
    loss: float
    delta_loss: float
    accuracy: float | None
    block_influence_pick: str | None
    block_influence: float | None
    extra: dict[str, Any] = field(default_factory=dict)

    FIELDS = ("step", "removed", "loss", "delta_loss", "accuracy", "block_influence_pick", "block_influence")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GreedyStep:
        return cls(d["step"], d["removed"], d["loss"], d["delta_loss"], d.get("accuracy"),
                   d.get("block_influence_pick"), d.get("block_influence"), unknown(d, cls.FIELDS))

    def to_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in self.FIELDS}, **self.extra}


@dataclass
class BlockValidation(Section):
    """How well Block Influence and angular distance rank blocks like exact removal, beside a random order."""

    oracle: str
    metrics: dict[str, Correlation]
    random: RandomStats | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    FIELDS = ("oracle", "metrics", "random")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> BlockValidation | None:
        if d is None:
            return None
        return cls(d.get("oracle", ""), {k: Correlation.from_dict(v) for k, v in d.get("metrics", {}).items()},
                   RandomStats.from_dict(d.get("random")), unknown(d, cls.FIELDS))

    def to_dict(self) -> dict[str, Any]:
        return {"oracle": self.oracle, "metrics": {k: v.to_dict() for k, v in self.metrics.items()},
                **present([("random", None if self.random is None else self.random.to_dict())]), **self.extra}


# --------------------------------------------------------------------------------------------
# layers, gate


LAYER_FIELDS = ("name", "type", "units", "activation_point", "activation_point_kind", "final", "metrics",
                "aggregate", "dead", "dead_fraction", "nonfinite", "removable", "activation_chain", "members", "kind")


@dataclass(eq=False)
class LayerReport(Section):
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
    kind: str | None = None  # the unit kind (heads, mlp, hidden, rows) when an audit is by kinds

    def __repr__(self) -> str:  # one line: the tensors are in .metrics
        return (f"LayerReport({self.name!r}, {self.type}, {self.units} units, {len(self.dead)} dead, "
                f"metrics: {', '.join(self.metrics) or 'none'})")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerReport:
        return cls(name=d["name"], type=d["type"], units=int(d["units"]), activation_point=d["activation_point"],
                   metrics={k: tensor(v) for k, v in d["metrics"].items()}, aggregate=dict(d["aggregate"]),
                   dead=list(d["dead"]), dead_fraction=float(d["dead_fraction"]), nonfinite=list(d["nonfinite"]),
                   final=bool(d.get("final", False)), activation_point_kind=d.get("activation_point_kind"),
                   activation_chain=d.get("activation_chain"), members=d.get("members"),
                   removable=d.get("removable"), extra=unknown(d, LAYER_FIELDS), kind=d.get("kind"))

    def to_dict(self) -> dict[str, Any]:
        """The layer's JSON: the per-unit values as written (``unit_floats``); ``metrics`` holds them exactly."""
        d: dict[str, Any] = {"name": self.name, "type": self.type, "units": self.units,
                             "activation_point": self.activation_point}
        d.update(present([("kind", self.kind)]))
        d.update(present([("activation_point_kind", self.activation_point_kind),
                          ("activation_chain", self.activation_chain)]))
        d.update({"final": self.final, "metrics": {k: unit_floats(v) for k, v in self.metrics.items()},
                  "aggregate": self.aggregate, "nonfinite": self.nonfinite, "dead": self.dead,
                  "dead_fraction": self.dead_fraction})
        d.update(present([("removable", self.removable), ("members", self.members)]))
        d.update(self.extra)
        return d


@dataclass
class GateResult(Section):
    """A gate's verdict: ``passed``, and one line per threshold exceeded."""

    passed: bool
    failures: list[str]
    max_dead: float | None = None
    max_dead_layer: float | None = None
    min_coverage: float | None = None

    def __bool__(self) -> bool:
        return self.passed

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> GateResult | None:
        if d is None:
            return None
        return cls(bool(d["passed"]), list(d.get("failures", [])), d.get("max_dead"), d.get("max_dead_layer"),
                   d.get("min_coverage"))

    def to_dict(self) -> dict[str, Any]:
        d = {"max_dead": self.max_dead, "max_dead_layer": self.max_dead_layer, "passed": self.passed,
             "failures": list(self.failures)}
        if self.min_coverage is not None:
            d["min_coverage"] = self.min_coverage
        return d


__all__ = ["Section", "Summary", "NotAudited", "Coverage", "Correlation", "RandomStats", "RandomBaseline",
           "LayerValidation", "Validation", "BlockRow", "GreedyStep", "BlockValidation", "LayerReport", "GateResult",
           "LAYER_FIELDS", "floats", "unit_floats", "tensor"]
