"""Metric base class, registry, and the built-in metric families (one module per family)."""

from fitcli.metrics.base import Metric, UnitBatch
from fitcli.metrics.registry import available_metrics, get_metric, load_registry

__all__ = ["Metric", "UnitBatch", "available_metrics", "get_metric", "load_registry"]
