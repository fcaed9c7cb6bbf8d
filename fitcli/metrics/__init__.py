"""Metric base class, registry, and the built-in metric families (one module per family).

Names are imported on first use: the registry's names can be read without importing torch."""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {"Metric": "fitcli.metrics.base", "UnitBatch": "fitcli.metrics.base",
           "available_metrics": "fitcli.metrics.registry", "get_metric": "fitcli.metrics.registry",
           "load_registry": "fitcli.metrics.registry"}

__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'fitcli.metrics' has no attribute {name!r}")
