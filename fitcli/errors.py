"""Exception hierarchy. Each error carries its exit code and an optional hint.

``fitcli.cli.main`` maps these to exit codes; nothing else in the package calls ``sys.exit``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FitcliError(Exception):
    """Base class: a message for the user, an exit code, and an optional hint."""

    exit_code = 4

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

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
