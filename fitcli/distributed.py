"""Audits across processes with ``torch.distributed`` (``torchrun``; gloo on CPU, NCCL on GPUs).

Nothing here starts processes: ``torchrun`` does, and the library takes a process group
(``fitcli.audit(..., group=pg)``) that the caller initialised. The command line initialises the
default group itself when ``torchrun``'s environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``)
is there (``launched()``).

How a run is split, and why the result is the single-process one:

- batch ``i`` of the data goes to rank ``i % world`` (``Shard``): disjoint, nothing padded or
  repeated. Every rank still reads batch 0 for the model's discovery (a probe, no statistics);
- metric states are declared with ``sum``/``max``/``min`` reductions (``fitcli.metrics.base``)
  and are all-reduced with them (``reduce_states``); sums are float64, so the order in which
  ranks add them changes a value by ~1e-16 relative, and counts are exact. Between the passes of
  a two-pass metric (entropy: range, then histogram) the states are reduced once, so the second
  pass bins against the global range; what pass one had already summed is not counted twice;
- exact ablation shards the same way (batches) and all-reduces its float64 sums; mean-mode
  ablation all-reduces the per-unit sums and counts of the mean pass first;
- errors: local work runs in ``phase()`` blocks. A rank that raises posts its error in the
  process group's store (the others poll it between batches) and every rank then meets at the
  phase's end, where all raise the same error (the lowest failing rank's): same message, same
  exit code. A rank that dies outright closes its connections, and a rank that hangs is cut off
  by the group's timeout; either way the others raise ``RuntimeAuditError`` (exit 4).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from fitcli.errors import (
    FitcliError,
    GateFailed,
    InputError,
    RuntimeAuditError,
    UsageError,
    first_line,
)

DEFAULT_TIMEOUT = 120.0  # seconds a rank waits for the others at a collective
CODES: dict[int, type[FitcliError]] = {1: GateFailed, 2: UsageError, 3: InputError, 4: RuntimeAuditError}
_RUNS: dict[int, int] = {}  # per process group: how many phased runs began (the same on every rank)


class PeerFailed(Exception):
    """Another rank posted an error: stop the local work and meet at the phase's end."""


@dataclass
class Dist:
    """A process group and this process's place in it."""

    group: Any
    rank: int
    world: int
    backend: str
    run: int = 0
    _store: Any = field(default=None, repr=False)

    @property
    def comm_device(self) -> torch.device:
        """Where collective tensors live: the current CUDA device for NCCL, else the CPU."""
        if "nccl" in self.backend and "gloo" not in self.backend:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _key(self) -> str:
        return f"fitcli/run{self.run}/error"

    # ---- failure agreement ----------------------------------------------------------------
    def post(self, info: tuple) -> None:
        """Tell the others, without a collective, that this rank failed (they poll between batches)."""
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.set(self._key(), pickle.dumps(info))

    def poll(self) -> None:
        """Raise PeerFailed when another rank posted an error (one store lookup)."""
        if self._store is None:
            return
        try:
            failed = self._store.check([self._key()])
        except Exception:
            return
        if failed:
            raise PeerFailed()

    def agree(self, error: BaseException | None) -> None:
        """Every rank calls this at the same point: when any rank failed, every rank raises the
        same error (the lowest failing rank's message and exit code)."""
        mine = None if error is None or isinstance(error, PeerFailed) else describe(error, self.rank)
        if mine is not None:
            self.post(mine)
        infos: list[Any] = [None] * self.world
        collective("agree on errors", lambda: torch.distributed.all_gather_object(infos, mine, group=self.group))
        first = next((x for x in infos if x is not None), None)
        if first is None:
            if error is not None:  # a PeerFailed without a posted error: cannot happen; be safe
                raise RuntimeAuditError("distributed: a rank stopped without an error") from error
            return
        raise agreed(first, self.world) from error


def describe(error: BaseException, rank: int) -> tuple:
    """(rank, exit code, message, hint, settings, cli hint) of an error, as every rank will report
    it (the message and hint with their settings as fields, for each caller to word)."""
    if isinstance(error, FitcliError):
        return rank, int(error.exit_code), error.template, error.hint_template, error.settings, error.cli_hint
    return rank, 4, f"unexpected {type(error).__name__}: {first_line(error)}", None, (), None


