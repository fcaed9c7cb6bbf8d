"""Residual blocks as units: which whole layers can go.

A block (found by ``fitcli.discovery.blocks``) is a module whose output has its input's shape and
whose input is added back to its output, or an item of an ``nn.ModuleList`` / ``nn.Sequential``
keeping its input's shape: it can be replaced by the identity. Per block:

- Block Influence (ShortGPT): ``1 − cos(x_in, x_out)`` per position (the cosine over features),
  averaged over every position of every sample; low = the block changes little;
- angular distance (Gromov et al.): ``arccos(cos(x_in, x_out)) / π``, averaged likewise;
- exact ablation: the mean loss change (and accuracy change) with the block replaced by the
  identity (its output is its input), by forward hooks: the model is never changed.

``greedy`` removes the block whose removal changes the loss least (|Δloss|), re-measures the rest
exactly with it removed, and repeats: the layer-removal curve, beside what Block Influence (lowest
first) would have removed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fitcli.data import Batch
from fitcli.discovery.blocks import (
    candidates,
    find_blocks,
    first_tensor,
    hooks,
    input_of,
    outermost,
)
from fitcli.errors import guarded
from fitcli.losses import LossFn, primary_output
from fitcli.progress import NO_PROGRESS, Progress


def _identity(out: Any, x: torch.Tensor) -> Any:
    """The block's output with its main tensor replaced by the block's input."""
    if isinstance(out, torch.Tensor):
        return x
    if isinstance(out, tuple):
        return (x, *out[1:])
    if isinstance(out, list):
        return [x, *out[1:]]
    return out


@dataclass
class BlockResult:
    names: list[str]
    influence: dict[str, float] = field(default_factory=dict)
    angular: dict[str, float] = field(default_factory=dict)
    delta: dict[str, float] = field(default_factory=dict)
    accuracy: dict[str, float] = field(default_factory=dict)
    base_loss: float = 0.0
    base_accuracy: float | None = None
    curve: list[dict[str, Any]] = field(default_factory=list)
    samples: int = 0
    batches: int = 0


def _cos_stats(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, float, int]:
    """Σ(1 − cos) and Σ angle/π over positions (cosine over the feature dimension: last for
    [batch, tokens, features], 1 for [batch, channels, ...]), and the number of positions."""
    x, y = x.detach().to(torch.float64), y.detach().to(torch.float64)
    dim = -1 if x.dim() == 3 or x.dim() == 2 else 1
    cos = torch.nn.functional.cosine_similarity(x, y, dim=dim, eps=1e-12).clamp(-1.0, 1.0)
    cos = torch.where((x == y).all(dim=dim), torch.ones_like(cos), cos)  # unchanged (even a zero vector): 1
    if mask is not None and cos.shape == mask.shape:
        cos = cos[mask.to(cos.device)]
    return float((1 - cos).sum()), float((torch.arccos(cos) / math.pi).sum()), cos.numel()


def _losses(model: nn.Module, batch: Batch, loss_fn: LossFn, accuracy: bool):
    out = model(*batch.args, **batch.kwargs)
    losses = loss_fn(out, batch).detach().to(torch.float64)
    correct = None
    if accuracy and batch.targets is not None:
        o = primary_output(out)
        correct = (o.argmax(dim=-1) == batch.targets.to(o.device)).to(torch.float64)
    return losses, correct


def _clone(out: Any) -> Any:
    """A copy of a block's output, so in-place code after the block cannot change the cache."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_clone(o) for o in out)
    return out


@contextlib.contextmanager
def replaced_forwards(modules: dict[str, nn.Module], forwards: dict[str, Any]) -> Iterator[None]:
    """Give modules another ``forward`` for a while (an instance attribute, removed afterwards;
    the weights are not touched). Used to replay cached block outputs instead of recomputing them."""
    saved: dict[str, Any] = {}
    try:
        for n, fn in forwards.items():
            m = modules[n]
            saved[n] = m.__dict__.get("forward", _MISSING)
            m.forward = fn
        yield
    finally:
        for n, old in saved.items():
            if old is _MISSING:
                modules[n].__dict__.pop("forward", None)
            else:
                modules[n].forward = old


