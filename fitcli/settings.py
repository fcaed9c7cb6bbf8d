"""One settings object for every audit: the library takes it, the config file and the command line
fill it. ``Settings.check()`` validates every field before any model is loaded or data read, so a
typo costs a second, not an audit.

Messages name the setting (``tau``), never a command-line flag: the library does not know how it
was called.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from fitcli.errors import UsageError, close_matches

ABLATION_MODES = ("zero", "mean")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Settings:
    """What to audit and how. Every field has a default; ``check()`` says what is wrong."""

    metrics: list[str] | None = None  # registry names; None = every metric whose needs are met
    layers: list[str] | None = None  # names or globs over qualified layer names; None = every layer
    kinds: list[str] | None = None  # unit kinds: heads, mlp, hidden, blocks, rows; None = heads, mlp, blocks
    # for a transformer (a block with attention and an MLP), every layer for other models
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    seed: int = 0  # local generators only: the caller's global RNG is never touched
    tau: float = 0.0  # dead when the dormancy score is ≤ tau
    top: int = 20  # rows of the ranked table
    rank_by: str | None = None  # a computed metric, "auto" (best validated), None = default
    batch_size: int = 64  # for tensor files and random data specs
    max_batches: int | None = None  # stop after this many batches
    ablation_mode: str = "zero"  # "zero", or "mean": the unit's mean activation
    chunk_size: int | None = None  # units per batched ablation pass; None = from free memory
    whole_layer: bool = False  # ablate: also every layer as a whole
    validate: bool = False  # measure each metric against exact ablation
    validate_units: int | None = None  # ablate a stratified sample of K units per layer
    max_dead: float | None = None  # gate: percent of dead units, model-wide
    max_dead_layer: float | None = None  # gate: percent of dead units in any layer
    min_coverage: float | None = None  # gate: percent of the model's parameters the audited units own
    dtype: str | None = None  # cast the model's floating weights for the audit; None = its own dtype
    max_memory: int | None = None  # bytes of weights resident at once: a block-by-block audit; None = all

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def make(cls, settings: Settings | None = None, **options: Any) -> Settings:
        """``settings`` with ``options`` applied on top (None values are ignored)."""
        known = set(cls.names())
        unknown = [k for k in options if k not in known]
        if unknown:
            raise UsageError(f"unknown setting {unknown[0]!r}" + close_matches(unknown[0], known))
        base = dataclasses.replace(settings) if settings is not None else cls()
        given = {k: v for k, v in options.items() if v is not None}
        return dataclasses.replace(base, **given)

    def check(self, ablate: bool = False) -> Settings:
        """Raise UsageError naming the first bad setting; returns self."""
        from fitcli.metrics.registry import check_names

        _check_number("tau", self.tau, low=0.0)
        _check_int("seed", self.seed, low=None)
        _check_int("top", self.top, low=0)
        _check_int("batch_size", self.batch_size, low=1)
        _check_int("max_batches", self.max_batches, low=1, optional=True)
        _check_int("chunk_size", self.chunk_size, low=1, optional=True)
        _check_int("max_memory", self.max_memory, low=1, optional=True)
        _check_int("validate_units", self.validate_units, low=2, optional=True,
                   why="a rank correlation needs two units")
        _check_number("max_dead", self.max_dead, low=0.0, optional=True, high=100.0)
        _check_number("max_dead_layer", self.max_dead_layer, low=0.0, optional=True, high=100.0)
        _check_number("min_coverage", self.min_coverage, low=0.0, optional=True, high=100.0)
        if self.ablation_mode not in ABLATION_MODES:
            raise UsageError(f"{{ablation_mode}} {self.ablation_mode!r}: use zero or mean", setting="ablation_mode")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UsageError(f"{{dtype}} {self.dtype!r}: use float32, bfloat16 or float16", setting="dtype")
        if self.dtype is not None and self.max_memory is not None:
            raise UsageError("{max_memory} and {dtype} together are not supported: the mapped weights are used as stored",
                             setting=("max_memory", "dtype"))
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu", "cuda")
                                                     or self.device.startswith("cuda:")):
            raise UsageError(f"{{device}} {self.device!r}: use cpu, cuda, cuda:N or auto", setting="device")
        for name in ("metrics", "layers", "kinds"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (list, tuple))
                                      or not all(isinstance(v, str) and v for v in value)):
                raise UsageError(f"{{{name}}} must be a list of names", setting=name)
        if self.layers:
            for pat in self.layers:
                if len(pat) > 500:  # fnmatch is quadratic on unclosed brackets: refuse before matching
                    raise UsageError(f"{{layers}}: a pattern of {len(pat)} characters is too long (at most 500)",
                                     setting="layers")
        if self.metrics:
            check_names(self.metrics)
        # a kind the model lacks, or no kind at all, is said with the kinds the model has (discovery.roles)
        if self.rank_by is not None:
            self._check_rank_by()
        return self

    def _check_rank_by(self) -> None:
        from fitcli.metrics.registry import metric_names

        if self.rank_by == "auto":
            if not self.validate:
                raise UsageError("{rank_by} 'auto' picks the best-validated metric: it needs {validate=True}",
                                 setting=("rank_by", "validate"))
            return
        names = metric_names()
        if self.rank_by not in names:
            raise UsageError(f"{{rank_by}} {self.rank_by!r} is not a metric" + close_matches(self.rank_by, names),
                             hint="fitcli.metrics.available_metrics() lists them",
                             cli_hint="`fitcli metrics` lists them", setting="rank_by")
        if self.metrics and self.rank_by not in self.metrics:
            raise UsageError(f"{{rank_by}} {self.rank_by!r} is not among the metrics asked for "
                             f"({', '.join(self.metrics)})", setting="rank_by")


def _check_number(name: str, value: Any, low: float | None, optional: bool = False,
                  high: float | None = None) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{{{name}}} must be a finite number, got {value!r}", setting=name)
    if low is not None and value < low:
        raise UsageError(f"{{{name}}} must be ≥ {low:g}, got {value!r}", setting=name)
    if high is not None and value > high:
        raise UsageError(f"{{{name}}} is a percentage: at most {high:g}, got {value!r}", setting=name)


def _check_int(name: str, value: Any, low: int | None, optional: bool = False, why: str = "") -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{{{name}}} must be an integer, got {value!r}", setting=name)
    if low is not None and value < low:
        raise UsageError(f"{{{name}}} must be at least {low}, got {value}" + (f" ({why})" if why else ""), setting=name)


__all__ = ["Settings", "ABLATION_MODES", "DTYPES"]
