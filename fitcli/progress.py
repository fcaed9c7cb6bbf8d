"""Progress reporting is a callback the caller supplies; the library only calls it.

A ``Progress`` is any object with ``task(description, total) -> context manager`` whose value has
``advance(n=1)``. The library's default reports nothing; the command line passes a rich progress
bar on stderr (``fitcli.cli``). This module imports nothing of fitcli's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol


class Task(Protocol):
    def advance(self, n: int = 1) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: int | None = None) -> contextlib.AbstractContextManager[Task]: ...


class _NullTask:
    def advance(self, n: int = 1) -> None:
        pass


class NoProgress:
    """Reports nothing (the library's default)."""

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Task]:
        yield _NullTask()


NO_PROGRESS = NoProgress()