_MISSING = object()


def take_rows(v: Any, rows: torch.Tensor, bsz: int) -> Any:
    """Rows ``rows`` of every tensor in ``v`` that carries the batch (``bsz``) in dim 0; anything
    else as it is (a mask shared by the batch, a cache object, None)."""
    if isinstance(v, torch.Tensor):
        return v.index_select(0, rows.to(v.device)) if v.dim() and v.shape[0] == bsz else v
    if isinstance(v, (tuple, list)):
        return type(v)(take_rows(x, rows, bsz) for x in v)
    return v


def prefix_blocks(model: nn.Module) -> list[str]:
    """The blocks ``BlockPrefix`` shares a prefix at: the outermost items of the model's module
    stacks (``nn.ModuleList`` / ``nn.Sequential``: the transformer layers), known without a
    forward. Replaying a module that finished before the ablated unit's block is exact whether or
    not it adds its input back: nothing it read depends on the unit. Empty for a non-module."""
    return outermost(candidates(model)) if isinstance(model, nn.Module) else []


class BlockPrefix:
    """Exact ablation of a unit inside a residual block, sharing the prefix at block granularity
    (for models torch.fx cannot trace). The unablated run of a batch records every block's output
    and the order they finished in; an ablated pass on rows of the batch (a sample per row, each
    row with its unit ablated) replays the blocks that finished before the unit's block from that
    record (their rows gathered) and runs the unit's block and every later one on the rows. The
    code between and after blocks (embeddings, masks, rotary tables, the final norm and head) runs
    on the rows as in a plain forward, so every later block receives the same keyword arguments
    (attention mask, position embeddings) it would in a hook-and-rerun loop: exact. Unusable
    (``block_of`` is None) for a layer outside every block, or when a block ran other than once."""

    def __init__(self, model: nn.Module, blocks: list[str]):
        self.modules = dict(model.named_modules())
        self.blocks = list(blocks)
        self.out: dict[str, Any] = {}
        self.order: list[str] = []

    def recording(self) -> contextlib.AbstractContextManager:
        """Forward hooks recording each block's output (a copy) during the unablated run."""
        def record(n):
            def fn(m, args, kwargs, out):
                self.out[n] = _clone(out)
                self.order.append(n)
            return fn
        return hooks(self.modules, {}, {n: record(n) for n in self.blocks})

    @classmethod
    def base_run(cls, graph: Any, blocks: list[str], layers: list[str], batch: Batch,
                 bi: int) -> tuple[BlockPrefix, dict[str, torch.Tensor], Any]:
        """The unablated forward of ``batch`` through ``graph`` (a ``ModelGraph``): the record, each
        of ``layers``' activation, and the outputs."""
        rec, held = cls(graph.runner, blocks), {}

        def hold(m):
            return lambda t: held.setdefault(m, t.detach())
        with rec.recording(), graph.tap({m: hold(m) for m in layers}):
            out = guarded(batch, graph, bi, graph, batch)
        return rec, held, out

    def block_of(self, layer: str) -> str | None:
        """The recorded block holding ``layer`` (its name is below the block's), if replay is exact."""
        inside = [b for b in self.blocks if layer.startswith(b + ".")]
        if not inside or len(set(self.order)) != len(self.order):
            return None
        b = max(inside, key=len)
        return b if b in self.order else None

    def replay(self, block: str, rows: torch.Tensor, bsz: int) -> contextlib.AbstractContextManager:
        """While open, the blocks that finished before ``block`` return their recorded outputs'
        ``rows`` instead of running."""
        before = self.order[: self.order.index(block)]
        return replaced_forwards(self.modules, {
            n: (lambda *a, _o=self.out[n], **k: take_rows(_o, rows, bsz)) for n in before})


