"""fitcli: which neurons and layers of a trained PyTorch model contribute, and which are dead weight.

Library first::

    import fitcli
    report = fitcli.audit(model, loader)          # nn.Module + any re-iterable of batches
    report.dead, report.ranked(by="apoz", top=10)
    report.save("report.json")

``audit``, ``ablate``, ``inspect`` and ``gate`` are the API; ``fitcli.cli`` is a thin command line
on top of them. Names are imported on first use, so ``import fitcli`` (and the command line's
argument checks) do not wait for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "audit": "fitcli.api", "ablate": "fitcli.api", "blocks": "fitcli.api", "inspect": "fitcli.api", "gate": "fitcli.api",
    "load": "fitcli.api", "load_data": "fitcli.api", "Inspection": "fitcli.api",
    "AuditReport": "fitcli.report", "LayerReport": "fitcli.report", "GateResult": "fitcli.report",
    "Settings": "fitcli.settings", "Batch": "fitcli.data",
    "Metric": "fitcli.metrics.base", "UnitBatch": "fitcli.metrics.base",
    "FitcliError": "fitcli.errors", "InputError": "fitcli.errors", "UsageError": "fitcli.errors",
    "RuntimeAuditError": "fitcli.errors",
    "compare": "fitcli.comparison", "Comparison": "fitcli.comparison",
    "prune": "fitcli.pruning", "PruneResult": "fitcli.pruning", "PruneRefused": "fitcli.pruning",
    "Tracker": "fitcli.tracker",
    "UnitKind": "fitcli.discovery.kinds", "register_unit_kind": "fitcli.discovery.kinds",
    "unregister_unit_kind": "fitcli.discovery.kinds",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fitcli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
