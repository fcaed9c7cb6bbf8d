"""Metric base: mergeable per-unit state (after torchmetrics' ``Metric``).

A metric declares tensor states with a merge rule (``sum``, ``max`` or ``min`` only: associative
and commutative, so batches, shards and ranks combine in any order), updates them per batch from a
``UnitBatch``, and ``compute()`` gives one float per unit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fitcli.metrics.moments import (  # noqa: F401  (Scratch, scratch_like: re-exported)
    SHORT_POSITIONS,
    Scratch,
    flat_moments,
    position_moments,
    scratch_like,
    short_moments,
)

REDUCTIONS = ("sum", "max", "min")

# what a metric may need; the engine only provides what the run can give
NEEDS = {
    "weights": "the layer's weights",
    "graph": "the layers that consume each unit (from the traced graph)",
    "baseline": "a second checkpoint (the baseline)",
    "activations": "a runnable model and data",
    "gradients": "a loss: targets in the data, or a loss that needs none",
    "labels": "integer class targets in the data",
    "ablation": "an exact ablation pass and a loss (opt-in: ask for the ablation metric)",
    "attention": "attention probabilities: heads of nn.MultiheadAttention, or of Hugging Face attention in eager mode",
}


@dataclass
class UnitBatch:
    """Everything one batch offers one layer. Tensors are float64 on the audit device.

    ``act``/``grad``: ``[batch, units, positions]`` at the activation point; ``grad`` is the
    gradient of each sample's own loss. ``weight`` is given to metrics that need "weights";
    ``weight_grad`` to metrics that need "weights" and "gradients": the gradient of the batch-mean loss w.r.t.
    the weight (``[units, ...]``). ``correct``: ``[batch]`` bool, prediction == label.
    """

    weight: torch.Tensor | None  # None for a metric that does not need "weights"
    act: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    weight_grad: torch.Tensor | None = None
    baseline_weight: torch.Tensor | None = None
    consumer_weights: list[torch.Tensor] | None = None
    correct: torch.Tensor | None = None
    pass_index: int = 0
    mask: torch.Tensor | None = None  # [batch, positions] bool: real tokens; padding is not observed
    attention: torch.Tensor | None = None  # head layers: probabilities [batch, heads, queries, keys]
    query_mask: torch.Tensor | None = None  # with attention: [batch, queries] bool, the real query positions
    scratch: Scratch | None = field(default=None, repr=False)  # reusable temporaries (engine)
    # Σh² in one read of the activation instead of from centred values (the tracker, whose records
    # keep 8 significant digits): ≲ 3e-8 relative on act_var, one pass fewer over each activation
    quick_moments: bool = False
    relu_output: bool = False  # ``act`` is a ReLU's output (autograd says so): ≥ 0 wherever its sums are finite
    # the model's tensor ``act`` views and its version counter at the tap (``feeder.overwritten``)
    source: tuple[torch.Tensor, int] | None = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    # Per-batch statistics shared by several metrics, computed once per batch and layer.
    # Elementwise work stays in the activation's dtype; every reduction accumulates in float64.
    def _get(self, key: str, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def observations(self) -> int:
        """Observations per unit in this batch: samples x positions (real positions only)."""
        assert self.act is not None
        if self.mask is not None:
            return int(self.mask.sum())
        return int(self.act.shape[0] * self.act.shape[2])

    def observed(self) -> torch.Tensor:
        """The activation at its observations only: ``act`` itself, or with a padding mask the real
        positions packed as ``[observations, units, 1]``."""
        if self.mask is None:
            return self.act
        return self._get("observed", lambda: self.act.transpose(1, 2)[self.mask].unsqueeze(2))

    def _masked(self, t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``t`` ([batch, units, positions]) with padding positions set to ``fill``."""
        return t.masked_fill(~self.mask[:, None, :], fill)

    def _masked_moments(self) -> dict[str, torch.Tensor]:
        """The moments with a padding mask: plain float64 sums over real positions, one sample at a
        time (a float64 copy of one sample's real positions, never of the whole batch: a language
        model's logits are hundreds of MB)."""
        b, u = self.act.shape[:2]
        out = {k: torch.zeros(u, dtype=torch.float64, device=self.act.device) for k in ("abs", "sumsq", "zeros")}
        sum_s = torch.zeros(b, u, dtype=torch.float64, device=self.act.device)
        for i in range(b):
            x = self.act[i][:, self.mask[i]].to(torch.float64)
            sum_s[i] = x.sum(dim=1)
            out["zeros"] += (x == 0).sum(dim=1)
            out["sumsq"] += x.square().sum(dim=1)
            out["abs"] += x.abs_().sum(dim=1)
        return {"sum_s": sum_s, "sum": sum_s.sum(0), **out}

    def sample_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's min and max over positions, per unit, in the activation's dtype. ``[batch, units]`` each"""
        def fn():
            a = self.act
            if self.mask is not None:  # a sample without real positions gives (inf, -inf): no range
                lo = a.new_full(a.shape[:2], float("inf"))
                hi = a.new_full(a.shape[:2], float("-inf"))
                for i in range(a.shape[0]):  # one sample's real positions at a time: no copy of the batch
                    if self.mask[i].any():
                        x = a[i][:, self.mask[i]]
                        lo[i], hi[i] = x.amin(dim=1), x.amax(dim=1)
                return lo, hi
            if a.shape[2] == 1:
                return a[:, :, 0], a[:, :, 0]
            return a.amin(dim=2), a.amax(dim=2)  # two plain reductions beat one aminmax on CPU
        return self._get("range", fn)

    def _moments(self) -> dict[str, torch.Tensor]:
        """One sweep over the activations for every moment-type statistic, per unit, float64.

        Per sample, positions are reduced in the activation's dtype (short reductions); the
        per-sample results are converted to float64 once and summed over samples. Squares come
        from values centred on each sample's own mean, so float32 loses nothing to cancellation.
        Passes over the activation are few and temporaries reused: a non-negative activation
        (after a ReLU: known from its minimum) has Σ|h| = Σh, and when nothing is zero no zero
        count is taken.
        """
        def fn():
            if self.mask is not None:
                return self._masked_moments()
            a = self.act
            if a.shape[2] == 1:
                out = flat_moments(a, self.scratch, self._low)
            elif self.quick_moments and a.shape[2] <= SHORT_POSITIONS:
                out = short_moments(a, self.scratch, self._low) or \
                    position_moments(a, self.scratch, self._low)
            else:
                out = position_moments(a, self.scratch, self._low, self.quick_moments)
            if "sum" not in out:
                out["sum"] = out["sum_s"].sum(0)
            return out
        return self._get("moments", fn)

    def _low(self, hint: torch.Tensor | None = None) -> float:
        """The activation's smallest value (NaN with a NaN): from the sample ranges when a metric
        already asked for them, else one read. ``hint``: sums of its values (per sample or per unit); one below 0 settles it."""
        rng = self._cache.get("range")
        if rng is not None and rng[0].numel():
            return float(rng[0].min())
        if self.relu_output and hint is not None and bool(torch.isfinite(hint).all()):
            return 0.0  # a ReLU's output with no NaN (a NaN would make its sample's sum NaN): no read needed
        if hint is not None and hint.numel() and bool((hint < 0).any()):
            return -1.0
        return float(self.act.amin()) if self.act.numel() else 0.0

    def abs_sum(self) -> torch.Tensor:
        """Σ |h| per unit over the batch's observations. ``[units]``"""
        return self._moments()["abs"]

    def value_sum(self) -> torch.Tensor:
        return self._moments()["sum"]

    def square_sum(self) -> torch.Tensor:
        return self._moments()["sumsq"]

    def zero_count(self) -> torch.Tensor:
        return self._moments()["zeros"]

    def hg(self) -> torch.Tensor:
        """Σ_p h(x,p)·g(x,p) per sample and unit. ``[batch, units]``"""
        assert self.has_grad()
        return self._get("hg", lambda: self._hg_per_sample().to(torch.float64, copy=True))

    def fold_grad(self, g: torch.Tensor, scale: float = 1.0) -> None:
        """Take the gradient ``g * scale`` only as Σ_p h·g per sample (``hg``), added to what an
        earlier backward through the same forward gave, and let ``g`` go: the tracker, for a layer
        whose metrics read the gradient only through ``hg`` (``"hg" in shares``), while ``g`` is
        in cache and before the next layer's gradient exists."""
        per = self._hg_per_sample(g, scale).to(torch.float64, copy=True)
        old = self._cache.get("hg")
        self._cache["hg"] = per if old is None else old + per
        self._cache.pop("hg_sums", None)

    def _hg_per_sample(self, g: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        """Σ_p h·g per sample and unit in the activations' dtype; may be a view of the scratch
        pool (copy it before keeping it). A gradient given with a scale is multiplied in after
        the sum over positions (one multiply per sample and unit, not per observation).
        ``g``: this gradient instead of the batch's own."""
        a = self.act
        if g is None:
            g, scale = self.grad_parts()
        if self.mask is not None:
            per = self._masked(a * g).sum(dim=2)
        elif a.shape != g.shape or a.dtype != g.dtype:
            per = (a * g).sum(dim=2)
        else:
            prod = torch.mul(a, g, out=scratch_like(self.scratch, "f", a))
            per = prod[:, :, 0] if a.shape[2] == 1 else prod.sum(dim=2)
        return per if scale == 1.0 else per * scale

    # The gradient: ``grad`` (a property, below) is the per-sample-loss gradient. A feeder that has
    # it as g·scale (the tracker: the caller's loss is a batch mean) gives both with ``set_grad``;
    # the shared statistics fold the scale into their per-sample sums and ``grad`` multiplies only
    # when a metric reads it.
    def set_grad(self, g: torch.Tensor | None, scale: float = 1.0) -> None:
        """The gradient is ``g * scale`` (``g`` is kept as it is until ``grad`` is read)."""
        self.grad = g if scale == 1.0 or g is None else None
        if scale != 1.0 and g is not None:
            self.__dict__["_grad_raw"] = (g, float(scale))

    def grad_parts(self) -> tuple[torch.Tensor | None, float]:
        """(g, scale) with ``grad == g * scale``, without multiplying."""
        g = self.__dict__.get("_grad")
        if g is not None:
            return g, 1.0
        return self.__dict__.get("_grad_raw") or (None, 1.0)

    def has_grad(self) -> bool:
        return self.grad_parts()[0] is not None or "hg" in self._cache

    def hbar(self) -> torch.Tensor:
        """Each sample's mean activation over positions. ``[batch, units]``"""
        def fn():
            p = self.act.shape[2]
            if self.mask is not None:
                return self._moments()["sum_s"] / self.mask.sum(dim=1, keepdim=True).clamp_min(1).to(torch.float64)
            if p == 1:
                return self.act[:, :, 0].to(torch.float64)
            sums = self._moments().get("sum_s")  # the short-position moments take none
            return (sums if sums is not None else self.act.sum(dim=2).to(torch.float64)) / p
        return self._get("hbar", fn)

    def hbar_sums(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ_x w_x·h̄_x, Σ_x h̄_x) per unit, float64, for sample weights ``w`` ([batch],
        float64). For Linear layers the activation is widened into the scratch pool, not kept."""
        p = self.act.shape[2]
        if p > 1 or "hbar" in self._cache or self.scratch is None or self.mask is not None:
            hb = self.hbar()
            return w @ hb, hb.sum(dim=0)
        v = self.act[:, :, 0]
        x = scratch_like(self.scratch, "d", v, torch.float64).copy_(v)
        return w @ x, x.sum(dim=0)

    def weight_grad_norm(self) -> torch.Tensor:
        """‖weight_grad[i, ...]‖₂ per unit, float64 (shared by grad_norm and composite). A feeder
        may give the norms alone (``set_weight_grad_norm``) when every metric of the layer reads
        the weight gradient only through them (``"weight_grad_norm" in shares``)."""
        assert self.has_weight_grad()
        return self._get("weight_grad_norm", lambda: rownorm(self.weight_grad))

    def set_weight_grad_norm(self, norms: torch.Tensor) -> None:
        self._cache["weight_grad_norm"] = norms.to(torch.float64)

    def has_weight_grad(self) -> bool:
        return self.weight_grad is not None or "weight_grad_norm" in self._cache

    def hg_sums(self) -> dict[str, torch.Tensor]:
        """Σ_x hg and Σ_x |hg| per unit (``hg`` as in ``hg()``), float64, without keeping a
        float64 copy of hg: the temporaries come from the scratch pool."""
        def fn():
            if "hg" in self._cache:
                hg = self._cache["hg"]
                return {"sum": hg.sum(dim=0), "abs": hg.abs().sum(dim=0)}
            per = self._hg_per_sample()
            hg = scratch_like(self.scratch, "d", per, torch.float64).copy_(per)
            total = hg.sum(dim=0)
            return {"sum": total, "abs": hg.abs_().sum(dim=0)}
        return self._get("hg_sums", fn)


class Metric:
    """Subclass, set the class attributes, declare states in ``setup`` and implement update/compute.

    The contract (checked at registration and by ``fitcli.testing.check_metric``):

    - ``name``: the registry name; ``description``, ``cost``: one line each for ``fitcli metrics``.
    - ``needs``: what the run must give (keys of ``NEEDS``); unmet, the metric is skipped with the
      reason. ``optional_needs``: used when the run can give them (the composite's components).
    - ``higher_is_better``: which way is fit (``True``: a higher value is a fitter unit). Required.
      Rankings list the least fit first, validation correlates in this orientation.
    - ``opt_in``: not part of the default metric set (exact ablation costs a forward per unit).
    - ``marks_dead``: a unit whose value is ≤ τ is dead (the dormancy score).
    - ``nan_expected``: NaN is a legitimate value (e.g. a class group is empty), not a
      non-finite flag on the unit.
    - ``rank_priority``: the default ranking uses the computed metric with the highest priority.
    - A metric that needs ``ablation`` receives exact results through ``update_ablation``.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    optional_needs: ClassVar[frozenset[str]] = frozenset()
    higher_is_better: ClassVar[bool | None] = None
    opt_in: ClassVar[bool] = False
    marks_dead: ClassVar[bool] = False
    nan_expected: ClassVar[bool] = False
    rank_priority: ClassVar[int] = 0
    cost: ClassVar[str] = ""
    description: ClassVar[str] = ""
    passes: ClassVar[int] = 1
    # True when the definition itself depends on how the data is split into batches (grad_norm)
    batch_dependent: ClassVar[bool] = False
    # shared per-batch statistics this metric reads ("moments", "range" of the activation: the
    # feeder computes them once per layer and batch during the forward, while the activation is
    # still in cache; "weight_grad_norm": the weight gradient is read only through
    # ``UnitBatch.weight_grad_norm()``, so a feeder may give the norms without the gradient;
    # "hg": the activation's gradient is read only through ``hg()``/``hg_sums()``, so a feeder may
    # fold each gradient into Σ_p h·g as it arrives, ``UnitBatch.fold_grad``, and not keep it)
    shares: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, units: int):
        self.units = int(units)
        self._states: dict[str, tuple[torch.Tensor, str]] = {}
        self.setup()

    # ---- state -------------------------------------------------------------------------------
    def setup(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def add_state(self, name: str, default: torch.Tensor, reduce: str) -> None:
        if reduce not in REDUCTIONS:
            raise ValueError(f"state {name!r}: reduce must be one of {REDUCTIONS}, got {reduce!r}")
        self._states[name] = (default.detach().clone(), reduce)
        setattr(self, name, default.detach().clone())

    def reset(self, reuse: bool = False) -> None:
        """Every state back to its default. ``reuse``: copied into the state's own tensor where it
        has the default's shape, dtype and device (no allocation; for a caller that keeps nothing
        of the previous values, as the tracker after its record)."""
        if not reuse:
            for name, (default, _) in self._states.items():
                setattr(self, name, default.clone())
            return
        dst, src = self._reusable()
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)

    def _reusable(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The state tensors that can take their default in place, with those defaults; the
        others are given a fresh copy of their default now."""
        dst, src = [], []
        for name, (default, _) in self._states.items():
            t = getattr(self, name)
            if isinstance(t, torch.Tensor) and t is not default and t.shape == default.shape \
                    and t.dtype == default.dtype and t.device == default.device:
                dst.append(t)
                src.append(default)
            else:
                setattr(self, name, default.clone())
        return dst, src

    @staticmethod
    def reset_many(metrics: list[Metric]) -> None:
        """``reset(reuse=True)`` of many metrics (the tracker, between its windows), their states
        copied in one call where torch has ``_foreach_copy_``; a metric with its own ``reset`` runs it."""
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        for m in metrics:
            if type(m).reset is not Metric.reset:
                m.reset()
                continue
            d, s = m._reusable()
            dst += d
            src += s
        copy = getattr(torch, "_foreach_copy_", None)
        if copy is not None and dst:
            copy(dst, src)
        else:
            for d, s in zip(dst, src, strict=True):
                d.copy_(s)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._states}

    def merge(self, other: Metric) -> Metric:
        """Combine ``other``'s state into this one (in place); returns self."""
        if type(other) is not type(self) or other.units != self.units:
            raise ValueError(f"cannot merge {type(other).__name__}({other.units}) into {type(self).__name__}({self.units})")
        for name, (_, reduce) in self._states.items():
            a, b = getattr(self, name), getattr(other, name).to(getattr(self, name).device)
            if reduce == "sum":
                setattr(self, name, a + b)
            elif reduce == "max":
                setattr(self, name, torch.maximum(a, b))
            else:
                setattr(self, name, torch.minimum(a, b))
        return self

    def clone(self) -> Metric:
        return copy.deepcopy(self)

    def to(self, device: torch.device | str) -> Metric:
        for name in self._states:
            setattr(self, name, getattr(self, name).to(device))
        return self

    # ---- behaviour -----------------------------------------------------------------------------
    def update(self, batch: UnitBatch) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare(self, batch: UnitBatch) -> None:
        """Work on the activation alone, called by the engine during the forward (before any
        gradient exists) while the activation is hot in cache. Results are cached on the batch or
        the metric; ``update`` must give the same answer whether or not this ran."""
        if batch.act is None:
            return
        if "range" in self.shares:
            batch.sample_range()
        if "moments" in self.shares:
            batch._moments()

    def update_ablation(self, delta_sum: torch.Tensor, samples: int) -> None:
        """Exact ablation results of one batch (metrics that need ``ablation``): ``delta_sum[i]``
        is Σ over the batch's ``samples`` of L_x(unit i ablated) − L_x."""

    @classmethod
    def unavailable(cls, layer: Any) -> str | None:
        """Why this metric has no value on ``layer`` (a ``discovery.Layer``), or None."""
        return None

    @classmethod
    def all_needs(cls) -> frozenset[str]:
        return cls.needs | cls.optional_needs

    @classmethod
    def contract(cls) -> dict[str, Any]:
        """The declared facts a report carries about this metric."""
        return {"description": cls.description, "needs": sorted(cls.needs),
                "optional_needs": sorted(cls.optional_needs), "higher_is_better": cls.higher_is_better,
                "nan_expected": cls.nan_expected, "marks_dead": cls.marks_dead, "rank_priority": cls.rank_priority}

    def info(self) -> dict:
        """Extra facts for the report (e.g. which composite components were used)."""
        return {}


def contract_problems(cls: Any) -> list[str]:
    """What is wrong with a metric class's declared contract (empty when it is sound)."""
    if not (isinstance(cls, type) and issubclass(cls, Metric)):
        return [f"{cls!r} is not a fitcli.metrics.Metric subclass"]
    problems = []
    if not isinstance(cls.name, str) or not cls.name:
        problems.append("no name")
    if cls.higher_is_better not in (True, False):
        problems.append("no direction: set higher_is_better = True or False (which way is fit)")
    for attr in ("needs", "optional_needs"):
        value = getattr(cls, attr)
        if not isinstance(value, (set, frozenset)):
            problems.append(f"{attr} must be a frozenset of need names")
            continue
        unknown = sorted(str(k) for k in value if k not in NEEDS)
        if unknown:
            problems.append(f"unknown need{'s' if len(unknown) > 1 else ''} in {attr}: {', '.join(unknown)} "
                            f"(known: {', '.join(NEEDS)})")
    if isinstance(cls.needs, (set, frozenset)) and isinstance(cls.optional_needs, (set, frozenset)):
        if not (cls.needs | cls.optional_needs):
            problems.append("needs nothing: declare what it reads (needs = frozenset({'activations'}), ...)")
    if not isinstance(cls.passes, int) or cls.passes < 1:
        problems.append("passes must be a positive integer")
    return problems


def _grad_get(self: UnitBatch) -> torch.Tensor | None:
    g = self.__dict__.get("_grad")
    raw = self.__dict__.get("_grad_raw")
    if g is None and raw is not None:
        g = self.__dict__["_grad"] = raw[0] * raw[1]
    return g


def _grad_set(self: UnitBatch, g: torch.Tensor | None) -> None:
    self.__dict__["_grad"] = g
    self.__dict__["_grad_raw"] = None


# ``grad`` stays a dataclass field (constructor argument, repr, equality) read through a property
UnitBatch.grad = property(_grad_get, _grad_set, doc="the gradient of each sample's own loss at the activation point")  # type: ignore[assignment]


def zeros(units: int) -> torch.Tensor:
    return torch.zeros(units, dtype=torch.float64)


def rownorm(w: torch.Tensor) -> torch.Tensor:
    """ℓ2 norm of each unit's slice ``w[i, ...]``, returned as float64. Computed in the tensor's
    own floating dtype (float32 norms are accurate to ~1e-7 and avoid a float64 copy of every
    weight gradient on every batch)."""
    w = w.detach()
    if not w.is_floating_point() or w.dtype in (torch.float16, torch.bfloat16):
        w = w.to(torch.float32)
    return torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1).to(torch.float64)


def safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b, NaN where b == 0 (flagged as non-finite by the report)."""
    return torch.where(b != 0, a / b, float("nan"))  # a / 0 is replaced, so it may be inf or NaN
