"""Conformance check for metrics, built-in or plugin: ``fitcli.testing.check_metric(cls)``.

It proves what the engine relies on:

- streaming over k batches equals one update on their concatenation (skipped for metrics whose
  definition is per batch, ``batch_dependent = True``, e.g. grad_norm);
- merging two halves equals the whole, in either order;
- ``prepare()`` followed by ``update()``, as the engine calls them, equals ``update()`` alone;
- ``reset()`` restores the defaults;
- ``compute()`` returns one finite float per unit that serialises to JSON;
- the declared contract is sound: a direction (``higher_is_better``) and only known needs.

Metrics that need ``ablation`` get random exact-ablation results through ``update_ablation``
alongside each batch.

Multi-pass metrics (entropy) are run pass by pass; between passes the shards' ``min``/``max``
states are combined, as ranks would ``all_reduce`` them.
"""

from __future__ import annotations

import json

import torch

from fitcli.metrics.base import Metric, Scratch, UnitBatch, contract_problems


def random_batches(units: int = 5, batches: int = 4, batch: int = 6, positions: int = 3, seed: int = 0,
                   fan_in: int = 7) -> list[UnitBatch]:
    """Plausible random inputs for any metric: activations with exact zeros, gradients, labels..."""
    g = torch.Generator().manual_seed(seed)
    base_size = batch
    weight = torch.randn(units, fan_in, generator=g, dtype=torch.float64)
    base = weight + 0.1 * torch.randn(units, fan_in, generator=g, dtype=torch.float64)
    consumer = torch.randn(3, units, generator=g, dtype=torch.float64)
    out = []
    for i in range(batches):
        # unequal batch sizes, so a mean of per-batch means cannot pass for a mean
        batch = max(2, base_size + (3 * i) % 5 - 2)
        act = torch.randn(batch, units, positions, generator=g, dtype=torch.float64).clamp_min(-0.5)
        act = torch.where(act < 0, torch.zeros_like(act), act)  # ReLU-like: exact zeros
        grad = torch.randn(batch, units, positions, generator=g, dtype=torch.float64)
        correct = torch.arange(batch) % 2 == (i % 2)  # both groups present in every batch
        wg = torch.randn(units, fan_in, generator=g, dtype=torch.float64)
        # head layers: attention probabilities [batch, heads = units, queries, keys], some queries padding
        attn = torch.softmax(2 * torch.randn(batch, units, positions, positions + 1, generator=g, dtype=torch.float64), -1)
        queries = torch.rand(batch, positions, generator=g) < 0.8
        queries[:, 0] = True
        out.append(UnitBatch(weight=weight, act=act, grad=grad, weight_grad=wg, baseline_weight=base,
                             consumer_weights=[consumer], correct=correct, attention=attn, query_mask=queries))
    return out


def random_ablation(batches: list[UnitBatch], seed: int = 0) -> list[tuple[torch.Tensor, int]]:
    """Plausible exact-ablation results to go with ``batches``: (Σ_x ΔL_x per unit, samples)."""
    g = torch.Generator().manual_seed(seed + 1)
    return [(torch.randn(b.act.shape[1], generator=g, dtype=torch.float64) * b.act.shape[0], b.act.shape[0])
            for b in batches]


def concat(batches: list[UnitBatch]) -> UnitBatch:
    b0 = batches[0]
    return UnitBatch(
        weight=b0.weight, baseline_weight=b0.baseline_weight, consumer_weights=b0.consumer_weights,
        act=torch.cat([b.act for b in batches]), grad=torch.cat([b.grad for b in batches]),
        weight_grad=sum(b.weight_grad * b.act.shape[0] for b in batches) / sum(b.act.shape[0] for b in batches),
        correct=torch.cat([b.correct for b in batches]),
        attention=torch.cat([b.attention for b in batches]), query_mask=torch.cat([b.query_mask for b in batches]),
    )


def _stream(m: Metric, batches: list[UnitBatch], p: int, ablation: list[tuple[torch.Tensor, int]]) -> None:
    for b, (delta, n) in zip(batches, ablation, strict=True):
        b.pass_index = p
        m.update(b)
        if p == 0 and "ablation" in m.needs:
            m.update_ablation(delta, n)


def _sync_extrema(a: Metric, b: Metric) -> None:
    for name, (_, reduce) in a._states.items():
        if reduce in ("max", "min"):
            op = torch.maximum if reduce == "max" else torch.minimum
            v = op(getattr(a, name), getattr(b, name))
            setattr(a, name, v.clone())
            setattr(b, name, v.clone())


