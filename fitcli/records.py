"""Writing a tracker's history file: one JSON line per record, encoded and appended by a thread of
its own, so that a training step does not wait for the text of its record.

The record (a dict the tracker no longer changes) is queued; the writer thread encodes it layer by
layer (so the training thread, which needs the interpreter between its kernels, never waits on one
long encoding call) and appends and flushes the line. ``close()`` waits for every queued record to
be on disk. A write that fails (a full disk) is raised in the training thread by the next
``write`` or by ``close``.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from typing import Any

from fitcli.errors import RuntimeAuditError, UsageError

_SEP = (",", ":")


def encode(rec: dict[str, Any]) -> str:
    """The record's JSON line (no newline): the same text as one ``json.dumps`` of it with compact
    separators, built a layer at a time."""
    layers = rec.get("layers")
    if not isinstance(layers, dict) or list(rec)[-1] != "layers":
        return json.dumps(rec, allow_nan=False, separators=_SEP)
    head = json.dumps({k: v for k, v in rec.items() if k != "layers"}, allow_nan=False, separators=_SEP)
    parts = [json.dumps(name) + ":" + json.dumps(entry, allow_nan=False, separators=_SEP)
             for name, entry in layers.items()]
    return head[:-1] + ("," if len(head) > 2 else "") + '"layers":{' + ",".join(parts) + "}}"


class RecordWriter:
    """Appends records to ``path`` from a background thread (see the module's docstring)."""

    def __init__(self, path: str | os.PathLike):
        try:
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        except OSError as e:
            raise UsageError(f"history file {path}: cannot be opened for appending "
                             f"({e.strerror or type(e).__name__})") from e
        self.path = path
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fitcli-history", daemon=True)
        self._thread.start()

    def write(self, rec: dict[str, Any]) -> None:
        self._raise()
        self._queue.put(rec)

    def close(self) -> None:
        """Every queued record written and flushed, the file closed. Calling it again does nothing."""
        if self._file is None:
            return
        self._queue.put(None)
        self._thread.join()
        self._file.close()
        self._file = None
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise RuntimeAuditError(f"history file {self.path}: a record could not be written "
                             f"({getattr(e, 'strerror', None) or type(e).__name__}: {e})") from e

    def _run(self) -> None:
        while True:
            rec = self._queue.get()
            if rec is None:
                return
            if self._error is not None:
                continue  # reported already; later records are not written after a lost one
            try:
                self._file.write(encode(rec) + "\n")
                self._file.flush()
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                self._error = e
