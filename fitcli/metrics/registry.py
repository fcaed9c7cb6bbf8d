"""The metric registry: every metric, built-in or plugin, comes through the ``fitcli.metrics``
entry-point group (sorted, so discovery is deterministic). A plugin that fails to load is listed
with its error and is fatal only when that metric is asked for."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points

from fitcli.errors import UsageError, close_matches
from fitcli.metrics.base import Metric

GROUP = "fitcli.metrics"


@dataclass
class Entry:
    name: str
    value: str
    cls: type[Metric] | None = None
    error: str | None = None


_cache: dict[str, Entry] | None = None


def load_registry(refresh: bool = False) -> dict[str, Entry]:
    global _cache
    if _cache is not None and not refresh:
        return _cache
    reg: dict[str, Entry] = {}
    for ep in sorted(entry_points(group=GROUP), key=lambda e: (e.name, e.value)):
        if ep.name in reg:
            continue  # first by sort order wins; duplicates are reported by `fitcli metrics`
        entry = Entry(ep.name, ep.value)
        try:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Metric)):
                raise TypeError(f"{ep.value} is not a fitcli.metrics.Metric subclass")
            entry.cls = cls
        except Exception as e:  # a broken plugin must not break the tool
            entry.error = f"{type(e).__name__}: {e}"
        reg[ep.name] = entry
    _cache = reg
    return reg


def available_metrics() -> list[str]:
    return [n for n, e in load_registry().items() if e.cls is not None]


def get_metric(name: str) -> type[Metric]:
    reg = load_registry()
    if name not in reg:
        raise UsageError(f"unknown metric {name!r}" + close_matches(name, reg), hint="`fitcli metrics` lists them")
    entry = reg[name]
    if entry.cls is None:
        raise UsageError(f"metric {name!r} failed to load: {entry.error}")
    return entry.cls