class _Replay:
    """The unablated run of a batch, remembered block by block: each block's output, and the order
    the blocks finished in. Replacing block ``n`` by the identity leaves every block that finished
    before it unchanged, so their outputs are replayed from the cache instead of recomputed: an
    ablation costs the blocks after ``n`` (and the cheap code between blocks), not a whole forward.
    Exact: the replayed tensors are the ones the same inputs produced. Off when a block ran other
    than once (shared or conditional blocks), which falls back to rerunning everything."""

    def __init__(self, blocks: list[str]):
        self.blocks = blocks
        self.out: dict[str, Any] = {}
        self.order: list[str] = []

    def hooks(self) -> dict[str, Any]:
        def record(n):
            def fn(m, args, kwargs, out):
                self.out[n] = out
                self.order.append(n)
            return fn
        return {n: record(n) for n in self.blocks}

    @property
    def usable(self) -> bool:
        return sorted(self.order) == sorted(self.blocks)

    def forwards(self, target: str, removed: list[str]) -> dict[str, Any]:
        """``forward`` replacements for ablating ``target`` with ``removed`` already gone."""
        before = self.order[: self.order.index(target)]
        fw: dict[str, Any] = {n: (lambda *a, _o=self.out[n], **k: _clone(_o)) for n in before}

        def identity(n):
            def fn(*args, **kwargs):
                x = input_of(args, kwargs)
                return _identity(_clone(self.out[n]), x)
            return fn
        fw.update({n: identity(n) for n in [target, *removed] if n not in before})
        return fw


class _Influence:
    """Block Influence and angular distance sums per block, from forward hooks comparing each
    block's input and output (positions of padding left out by the batch's mask)."""

    def __init__(self, names: list[str]):
        self.sums = {n: [0.0, 0.0, 0] for n in names}
        self.seen: dict[str, torch.Tensor | None] = {}
        self.mask: torch.Tensor | None = None

    def pre(self) -> dict[str, Any]:
        def keep_in(n):
            def fn(m, args, kwargs):
                self.seen[n] = input_of(args, kwargs)
            return fn
        return {n: keep_in(n) for n in self.sums}

    def post(self) -> dict[str, Any]:
        def compare(n):
            def fn(m, args, kwargs, out):
                x, y = self.seen.pop(n, None), first_tensor(out)
                if x is not None and y is not None and x.shape == y.shape:
                    for k, v in enumerate(_cos_stats(x, y, self.mask)):
                        self.sums[n][k] += v
            return fn
        return {n: compare(n) for n in self.sums}


def _skip(m, args, kwargs, out):
    """A forward hook replacing the block's output by its input."""
    x = input_of(args, kwargs)
    return _identity(out, x) if x is not None else out


def measure(model: nn.Module, data: Iterable[Batch], names: list[str], loss_fn: LossFn, device: torch.device,
            accuracy: bool, removed: list[str] = (), influence: bool = True,
            progress: Progress = NO_PROGRESS) -> BlockResult:
    """Block Influence / angular distance of each block and the exact loss change with each block
    (in addition to ``removed``) replaced by the identity. The blocks before the one ablated are
    replayed from the unablated run (``_Replay``), not recomputed."""
    modules = dict(model.named_modules())
    res = BlockResult(list(names))
    inf = _Influence(names)
    dsum = dict.fromkeys(names, 0.0)
    asum = dict.fromkeys(names, 0.0)
    base_sum, base_acc = 0.0, 0.0
    gone = dict.fromkeys(removed, _skip)
    with torch.no_grad(), progress.task("blocks", None) as bar:
        for bi, cpu_batch in enumerate(data):
            batch = cpu_batch.to(device)
            inf.mask = batch.mask
            replay = _Replay([*names, *removed])
            with hooks(modules, inf.pre() if influence else {}, {**gone, **(inf.post() if influence else {})}), \
                    hooks(modules, {}, replay.hooks()):
                base, base_c = guarded(batch, None, bi, _losses, model, batch, loss_fn, accuracy)
            base_sum += float(base.sum())
            if base_c is not None:
                base_acc += float(base_c.sum())
            for n in names:
                ctx = replaced_forwards(modules, replay.forwards(n, list(removed))) if replay.usable \
                    else hooks(modules, {}, {**gone, n: _skip})
                with ctx:
                    losses, correct = guarded(batch, None, bi, _losses, model, batch, loss_fn, accuracy)
                dsum[n] += float((losses - base).sum())
                if correct is not None and base_c is not None:
                    asum[n] += float((correct - base_c).sum())
                bar.advance()
            del replay
            res.samples += batch.size
            res.batches += 1
    n_s = max(res.samples, 1)
    res.base_loss = base_sum / n_s
    res.base_accuracy = base_acc / n_s if accuracy else None
    for n in names:
        if influence and inf.sums[n][2]:
            res.influence[n] = inf.sums[n][0] / inf.sums[n][2]
            res.angular[n] = inf.sums[n][1] / inf.sums[n][2]
        res.delta[n] = dsum[n] / n_s
        if accuracy:
            res.accuracy[n] = asum[n] / n_s
    return res