def agreed(info: tuple, world: int) -> FitcliError:
    rank, code, message, hint, settings, cli_hint = info
    cls = CODES.get(code, RuntimeAuditError)
    # a failed gate is a finding about the (same) report, not about one rank
    e = cls(message if code == GateFailed.exit_code else f"{message} (rank {rank} of {world})", hint=hint,
            setting=settings, cli_hint=cli_hint)
    e.exit_code = code
    e.agreed = True  # type: ignore[attr-defined]
    return e


def collective(what: str, fn) -> Any:
    """A collective call; its failure (a peer gone, the timeout) is a RuntimeAuditError."""
    try:
        return fn()
    except FitcliError:
        raise
    except Exception as e:
        raise RuntimeAuditError(f"distributed: {what} failed: {first_line(e)}",
                                hint="another rank stopped or did not answer within the timeout") from e


def of(group: Any) -> Dist | None:
    """The ``Dist`` of a process group (``torch.distributed.group.WORLD`` or any group), or None
    for None. The group must be initialised by the caller."""
    if group is None:
        return None
    import torch.distributed as td

    if not td.is_available() or not td.is_initialized():
        raise UsageError("group: torch.distributed is not initialised (call init_process_group first)")
    backend = str(td.get_backend(group))
    store = None
    with contextlib.suppress(Exception):  # a private accessor: without it, failures wait for the phase end
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
    d = Dist(group=group, rank=td.get_rank(group), world=td.get_world_size(group), backend=backend, _store=store)
    d.run = _RUNS[id(group)] = _RUNS.get(id(group), 0) + 1
    return d


@contextlib.contextmanager
def phase(d: Dist | None) -> Iterator[None]:
    """Local work that every rank does; on the way out every rank learns whether any failed."""
    if d is None:
        yield
        return
    try:
        yield
    except Exception as e:
        d.agree(e)
        raise
    d.agree(None)


class Shard:
    """Batches ``rank, rank + world, ...`` of ``data``: disjoint shards, nothing padded. Between
    batches it checks whether another rank failed."""

    def __init__(self, data: Iterable, d: Dist):
        self.data, self.d = data, d
        self.spec = getattr(data, "spec", None)
        total = getattr(data, "total", None)
        self.total = None if total is None else len(range(d.rank, total, d.world))

    def __iter__(self) -> Iterator:
        for i, b in enumerate(self.data):
            self.d.poll()
            if i % self.d.world == self.d.rank:
                yield b
        self.d.poll()


def shard(data: Any, d: Dist | None) -> Any:
    return data if d is None or data is None else Shard(data, d)


