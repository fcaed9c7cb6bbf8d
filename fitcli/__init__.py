"""fitcli: which neurons and layers of a trained PyTorch model contribute, and which are dead weight.

Library first: ``load_model``, ``load_data``, ``find_layers``, ``audit`` and ``ablate`` are the
API; ``fitcli.cli`` is a thin command line on top of them.
"""

__version__ = "0.1.0"

from fitcli.errors import FitcliError, InputError, RuntimeAuditError, UsageError  # noqa: E402

__all__ = ["__version__", "FitcliError", "InputError", "UsageError", "RuntimeAuditError"]