def influence(model: nn.Module, data: Iterable[Batch], names: list[str], device: torch.device,
              progress: Progress = NO_PROGRESS) -> BlockResult:
    """Block Influence and angular distance of each block alone (no ablation): one forward per
    batch without gradients, comparing each block's input and output (as ``measure``)."""
    watch = InfluenceWatch(model, names)
    with torch.no_grad(), progress.task("blocks", None) as bar:
        for bi, cpu_batch in enumerate(data):
            batch = cpu_batch.to(device)
            with watch(batch):
                guarded(batch, None, bi, lambda b=batch: model(*b.args, **b.kwargs))
            bar.advance()
    return watch.result(complete=False)


class InfluenceWatch:
    """Block Influence and angular distance taken during another pass over the data (the audit's
    own forward): ``with watch(batch): model(...)`` hooks the blocks for that forward. ``result()``
    is None when some block was never seen (a traced model runs its blocks inlined): then
    ``influence`` takes its own pass."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.modules = dict(model.named_modules())
        self.names = list(names)
        self.inf = _Influence(self.names)
        self.samples = self.batches = 0

    @contextlib.contextmanager
    def __call__(self, batch: Batch) -> Iterator[None]:
        self.inf.mask = batch.mask
        with hooks(self.modules, self.inf.pre(), self.inf.post()):  # the comparisons detach
            yield
        self.inf.seen.clear()
        self.samples += batch.size
        self.batches += 1

    def result(self, complete: bool = True) -> BlockResult | None:
        """The blocks' scores; ``complete``: None unless every block was seen (else the blocks
        seen, as a pass of its own gives them)."""
        if complete and (not self.batches or any(not self.inf.sums[n][2] for n in self.names)):
            return None
        res = BlockResult(list(self.names), samples=self.samples, batches=self.batches)
        for n in (n for n in self.names if self.inf.sums[n][2]):
            res.influence[n] = self.inf.sums[n][0] / self.inf.sums[n][2]
            res.angular[n] = self.inf.sums[n][1] / self.inf.sums[n][2]
        return res


def greedy(model: nn.Module, data: Iterable[Batch], names: list[str], loss_fn: LossFn, device: torch.device,
           accuracy: bool, steps: int, first: BlockResult, progress: Progress = NO_PROGRESS) -> list[dict[str, Any]]:
    """Remove the least important block (its removal changes the loss least, |Δloss|), re-measure
    the rest exactly with it removed, repeat ``steps`` times."""
    curve = []
    removed: list[str] = []
    result = first
    by_bi = sorted(first.influence, key=lambda n: (first.influence[n], n))
    for step in range(1, min(steps, len(names)) + 1):
        left = [n for n in names if n not in removed]
        pick = min(left, key=lambda n: (abs(result.delta[n]), n))  # the least important: changes the loss least
        bi_pick = next((n for n in by_bi if n not in removed), None)
        removed.append(pick)
        curve.append({"step": step, "removed": pick, "loss": result.base_loss + result.delta[pick],
                      "delta_loss": result.base_loss + result.delta[pick] - first.base_loss,
                      "accuracy": (result.base_accuracy + result.accuracy[pick]) if accuracy else None,
                      "block_influence_pick": bi_pick, "block_influence": first.influence.get(pick)})
        rest = [n for n in names if n not in removed]
        if rest and step < steps:
            result = measure(model, data, rest, loss_fn, device, accuracy, removed=removed, influence=False,
                             progress=progress)
    return curve


__all__ = ["BlockPrefix", "BlockResult", "find_blocks", "greedy", "influence", "measure", "prefix_blocks",
           "replaced_forwards", "take_rows"]
