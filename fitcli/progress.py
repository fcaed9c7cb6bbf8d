"""Progress reporting is a callback the caller supplies; the library only calls it.

A ``Progress`` is any object with ``task(description, total) -> context manager`` whose value has
``advance(n=1)``. The library's default reports nothing. ``as_progress`` turns what a caller gives
(``progress=`` of ``fitcli.audit`` and the others) into one: ``True`` is a rich progress bar on
stderr, ``False``/``None`` nothing, a ``Progress`` object itself, and a plain function
``fn(description, done, total)`` is called when a task starts (``done`` 0) and after each step
(``total`` None when unknown). This module imports nothing of fitcli's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol


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


class RichProgress:
    """A rich progress bar on stderr, removed when its task ends."""

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Task]:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RP

        bar = RP(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                 console=Console(stderr=True), transient=True)
        tid = bar.add_task(description, total=total)

        class _Bar:
            def advance(self, n: int = 1) -> None:
                bar.advance(tid, n)

        with bar:
            yield _Bar()


class CallbackProgress:
    """Progress reported to ``fn(description, done, total)``."""

    def __init__(self, fn: Callable[[str, int, int | None], Any]):
        self.fn = fn

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Task]:
        fn = self.fn
        fn(description, 0, total)

        class _Steps:
            done = 0

            def advance(self, n: int = 1) -> None:
                self.done += n
                fn(description, self.done, total)

        yield _Steps()



# what ``progress=`` of the API accepts
ProgressArg = bool | Progress | Callable[[str, int, int | None], Any] | None


def as_progress(progress: Any) -> Progress | None:
    """What a caller gave as ``progress`` -> a ``Progress``; None when it is none of the accepted
    kinds (True/False/None, a ``Progress``, a function ``(description, done, total)``)."""
    if progress is None or progress is False:
        return NO_PROGRESS
    if progress is True:
        return RichProgress()
    if callable(getattr(progress, "task", None)):
        return progress
    if callable(progress):
        return CallbackProgress(progress)
    return None
