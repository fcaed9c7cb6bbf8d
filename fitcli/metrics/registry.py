"""The metric registry: every metric, built-in or plugin, comes through the ``fitcli.metrics``
entry-point group (sorted, so discovery is deterministic). A plugin that fails to load is listed
with its error and is fatal only when that metric is asked for."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from fitcli.errors import UsageError, close_matches

if TYPE_CHECKING:
    from fitcli.metrics.base import Metric

GROUP = "fitcli.metrics"


@dataclass
class Entry:
    name: str
    value: str
    cls: type[Metric] | None = None  # noqa: F821
    error: str | None = None


_cache: dict[str, Entry] | None = None


def load_registry(refresh: bool = False) -> dict[str, Entry]:
    global _cache
    if _cache is not None and not refresh:
        return _cache
    from fitcli.metrics.base import contract_problems

    reg: dict[str, Entry] = {}
    for ep in sorted(entry_points(group=GROUP), key=lambda e: (e.name, e.value)):
        if ep.name in reg:
            continue  # first by sort order wins; duplicates are reported by `fitcli metrics`
        entry = Entry(ep.name, ep.value)
        try:
            cls = ep.load()
            problems = contract_problems(cls)
            if not problems and cls.name != ep.name:
                problems.append(f"its name {cls.name!r} differs from the entry point's {ep.name!r}")
            if problems:
                raise TypeError(f"{ep.value} breaks the metric contract: " + "; ".join(problems))
            entry.cls = cls
        except Exception as e:  # a broken plugin must not break the tool
            entry.error = f"{type(e).__name__}: {e}"
        reg[ep.name] = entry
    _cache = reg
    return reg


def available_metrics() -> list[str]:
    return [n for n, e in load_registry().items() if e.cls is not None]


def default_metrics() -> list[str]:
    """Every loadable metric that is not opt-in."""
    return [n for n, e in load_registry().items() if e.cls is not None and not e.cls.opt_in]


def dead_metrics() -> list[str]:
    """The loadable metrics whose value marks a unit dead (``Metric.marks_dead``), default ones
    first: the first is the one asked for when a command needs dead units."""
    reg = load_registry()
    found = [n for n, e in reg.items() if e.cls is not None and e.cls.marks_dead]
    return sorted(found, key=lambda n: bool(reg[n].cls.opt_in))


def metric_names() -> list[str]:
    """Every registered metric name, read from the entry points without importing any metric (so
    without torch): fast enough to check settings before any work."""
    return sorted({ep.name for ep in entry_points(group=GROUP)})


def check_names(names: list[str] | tuple[str, ...], what: str = "metric") -> None:
    """Raise UsageError for an unknown metric name, before any work is done (a metric that fails
    to load is reported when it is loaded)."""
    known = metric_names()
    for n in names:
        if n not in known:
            raise UsageError(f"unknown {what} {n!r}" + close_matches(n, known),
                             hint="fitcli.metrics.available_metrics() lists them",
                             cli_hint="`fitcli metrics` lists them")


def get_metric(name: str) -> type[Metric]:  # noqa: F821
    reg = load_registry()
    if name not in reg:
        raise UsageError(f"unknown metric {name!r}" + close_matches(name, reg),
                         hint="fitcli.metrics.available_metrics() lists them", cli_hint="`fitcli metrics` lists them")
    entry = reg[name]
    if entry.cls is None:
        raise UsageError(f"metric {name!r} failed to load: {entry.error}")
    return entry.cls