def _close(a: torch.Tensor, b: torch.Tensor, what: str, name: str, rtol: float, atol: float) -> None:
    if a.shape != b.shape or not torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
        raise AssertionError(f"{name}: {what} differ:\n  {a.tolist()}\n  {b.tolist()}")


def _check_prepared(cls: type[Metric], name: str, ref: torch.Tensor, units: int, seed: int, passes: int,
                    abl: list[tuple[torch.Tensor, int]], rtol: float, atol: float) -> None:
    """The engine calls prepare() during the forward, on a batch with a scratch pool: same answer."""
    prepared = cls(units)
    fresh_batches = random_batches(units=units, seed=seed)
    pool = Scratch()
    for p in range(passes):
        for b in fresh_batches:
            b.pass_index, b.scratch = p, pool
            prepared.prepare(b)
            prepared.update(b)
        if p == 0 and "ablation" in cls.needs:
            for delta, n in abl:
                prepared.update_ablation(delta, n)
    _close(prepared.compute(), ref, "prepare() then update() (as the engine calls them) and update() alone", name, rtol, atol)


def _check_concat(cls: type[Metric], name: str, ref: torch.Tensor, units: int, passes: int,
                  batches: list[UnitBatch], abl: list[tuple[torch.Tensor, int]], rtol: float, atol: float) -> None:
    one = cls(units)
    cat = concat(batches)
    for p in range(passes):
        cat.pass_index = p
        one.update(cat)
        if p == 0 and "ablation" in cls.needs:
            one.update_ablation(sum(d for d, _ in abl), sum(n for _, n in abl))
    _close(one.compute(), ref, "streaming over batches and one update on their concatenation", name, rtol, atol)


def _check_merge(cls: type[Metric], name: str, ref: torch.Tensor, units: int, passes: int,
                 batches: list[UnitBatch], abl: list[tuple[torch.Tensor, int]], rtol: float, atol: float) -> None:
    for order in ("ab", "ba"):
        a, b = cls(units), cls(units)
        for p in range(passes):
            _stream(a, batches[:2], p, abl[:2])
            _stream(b, batches[2:], p, abl[2:])
            if p < passes - 1:
                _sync_extrema(a, b)
        merged = a.merge(b) if order == "ab" else b.merge(a)
        _close(merged.compute(), ref, f"merge of halves ({order}) and the whole", name, rtol, atol)


def _check_reset(cls: type[Metric], name: str, units: int, passes: int, batches: list[UnitBatch],
                 abl: list[tuple[torch.Tensor, int]]) -> None:
    fresh = cls(units)
    used = cls(units)
    for p in range(passes):
        _stream(used, batches, p, abl)
    used.reset()
    for sname in fresh._states:
        if not torch.equal(getattr(fresh, sname), getattr(used, sname)):
            raise AssertionError(f"{name}: reset() did not restore state {sname!r}")
    for sname, (_, reduce) in fresh._states.items():
        if reduce not in ("sum", "max", "min"):
            raise AssertionError(f"{name}: state {sname!r} has merge rule {reduce!r}")


def check_metric(cls: type[Metric], units: int = 5, seed: int = 0, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    """Raise AssertionError describing the first property ``cls`` breaks."""
    name = getattr(cls, "name", None) or getattr(cls, "__name__", repr(cls))
    problems = contract_problems(cls)
    if problems:
        raise AssertionError(f"{name}: breaks the metric contract: " + "; ".join(problems))
    batches = random_batches(units=units, seed=seed)
    abl = random_ablation(batches, seed)
    passes = max(1, int(getattr(cls, "passes", 1)))

    whole = cls(units)
    for p in range(passes):
        _stream(whole, batches, p, abl)
    ref = whole.compute()
    if not isinstance(ref, torch.Tensor) or ref.shape != (units,):
        raise AssertionError(f"{name}: compute() must give a tensor of shape ({units},), got {getattr(ref, 'shape', type(ref))}")
    if not torch.isfinite(ref).all():
        raise AssertionError(f"{name}: compute() gave non-finite values on ordinary data: {ref.tolist()}")
    json.dumps([float(v) for v in ref.tolist()], allow_nan=False)
    _check_prepared(cls, name, ref, units, seed, passes, abl, rtol, atol)
    if not getattr(cls, "batch_dependent", False):
        _check_concat(cls, name, ref, units, passes, batches, abl, rtol, atol)
    _check_merge(cls, name, ref, units, passes, batches, abl, rtol, atol)
    _check_reset(cls, name, units, passes, batches, abl)


__all__ = ["check_metric", "random_batches", "random_ablation", "concat"]
