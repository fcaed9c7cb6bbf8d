"""Exception hierarchy. Each error carries its exit code and an optional hint.

``fitcli.cli.main`` maps these to exit codes; nothing else in the package calls ``sys.exit``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable


class FitcliError(Exception):
    """Base class: a message for the user, an exit code, and an optional hint. ``hint`` speaks to
    a Python caller (``fitcli.inspect(model) lists the layers``); ``cli_hint``, when given, is the
    same advice for the command line (``fitcli inspect MODEL lists the layers``)."""

    exit_code = 4

    def __init__(self, message: str, hint: str | None = None, cli_hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.cli_hint = cli_hint

    def __str__(self) -> str:  # one or two readable lines
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class GateFailed(FitcliError):
    """A finding, not a failure of the tool: the dead-unit threshold was exceeded."""

    exit_code = 1


class UsageError(FitcliError):
    """Bad flag, unknown metric or layer."""

    exit_code = 2


class InputError(FitcliError):
    """Missing, corrupt or unsafe checkpoint; bad data spec; shape mismatch."""

    exit_code = 3


class UnsafeCheckpointError(InputError):
    """The checkpoint needs full unpickling, which can run arbitrary code."""


class RuntimeAuditError(FitcliError):
    """Failure during the audit itself (e.g. the loss is non-finite on every batch)."""

    exit_code = 4


class Interrupted(BaseException):
    """Ctrl-C (exit 130) or SIGTERM (exit 143).

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way out (in
    fitcli or in user code it calls) can turn an interrupt into an ordinary error.
    """

    def __init__(self, signum: int = 2):
        name = "SIGTERM" if signum == 15 else "SIGINT"
        self.message = f"interrupted by {name}; no report was written"
        self.hint = None
        self.exit_code = 128 + signum
        super().__init__(self.message)


def close_matches(word: str, choices: Iterable[str]) -> str:
    """A 'did you mean' suffix listing close matches, or '' when there are none."""
    matches = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.5)
    return f" (did you mean: {', '.join(matches)}?)" if matches else ""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type name), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


def is_oom(e: BaseException) -> bool:
    """Out of memory on any device (a MemoryError, or torch's 'out of memory' RuntimeError)."""
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def forward_error(e: BaseException, batch, graph, index: int = 0) -> InputError:
    """A data/model mismatch as an InputError naming both shapes.

    ``batch`` has ``describe()``; ``graph`` has ``layers`` whose first entry has ``name``, ``type``
    and ``weight`` (duck-typed, so this leaf module imports nothing of fitcli's)."""
    first = next((lay for lay in getattr(graph, "layers", None) or [] if not getattr(lay, "weight_only", False)), None)
    expect = ""
    if first is not None:
        w = first.weight
        expect = (f"; its first layer {first.name} ({first.type}) expects "
                  + (f"[..., {w.shape[1]}]" if first.type == "Linear" else f"[batch, {w.shape[1]}, ...]"))
    which = "data batch" if index == 0 else f"data batch {index}"
    fixed = re.search(r"size\(\)\[0\] == (\d+)", str(e))
    if getattr(graph, "method", None) == "export" and fixed:
        n = fixed.group(1)
        return InputError(f"{which} has {batch.size} samples, but the .pt2 program was exported with a fixed batch "
                          f"size of {n}: set the batch size to {n}, or export the model with a dynamic batch "
                          "dimension (torch.export.Dim)")
    return InputError(f"{which} of shape {batch.describe()} does not fit the model "
                      f"({type(e).__name__}: {first_line(e)}){expect}")


def guarded(batch, graph, index: int, fn, *args):
    """``fn(*args)``, a forward pass: the model or data failing is an InputError naming the shapes,
    running out of memory a RuntimeAuditError with a hint."""
    try:
        return fn(*args)
    except (InputError, RuntimeAuditError):
        raise
    except Exception as e:
        if is_oom(e):
            raise RuntimeAuditError(f"out of memory on a single batch of {batch.size} samples",
                                    hint="lower the batch size") from e
        raise forward_error(e, batch, graph, index) from e
