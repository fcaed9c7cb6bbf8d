"""Metric base: mergeable per-unit state (after torchmetrics' ``Metric``).

A metric declares tensor states with a merge rule (``sum``, ``max`` or ``min`` only: associative
and commutative, so batches, shards and ranks combine in any order), updates them per batch from a
``UnitBatch``, and ``compute()`` gives one float per unit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar

import torch

REDUCTIONS = ("sum", "max", "min")

# what a metric may need; the engine only provides what the run can give
NEEDS = {
    "weights": "the layer's weights",
    "graph": "the layers that consume each unit (from the traced graph)",
    "baseline": "a second checkpoint (--baseline)",
    "activations": "a runnable model (--arch) and --data",
    "gradients": "a loss: targets in --data or --loss",
    "labels": "integer class targets in --data",
    "ablation": "an exact ablation pass (opt-in: --metric ablation)",
}


@dataclass
class UnitBatch:
    """Everything one batch offers one layer. Tensors are float64 on the audit device.

    ``act``/``grad``: ``[batch, units, positions]`` at the activation point; ``grad`` is the
    gradient of each sample's own loss. ``weight_grad``: gradient of the batch-mean loss w.r.t.
    the weight (``[units, ...]``). ``correct``: ``[batch]`` bool, prediction == label.
    """

    weight: torch.Tensor
    act: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    weight_grad: torch.Tensor | None = None
    baseline_weight: torch.Tensor | None = None
    consumer_weights: list[torch.Tensor] | None = None
    correct: torch.Tensor | None = None
    pass_index: int = 0
    extra: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False)

    # Per-batch statistics shared by several metrics, computed once per batch and layer.
    # Elementwise work stays in the activation's dtype; every reduction accumulates in float64.
    def _get(self, key: str, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def observations(self) -> int:
        """Observations per unit in this batch: samples x positions."""
        assert self.act is not None
        return int(self.act.shape[0] * self.act.shape[2])

    def abs_sum(self) -> torch.Tensor:
        """Σ |h| per unit over the batch's observations. ``[units]``"""
        return self._get("abs_sum", lambda: _f64_total(self.act.abs()))

    def value_sum(self) -> torch.Tensor:
        return self._get("sum", lambda: _f64_total(self.act))

    def square_sum(self) -> torch.Tensor:
        """Σ h² per unit, as Σ (h − m_b)² + n_b·m_b² with m_b the batch mean: the squares of
        centred values keep float32 accurate (no cancellation against a large mean)."""
        def fn():
            n = self.observations()
            shift = (self.value_sum() / n).to(self.act.dtype)  # the batch mean, in the act's dtype
            centred = self.act - shift.reshape(1, -1, 1)
            m = shift.to(torch.float64)
            # h² = c² + 2·m·c + m², summed: exact algebra, only the small c² rounded in float32
            return _f64_total(centred.square()) + 2 * m * _f64_total(centred) + n * m.square()
        return self._get("sumsq", fn)

    def zero_count(self) -> torch.Tensor:
        return self._get("zeros", lambda: (self.act == 0).sum(dim=2).sum(dim=0).to(torch.float64))

    def hg(self) -> torch.Tensor:
        """Σ_p h(x,p)·g(x,p) per sample and unit. ``[batch, units]``"""
        assert self.grad is not None
        return self._get("hg", lambda: (self.act * self.grad).sum(dim=2).to(torch.float64))

    def hbar(self) -> torch.Tensor:
        """Each sample's mean activation over positions. ``[batch, units]``"""
        return self._get("hbar", lambda: self.act.sum(dim=2).to(torch.float64) / self.act.shape[2])


class Metric:
    """Subclass, set the class attributes, declare states in ``setup`` and implement update/compute."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    cost: ClassVar[str] = ""
    description: ClassVar[str] = ""
    passes: ClassVar[int] = 1
    # True when the definition itself depends on how the data is split into batches (grad_norm)
    batch_dependent: ClassVar[bool] = False

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

    def reset(self) -> None:
        for name, (default, _) in self._states.items():
            setattr(self, name, default.clone())

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

    def info(self) -> dict:
        """Extra facts for the report (e.g. which composite components were used)."""
        return {}


def _f64_total(x: torch.Tensor) -> torch.Tensor:
    """Per-unit total of ``x`` ([batch, units, positions]): positions summed in the tensor's own
    dtype (a short, contiguous reduction), then samples accumulated in float64."""
    return x.sum(dim=2).to(torch.float64).sum(dim=0)


def zeros(units: int) -> torch.Tensor:
    return torch.zeros(units, dtype=torch.float64)


def rownorm(w: torch.Tensor) -> torch.Tensor:
    """ℓ2 norm of each unit's slice ``w[i, ...]`` (float64)."""
    return w.detach().to(torch.float64).reshape(w.shape[0], -1).norm(dim=1)


def safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b, NaN where b == 0 (flagged as non-finite by the report)."""
    return torch.where(b != 0, a / torch.where(b != 0, b, torch.ones_like(b)), torch.full_like(a, float("nan")))
