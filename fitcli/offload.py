"""Audits of models larger than memory: weights memory-mapped from safetensors, block by block.

``offloaded(module, max_bytes=..., source="model.safetensors")`` is a context manager under which
any audit runs unchanged (the engine, discovery and the metrics see the same parameter objects):

- every parameter's ``.data`` becomes a view into a private, read-only-in-practice memory map of
  the safetensors file (``mmap`` with copy-on-write access, never written). A view costs no
  memory until it is read; the kernel reads the pages in from the file on first touch;
- parameters are grouped: each block (an item of an ``nn.ModuleList`` / ``nn.Sequential`` made
  of modules: transformer layers, ResNet stages) is one group, every other module's own
  parameters another. A forward pre-hook on every module whose parameters lie in one group makes
  that group *resident* before it runs, and a torch function mode does the same for any other
  read of the file's tensors (weight metrics, a tied weight used by another module); when the
  resident groups would exceed ``max_bytes``, the least recently used ones are released
  (``madvise(MADV_DONTNEED)`` on every page but the resident groups': the process drops them and
  a later read faults them back in from the page cache or the file);
- with gradients, each block's forward runs under ``torch.utils.checkpoint`` (non-reentrant):
  only the block's input is kept, and the backward recomputes the block (its weights made
  resident again) in reverse block order. Weights saved for the backward outside a checkpointed
  block (a traced model, the head) make their group resident again when the backward unpacks
  them (``torch.autograd.graph.saved_tensors_hooks``);
- on exit every parameter gets its original ``.data`` back (the very tensor it had: bitwise
  identical), every hook and wrapper is removed and the mapping's pages are released.

Because a released page is dropped, never overwritten, a stale view (a weight the engine kept for
later, a tensor autograd saved) stays correct: reading it faults the page back in. Residency is a
memory bound, never a correctness condition. ``Offload.high_water`` is the most weight bytes the
offload held resident at once (measured in the hooks).

Bigger than the device is decided by ``needs_offload``: the model's parameter bytes against
``torch.cuda.mem_get_info`` (CUDA) or ``MemAvailable`` of ``/proc/meminfo`` (CPU).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import mmap
import os
import struct
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from fitcli.discovery.blocks import candidates
from fitcli.errors import InputError, UsageError
from fitcli.runtime import available_bytes

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
PAGE = mmap.PAGESIZE
HEADER_LIMIT = 100 * 1024 * 1024  # the safetensors format's own bound on the JSON header


def human(n: float) -> str:
    """Bytes as a short binary-prefixed size (``1.5 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - unreachable


# --------------------------------------------------------------------------------------------
# the file


@dataclass
class Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> dict[str, Entry]:
    """The tensors of a safetensors file: dtype, shape and absolute byte range of each."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise InputError(f"{path}: not a safetensors file (shorter than its header)")
            (n,) = struct.unpack("<Q", raw)
            if n > HEADER_LIMIT:
                raise InputError(f"{path}: not a safetensors file (header of {n} bytes)")
            head = json.loads(f.read(n))
        size = path.stat().st_size
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a safetensors file (its header is not JSON)") from e
    out = {}
    for key, v in head.items():
        if key == "__metadata__":
            continue
        dt = DTYPES.get(v.get("dtype"))
        if dt is None:
            raise InputError(f"{path}: tensor {key} has dtype {v.get('dtype')!r}, which torch cannot map")
        b, e = v["data_offsets"]
        out[key] = Entry(dt, tuple(v["shape"]), 8 + n + b, 8 + n + e)
        if out[key].end > size:
            raise InputError(f"{path}: tensor {key} lies past the end of the file (truncated?)")
    return out


# --------------------------------------------------------------------------------------------
# groups


@dataclass
class Group:
    """Parameters made resident together: one block, or one module's own parameters."""

    name: str
    params: list[nn.Parameter] = field(default_factory=list)
    ranges: list[tuple[int, int]] = field(default_factory=list)  # byte ranges in the file

    @property
    def nbytes(self) -> int:
        return sum(e - s for s, e in self.ranges)


def outermost_blocks(module: nn.Module) -> list[str]:
    """Blocks as ``fitcli.discovery.blocks`` lists them (items of ModuleList/Sequential made of modules),
    outermost only: a stack inside a block belongs to the block."""
    found = candidates(module)
    return [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]


def make_groups(module: nn.Module, blocks: list[str]) -> tuple[list[Group], dict[int, Group]]:
    """One group per block (its parameters, recursively), then one per module owning parameters
    outside every block. A parameter shared by several modules (tied weights) is in the first."""
    mods = dict(module.named_modules())
    unknown = [b for b in blocks if b not in mods]
    if unknown:
        raise UsageError(f"block {unknown[0]!r} is not a module of the model")
    groups: list[Group] = []
    owner: dict[int, Group] = {}

    def claim(g: Group, params: Iterator[nn.Parameter]) -> None:
        for p in params:
            if id(p) not in owner:
                owner[id(p)] = g
                g.params.append(p)
        if g.params:
            groups.append(g)

    for b in blocks:
        claim(Group(b), mods[b].parameters())
    for name, m in mods.items():
        claim(Group(name or "<root>"), m.parameters(recurse=False))
    return groups, owner


# --------------------------------------------------------------------------------------------
# the offload


class Offload:
    """The state of one offloaded module (see the module docstring). ``high_water``: the most
    weight bytes resident at once; ``loads``: how many times a group was made resident;
    ``recomputed``: block forwards the backward ran again (gradient checkpointing)."""

    def __init__(self, module: nn.Module, max_bytes: int, source: str | os.PathLike, *,
                 blocks: list[str] | None = None, checkpoint: bool = True):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0:
            raise UsageError(f"{{max_memory}} must be a positive number of bytes, not {max_bytes!r}", setting="max_memory")
        self.module, self.max_bytes, self.source = module, max_bytes, Path(source)
        self.blocks = outermost_blocks(module) if blocks is None else list(blocks)
        self.checkpoint = checkpoint
        self.groups, self._owner = make_groups(module, self.blocks)
        self.resident: OrderedDict[str, Group] = OrderedDict()
        self.resident_bytes = 0
        self.high_water = 0
        self.loads = 0
        self.checkpointed = 0  # block forwards run under a checkpoint
        self.block_runs = 0  # of those, runs of the block: the forward, and each recompute
        self.unchecked = 0  # block forwards not checkpointed: an argument with state (a KV cache)
        self.runs: list[str] = []  # the checkpointed blocks in the order they ran (forward, recompute)
        self._mm: mmap.mmap | None = None
        self._base = 0
        self._orig: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._handles: list[Any] = []
        self._forwards: list[tuple[nn.Module, Any]] = []
        self._starts: list[int] = []  # sorted group range starts (saved tensor -> group)
        self._ends: list[int] = []
        self._by_start: list[Group] = []

    @property
    def recomputed(self) -> int:
        return self.block_runs - self.checkpointed

    # ---- residency

    def ensure(self, g: Group) -> None:
        """Make ``g`` resident, releasing the least recently used groups to stay under the cap."""
        if g.name in self.resident:
            self.resident.move_to_end(g.name)
            return
        released = False
        while self.resident and self.resident_bytes + g.nbytes > self.max_bytes:
            _, old = self.resident.popitem(last=False)
            self.resident_bytes -= old.nbytes
            released = True
        self.resident[g.name] = g
        self.resident_bytes += g.nbytes
        self.loads += 1
        self.high_water = max(self.high_water, self.resident_bytes)
        if released:
            self._trim()
        self._willneed(g)

    def _willneed(self, g: Group) -> None:
        """Ask the kernel to read the group's pages into its cache now (not into this process)."""
        assert self._mm is not None
        for s, e in g.ranges:
            lo = s // PAGE * PAGE
            self._mm.madvise(mmap.MADV_WILLNEED, lo, e - lo)

    def _trim(self) -> None:
        """Drop from the process every page of the mapping but the resident groups' own. (A read
        fault maps up to 64 KiB of neighbouring cached pages, the kernel's fault-around, and
        groups share the pages at their tensors' ends: dropping one group's own pages alone would
        leave those behind.) A few hundred ``madvise`` calls at most, once per release."""
        assert self._mm is not None
        keep = sorted((s // PAGE, -(-e // PAGE)) for g in self.resident.values() for s, e in g.ranges)
        at = 0
        for lo, hi in [*keep, (self._pages, self._pages)]:
            if lo > at:
                self._mm.madvise(mmap.MADV_DONTNEED, at * PAGE, (lo - at) * PAGE)
            at = max(at, hi)

    def release_all(self) -> None:
        """Drop every page of the mapping and forget what was resident."""
        self.resident.clear()
        self.resident_bytes = 0
        if self._mm is not None:
            self._trim()

    def group_of(self, t: torch.Tensor) -> Group | None:
        """The group whose bytes ``t`` (a parameter or a view of one) lies in, else None."""
        if self._mm is None or t.device.type != "cpu" or t.is_sparse:
            return None
        try:
            ptr = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
        except (RuntimeError, NotImplementedError):  # a tensor without storage (functional wrappers)
            return None
        off = ptr - self._base
        if off < 0 or off >= len(self._mm):
            return None
        i = bisect.bisect_right(self._starts, off) - 1
        return self._by_start[i] if i >= 0 and off < self._ends[i] else None

    # ---- set up / undo

    def _map(self) -> None:
        """Check the file against the model, map it and point every parameter into it."""
        entries = read_header(self.source)
        names: dict[int, list[str]] = {}
        for n, p in self.module.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(n)
        plan = []
        for g in self.groups:
            for p in g.params:
                key = next((n for n in names[id(p)] if n in entries), None)
                if key is None:
                    raise InputError(f"{self.source}: no tensor for parameter {names[id(p)][0]}")
                e = entries[key]
                if e.shape != tuple(p.shape) or e.dtype != p.dtype:
                    raise InputError(f"{self.source}: {key} is {e.dtype} {list(e.shape)}, the model's parameter "
                                     f"is {p.dtype} {list(p.shape)}")
                if p.device.type != "cpu":
                    raise UsageError(f"parameter {key} is on {p.device}: offloading maps weights into CPU memory "
                                     "(a model built on the meta device: materialize it with to_empty(device='cpu'))")
                if e.start % e.dtype.itemsize:
                    raise InputError(f"{self.source}: {key} is not aligned to its dtype (a damaged file?)")
                plan.append((g, p, e))
        with open(self.source, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: never written back
        self._pages = -(-len(self._mm) // PAGE)
        self._base = torch.frombuffer(self._mm, dtype=torch.uint8, count=1).data_ptr()
        for g, p, e in plan:
            count = (e.end - e.start) // e.dtype.itemsize
            self._orig.append((p, p.data))
            if count == 0:  # an empty tensor: nothing to map
                p.data = torch.empty(e.shape, dtype=e.dtype)
                continue
            p.data = torch.frombuffer(self._mm, dtype=e.dtype, count=count, offset=e.start).view(e.shape)
            g.ranges.append((e.start, e.end))
        order = sorted(((s, e, g) for g in self.groups for s, e in g.ranges), key=lambda x: x[0])
        self._starts = [s for s, _, _ in order]
        self._ends = [e for _, e, _ in order]
        self._by_start = [g for _, _, g in order]

    def _hook(self, groups: list[Group]):
        def pre(mod, args):
            for g in groups:
                self.ensure(g)
        return pre

    def _install(self) -> None:
        """A pre-hook on every module whose parameters all lie in one group (and on every module
        owning parameters directly), and the block forwards wrapped in checkpoints."""
        for m in self.module.modules():
            mine = {id(self._owner[id(p)]): self._owner[id(p)] for p in m.parameters()}
            if len(mine) != 1:
                mine = {id(self._owner[id(p)]): self._owner[id(p)] for p in m.parameters(recurse=False)}
            if mine:
                self._handles.append(m.register_forward_pre_hook(self._hook(list(mine.values()))))
        if not self.checkpoint:
            return
        mods = dict(self.module.named_modules())
        for g in self.groups:
            if g.name in self.blocks:
                block = mods[g.name]
                self._forwards.append((block, block.__dict__.get("forward")))
                block.forward = self._checkpointed(block, g)

    def _checkpointed(self, block: nn.Module, g: Group):
        inner = block.forward  # bound (or the instance's own) forward

        def run(*args, **kwargs):
            self.block_runs += 1
            self.runs.append(g.name)
            self.ensure(g)  # the recompute in the backward calls this, not the module: no pre-hook
            return inner(*args, **kwargs)

        def forward(*args, **kwargs):
            if not torch.is_grad_enabled() or tracing():
                return inner(*args, **kwargs)
            if not all(map(plain, (*args, *kwargs.values()))):  # a cache the block appends to, say:
                self.unchecked += 1  # running it twice would change it, so no recompute
                return inner(*args, **kwargs)
            from torch.utils.checkpoint import checkpoint

            self.checkpointed += 1
            return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)

        return forward

    def touch(self, t: torch.Tensor) -> None:
        """``t`` is about to be read: make its group resident, if it is a view of the file."""
        g = self.group_of(t)
        if g is not None:
            self.ensure(g)

    def _unpack(self, t: torch.Tensor) -> torch.Tensor:
        self.touch(t)  # a weight autograd saved outside a checkpointed block: resident again
        return t

    def __enter__(self) -> Offload:
        try:
            self._map()
            largest = max(self.groups, key=lambda g: g.nbytes, default=None)
            if largest is not None and largest.nbytes > self.max_bytes:
                raise UsageError(f"{{max_memory}} {human(self.max_bytes)} is smaller than the largest block "
                                 f"({largest.name}: {human(largest.nbytes)} of weights)",
                                 hint=f"allow at least {human(largest.nbytes)}", setting="max_memory")
            self.release_all()
            self._install()
            self._saved = torch.autograd.graph.saved_tensors_hooks(lambda t: t, self._unpack)
            self._saved.__enter__()
            self._mode = Touch(self)
            self._mode.__enter__()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _undo(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for block, own in self._forwards:
            if own is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = own
        self._forwards.clear()
        for p, data in self._orig:
            p.data = data
        self._orig.clear()
        if self._mm is not None:
            self.release_all()
            self._mm = None  # views still alive elsewhere keep the mapping; it goes with them

    def __exit__(self, *exc: Any) -> None:
        mode, saved = self.__dict__.pop("_mode", None), self.__dict__.pop("_saved", None)
        try:
            if mode is not None:
                mode.__exit__(*exc)
            if saved is not None:
                saved.__exit__(*exc)
        finally:
            self._undo()


class Touch(TorchFunctionMode):
    """Every torch call reading a tensor of the file (a weight read outside a module's forward:
    weight metrics, a tied weight used by another module) makes its group resident first."""

    def __init__(self, off: Offload):
        super().__init__()
        self.off = off

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                self.off.touch(a)
            elif isinstance(a, (list, tuple)):
                for b in a:
                    if isinstance(b, torch.Tensor):
                        self.off.touch(b)
        return func(*args, **kwargs)


def plain(x: Any) -> bool:
    """Can a block called with ``x`` be run again (recomputed) with the same effect? Tensors,
    numbers, strings, None and containers of these can; any other object may be state the block
    changes (a key/value cache it appends to)."""
    if x is None or isinstance(x, (torch.Tensor, bool, int, float, str, torch.dtype, torch.device)):
        return True
    if isinstance(x, (tuple, list)):
        return all(map(plain, x))
    if isinstance(x, dict):
        return all(map(plain, x.values()))
    return False


def tracing() -> bool:
    """Is the module being traced (torch.fx, torch.compile)? Then no checkpoint around blocks."""
    try:
        from torch.fx._symbolic_trace import is_fx_symbolic_tracing as fx_tracing
    except ImportError:  # pragma: no cover - older torch
        from torch.fx._symbolic_trace import is_fx_tracing as fx_tracing
    return bool(fx_tracing() or torch.compiler.is_compiling())


@contextlib.contextmanager
def offloaded(module: nn.Module, *, max_bytes: int, source: str | os.PathLike, blocks: list[str] | None = None,
              checkpoint: bool = True) -> Iterator[Offload]:
    """Run anything on ``module`` with its weights memory-mapped from the safetensors file
    ``source`` (which must hold the module's parameters, by name) and at most ``max_bytes`` of
    them resident at once, block by block. The module is exactly as it was afterwards."""
    with Offload(module, max_bytes, source, blocks=blocks, checkpoint=checkpoint) as off:
        yield off


# --------------------------------------------------------------------------------------------
# does it fit?


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters (shared ones once)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def needs_offload(model: nn.Module | int, device: str | torch.device = "cpu", *, headroom: float = 0.8) -> bool:
    """Does the model (or a number of parameter bytes) not fit the device's free memory? Weights
    may take at most ``headroom`` of it (activations, gradients and torch need the rest)."""
    need = model if isinstance(model, int) else weight_bytes(model)
    free = available_bytes(device)
    return free is not None and need > headroom * free


def file_bytes(path: str | os.PathLike) -> int:
    """Bytes of the tensors of a safetensors file (its header read, nothing else)."""
    return sum(e.end - e.start for e in read_header(Path(path)).values())


def auto_max_bytes(nbytes: int, device: str | torch.device = "cpu", *, headroom: float = 0.8,
                   share: float = 0.5) -> int | None:
    """None when ``nbytes`` of weights fit the device (``needs_offload``), else the cap to
    offload them with: ``share`` of its free memory (the rest is for activations and torch)."""
    if not needs_offload(nbytes, device, headroom=headroom):
        return None
    free = available_bytes(device)
    return max(1, int(share * free)) if free else None


__all__ = ["Offload", "offloaded", "needs_offload", "auto_max_bytes", "available_bytes", "weight_bytes",
           "file_bytes", "read_header", "outermost_blocks", "human"]