# --------------------------------------------------------------------------------------------
# reductions

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce(d: Dist, tensors: list[torch.Tensor], op: str = "sum") -> list[torch.Tensor]:
    """All-reduce tensors (any shapes, one dtype per call is not required): packed per dtype
    into one flat buffer, so a reduction costs one collective per dtype."""
    import torch.distributed as td

    out: list[torch.Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for idx in by_dtype.values():
        flat = torch.cat([tensors[i].detach().reshape(-1).to(d.comm_device) for i in idx]) if idx else None
        collective(f"all-reduce ({op})",
                   lambda flat=flat: td.all_reduce(flat, op=getattr(td.ReduceOp, _OPS[op]), group=d.group))
        at = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = flat[at : at + n].reshape(tensors[i].shape).to(tensors[i].device)
            at += n
    return out  # type: ignore[return-value]


def _states(metrics: Iterable) -> list[tuple[Any, str, str]]:
    return [(m, name, reduce) for m in metrics for name, (_, reduce) in m._states.items()]


def snapshot(metrics: list) -> dict:
    """Copies of the sum states of ``metrics`` (for ``reduce_states``)."""
    return {(id(m), name): getattr(m, name).clone() for m, name, r in _states(metrics) if r == "sum"}


def reduce_states(d: Dist, metrics: list, before: dict | None = None) -> dict:
    """All-reduce every state of ``metrics`` (one list, the same order on every rank) with its
    declared reduction. ``before``: the sum states as a previous reduction left them (already
    global): on ranks other than 0 they are taken out first, so nothing is counted twice.
    Returns the new snapshot of the sum states."""
    entries = _states(metrics)
    for op in ("sum", "max", "min"):
        mine = [(m, name) for m, name, r in entries if r == op]
        if not mine:
            continue
        vals = []
        for m, name in mine:
            v = getattr(m, name)
            if op == "sum" and before is not None and d.rank != 0 and (id(m), name) in before:
                v = v - before[(id(m), name)]
            vals.append(v)
        for (m, name), v in zip(mine, all_reduce(d, vals, op), strict=True):
            setattr(m, name, v)
    return snapshot(metrics)


def reduce_counts(d: Dist, values: list[float]) -> list[float]:
    """Sum plain numbers over the ranks (float64: exact for counts below 2**53)."""
    t = all_reduce(d, [torch.tensor(values, dtype=torch.float64)], "sum")[0]
    return [float(x) for x in t.tolist()]


def reduce_ablation(d: Dist, res: Any, counts: bool = True) -> None:
    """All-reduce an ``AblationResult``'s sums and counts in place. ``counts=False``: every rank saw
    every batch (the units were partitioned), so samples and batches are not added up."""
    names = list(res.delta_sum)
    sums = all_reduce(d, [res.delta_sum[n] for n in names] + [res.acc_sum[n] for n in names], "sum")
    for i, n in enumerate(names):
        res.delta_sum[n], res.acc_sum[n] = sums[i], sums[len(names) + i]
    flat = [res.whole_sum[n] for n in names] + [res.whole_acc[n] for n in names] + [res.samples, res.batches]
    tot = reduce_counts(d, flat)
    for i, n in enumerate(names):
        res.whole_sum[n], res.whole_acc[n] = tot[i], tot[len(names) + i]
    if counts:
        res.samples, res.batches = int(tot[-2]), int(tot[-1])


# --------------------------------------------------------------------------------------------
# the command line's side: torchrun's environment


def torchrun_env() -> dict[str, int] | None:
    """``{"world", "rank", "local_rank"}`` when launched by torchrun (or with its variables set)."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        return {"world": int(os.environ["WORLD_SIZE"]), "rank": int(os.environ["RANK"]),
                "local_rank": int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))}
    except ValueError as e:
        raise UsageError(f"torchrun environment: {first_line(e)}") from e


def timeout_of(value: float | None) -> float:
    """The collective timeout in seconds: given, else ``FITCLI_DIST_TIMEOUT``, else 120."""
    if value is None:
        raw = os.environ.get("FITCLI_DIST_TIMEOUT")
        try:
            value = float(raw) if raw else DEFAULT_TIMEOUT
        except ValueError as e:
            raise UsageError(f"FITCLI_DIST_TIMEOUT {raw!r} is not a number of seconds") from e
    if not value > 0:
        raise UsageError(f"distributed timeout must be a positive number of seconds, got {value!r}")
    return float(value)


@contextlib.contextmanager
def launched(device: str, timeout: float | None = None) -> Iterator[tuple[Any, str]]:
    """Under torchrun: initialise the default process group (gloo on CPU, NCCL on CUDA), yield
    (the group, this rank's device), and destroy the group on the way out. Elsewhere: (None, device)."""
    env = torchrun_env()
    if env is None:
        yield None, device
        return
    import torch.distributed as td

    seconds = timeout_of(timeout)
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise UsageError("device cuda: no CUDA device is available here", hint="use the cpu (or auto) device")
        device = f"cuda:{env['local_rank']}" if device in ("auto", "cuda") else device
        torch.cuda.set_device(torch.device(device))
    elif device == "auto":
        device = "cpu"
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    collective("joining the process group", lambda: td.init_process_group(
        backend=backend, timeout=datetime.timedelta(seconds=seconds)))
    try:
        yield td.group.WORLD, device
    finally:
        with contextlib.suppress(Exception):
            td.destroy_process_group()


def rank() -> int:
    """This process's rank in the default group (0 when not distributed)."""
    import torch.distributed as td

    return td.get_rank() if td.is_available() and td.is_initialized() else 0


def report_field(d: Dist) -> dict[str, Any]:
    return {"ranks": d.world, "backend": d.backend, "sharding": "batch i on rank i % ranks",
            "ablation": "batches sharded likewise; with fewer batches than ranks, unit j of each layer on rank j % ranks",
            "reduction": "metric states all-reduced with their declared sum/max/min; float64 sums"}


__all__ = ["Dist", "of", "phase", "shard", "Shard", "snapshot", "reduce_states", "reduce_ablation", "reduce_counts",
           "launched", "torchrun_env", "timeout_of", "rank", "DEFAULT_TIMEOUT"]
