"""Reading a training history back: the records a ``fitcli.Tracker`` appended to its file, each
layer's dead fraction over the steps, and the step each unit died at (``fitcli history``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fitcli.errors import InputError, UsageError

FORMAT = "fitcli.history/1"


def read_history(path: str | os.PathLike) -> list[dict]:
    """The records of a history file, in file order. A missing or unreadable file, or a line that
    is not a record, is an ``InputError`` naming the line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise InputError(f"history file not found: {path}") from e
    except IsADirectoryError as e:
        raise InputError(f"history file {path} is a directory") from e
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"history file {path} cannot be read ({type(e).__name__})") from e
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise InputError(f"history file {path}, line {n}: not JSON ({e.args[0] if e.args else e})") from e
        why = _record_problem(rec)
        if why:
            raise InputError(f"history file {path}, line {n}: not a {FORMAT} record ({why})")
        records.append(rec)
    if not records:
        raise InputError(f"history file {path} holds no records")
    return records


def _record_problem(rec: Any) -> str | None:
    if not isinstance(rec, dict):
        return "not an object"
    if rec.get("format") != FORMAT:
        return f"format {rec.get('format')!r}"
    if not isinstance(rec.get("step"), int) or isinstance(rec.get("step"), bool):
        return "no integer step"
    layers = rec.get("layers")
    if not isinstance(layers, dict):
        return "no layers"
    for name, lay in layers.items():
        if not isinstance(lay, dict) or not isinstance(lay.get("units"), int) or not isinstance(lay.get("metrics"), dict):
            return f"layer {name!r} has no units or metrics"
        dead = lay.get("dead")
        if dead is not None and (not isinstance(dead, list) or
                                 not all(isinstance(i, int) and 0 <= i < lay["units"] for i in dead)):
            return f"layer {name!r}: dead units out of range"
    return None


def died_at(dead_sets: list[set[int] | None], steps: list[int]) -> dict[int, int]:
    """Unit -> the step it died at: the first record from which the unit is dead in that record
    and in every later one (so a unit dead in the last record only). Records without dead units
    (no dormancy score) interrupt nothing; they are skipped."""
    out: dict[int, int] = {}
    known = [(s, d) for s, d in zip(steps, dead_sets, strict=True) if d is not None]
    if not known:
        return out
    for unit in sorted(known[-1][1]):
        first = known[-1][0]
        for s, d in reversed(known):
            if unit not in d:
                break
            first = s
        out[unit] = first
    return out


def history_summary(records: list[dict], layers: list[str] | None = None) -> dict:
    """Dead fraction per layer over the records' steps, and the step each unit died at
    (``died_at``). ``layers``: names or globs (None: every layer)."""
    import fnmatch

    names: list[str] = []
    for rec in records:
        names.extend(n for n in rec["layers"] if n not in names)
    if layers:
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in layers)]
        if not chosen:
            raise UsageError(f"layer {layers[0]!r} matches no layer of the history",
                             hint="the history's layers: " + ", ".join(names[:20]))
        names = chosen
    steps = [rec["step"] for rec in records]
    out_layers = []
    for name in names:
        entries = [rec["layers"].get(name) for rec in records]
        first = next(e for e in entries if e is not None)
        dead_sets = [set(e["dead"]) if e is not None and e.get("dead") is not None else None for e in entries]
        fractions = [len(d) / e["units"] if d is not None and e is not None and e["units"] else None
                     for d, e in zip(dead_sets, entries, strict=True)]
        died = died_at(dead_sets, steps)
        out_layers.append({"name": name, "units": first["units"], "final": bool(first.get("final")),
                           "dead_fraction": fractions, "dead": [sorted(d) if d is not None else None for d in dead_sets],
                           "died_at": {str(u): s for u, s in sorted(died.items())}})
    return {"format": "fitcli.history-summary/1", "records": len(records), "steps": steps,
            "tau": records[-1].get("tau"), "layers": out_layers}


__all__ = ["FORMAT", "read_history", "history_summary", "died_at"]
