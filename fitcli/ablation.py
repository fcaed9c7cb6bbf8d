"""Exact batched ablation. The model's weights are never touched: a unit is masked at its
activation point, in a copy of the activation.

Per data batch and layer:

1. the whole graph runs once (``torch.fx.Interpreter``, values kept): the prefix, the unit
   activations ``h`` and the base per-sample losses;
2. for a chunk of K units, ``h`` is expanded to K copies along the batch, copy k with unit k
   masked (zero, or its mean over the data), and only the *suffix* of the graph (the nodes that
   depend on ``h``) runs on the K·B batch; values the suffix reads from the prefix (e.g. a
   residual stream) are repeated K times;
3. when ``h`` feeds a Linear directly, that Linear's output for copy k is its base output minus
   ``(h_k − v) · W[:, k]``: a rank-1 update instead of a K·B matmul.

Models that do not trace (Hugging Face transformers) share the prefix at block granularity
(``residual.BlockPrefix``: the blocks before the unit's block run once per batch, the rest per
chunk); a unit in no block expands the *input* K times. The report says which ran. K comes from
free memory (CUDA free memory or available RAM), halves on out-of-memory, or ``--chunk-size``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from fitcli import distributed
from fitcli.data import Batch
from fitcli.discovery import Layer, ModelGraph, getattr_path, token_mask
from fitcli.errors import InputError, RuntimeAuditError, UsageError, first_line, guarded, is_oom
from fitcli.losses import LossFn, primary_output
from fitcli.progress import NO_PROGRESS, Progress
from fitcli.residual import BlockPrefix, prefix_blocks
from fitcli.runtime import available_bytes

CPU_CHUNK_BYTES = 192 << 20
BLOCKS_KEY = "\0blocks"  # the plans' entry holding the residual blocks (a name no layer has)


class AblationResult:
    """Sums over the data of each unit's loss change (and accuracy change) when it is ablated."""

    def __init__(self, names: list[str], units: dict[str, int], device: torch.device):
        def zeros(n: str) -> torch.Tensor:
            return torch.zeros(units[n], dtype=torch.float64, device=device)

        self.delta_sum: dict[str, torch.Tensor] = {n: zeros(n) for n in names}
        self.acc_sum: dict[str, torch.Tensor] = {n: zeros(n) for n in names}
        self.whole_sum: dict[str, float] = dict.fromkeys(names, 0.0)
        self.whole_acc: dict[str, float] = dict.fromkeys(names, 0.0)
        self.samples = 0
        self.batches = 0
        self.method: dict[str, str] = {}
        self.chunk_sizes: dict[str, int] = {}
        self.notes: list[str] = []
        self.accuracy_known = False  # accuracy changes were measured (class targets)
        self.partition: str | None = None  # across ranks: "batches" (sharded) or "units" (partitioned)

    def delta(self, name: str) -> torch.Tensor:
        """Mean loss change per unit, ``[units]`` float64 on the CPU."""
        return (self.delta_sum[name] / max(self.samples, 1)).cpu()

    def accuracy(self, name: str) -> torch.Tensor:
        return (self.acc_sum[name] / max(self.samples, 1)).cpu()

    def layer_delta(self, name: str) -> float:
        return self.whole_sum[name] / max(self.samples, 1)

    def layer_accuracy(self, name: str) -> float:
        return self.whole_acc[name] / max(self.samples, 1)


def free_bytes(device: torch.device) -> int:
    """Free memory of the device (2 GiB when it cannot be known)."""
    free = available_bytes(device)
    return free if free is not None else 2 << 30


def _tensors_nbytes(values: Any) -> int:
    if isinstance(values, torch.Tensor):
        return values.numel() * values.element_size()
    if isinstance(values, (tuple, list)):
        return sum(_tensors_nbytes(v) for v in values)
    if isinstance(values, dict):
        return sum(_tensors_nbytes(v) for v in values.values())
    return 0


# --------------------------------------------------------------------------------------------
# graph (fx / export) plan


class _Interp(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=False)


@dataclass
class _Plan:
    gm: fx.GraphModule
    probe: fx.Node
    start: fx.Node  # node whose value we replace with the expanded one
    dep: set[fx.Node]
    frontier: list[fx.Node]
    batch_nodes: set[fx.Node]  # nodes whose values carry the batch in dim 0
    linear_weight: torch.Tensor | None  # rank-1 shortcut when start is a Linear reading h


def _descendants(nodes: list[fx.Node], root: fx.Node) -> set[fx.Node]:
    dep = {root}
    for n in nodes:
        if n in dep:
            continue
        if any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    return dep


def make_plan(graph: ModelGraph, layer: Layer) -> _Plan | None:
    gm = graph.runner
    if graph.method not in ("fx", "export") or not isinstance(gm, fx.GraphModule):
        return None
    probe_mod = graph.probes.get(layer.name)  # none for recurrent layers: they run inside their module
    if probe_mod is None:
        return None
    nodes = list(gm.graph.nodes)
    probe = next((n for n in nodes if n.op == "call_module" and gm.get_submodule(str(n.target)) is probe_mod), None)
    if probe is None:
        return None
    # nodes derived from the inputs carry the batch dimension
    batch_nodes: set[fx.Node] = set()
    for n in nodes:
        if n.op == "placeholder" or any(a in batch_nodes for a in n.all_input_nodes):
            batch_nodes.add(n)
    start, weight = probe, None
    users = list(probe.users)
    if len(users) == 1 and users[0].args and users[0].args[0] is probe and layer.unit_dim == -1 and not layer.head_dim:
        u = users[0]
        if u.op == "call_module" and isinstance(gm.get_submodule(str(u.target)), nn.Linear):
            start, weight = u, gm.get_submodule(str(u.target)).weight
        elif (u.op == "call_function" and getattr(getattr(u.target, "_schema", None), "name", "") == "aten::linear"
              and len(u.args) > 1 and isinstance(u.args[1], fx.Node) and u.args[1].op == "get_attr"):
            start, weight = u, getattr_path(gm, str(u.args[1].target))
    dep = _descendants(nodes, start)
    # values the suffix reads from the prefix; start's own inputs are not read (its value is given)
    frontier = [n for n in nodes if n not in dep and any(u in dep and u is not start for u in n.users)]
    return _Plan(gm, probe, start, dep, frontier, batch_nodes, weight)


class _NotBatchFirst(Exception):
    pass


# --------------------------------------------------------------------------------------------
# the engine


def _losses_correct(outputs: Any, batch: Batch, loss_fn: LossFn, accuracy: bool, reference: Any = None):
    """Per-sample losses (and correctness). A loss that compares with the unablated output
    (``reference = True``: the output-change loss) gets it as ``reference``; None means these are
    the unablated outputs themselves, whose change is 0."""
    if getattr(loss_fn, "reference", False):
        n = primary_output(outputs).shape[0]
        losses = (torch.zeros(n, dtype=torch.float64, device=primary_output(outputs).device) if reference is None
                  else loss_fn.change(outputs, reference, batch).detach().to(torch.float64))
    else:
        losses = loss_fn(outputs, batch).detach().to(torch.float64)
    correct = None
    targets = batch.targets
    out = primary_output(outputs) if accuracy and targets is not None else None
    if out is not None and targets.dim() == 1 and out.dim() == 2:
        correct = (out.argmax(dim=-1) == targets.to(out.device)).to(torch.float64)
    return losses, correct


def unit_means(graph: ModelGraph, names: list[str], layers: dict[str, Layer], data: Iterable[Batch],
               device: torch.device, group: Any = None) -> dict[str, torch.Tensor]:
    """E[h_i] over every observation of the data, per layer (a streamed sum + count). With a
    process group each rank sums its shard and the sums and counts are all-reduced first."""
    d = group if group is None or isinstance(group, distributed.Dist) else distributed.of(group)
    with distributed.phase(d):
        sums, counts = _unit_sums(graph, names, layers, distributed.shard(data, d), device)
    if d is not None:
        got = distributed.all_reduce(d, [sums[n] for n in names]
                                     + [torch.tensor([float(counts[n]) for n in names], dtype=torch.float64)])
        sums = dict(zip(names, got[:-1], strict=True))
        counts = dict(zip(names, (int(c) for c in got[-1].tolist()), strict=True))
    return {n: (sums[n] / max(counts[n], 1)) for n in names}


def _unit_sums(graph: ModelGraph, names: list[str], layers: dict[str, Layer], data: Iterable[Batch],
               device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    sums = {n: torch.zeros(layers[n].units, dtype=torch.float64, device=device) for n in names}
    counts = dict.fromkeys(names, 0)
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def grab(n):
        def fn(t):
            v = layers[n].view(t.detach()).to(torch.float64)  # [B, U, P]
            m = token_mask(t, layers[n], current["mask"])
            if m is not None:  # padding is not an observation
                v = v.masked_fill(~m[:, None, :], 0.0)
                counts[n] += int(m.sum())
            else:
                counts[n] += v.shape[0] * v.shape[2]
            sums[n] += v.sum(dim=(0, 2))
            return t
        return fn

    with torch.no_grad(), graph.tap({n: grab(n) for n in names}):
        for i, b in enumerate(data):
            b = b.to(device)
            current["mask"] = b.mask
            guarded(b, graph, i, graph, b)
    return sums, counts


@dataclass
class _Job:
    """One layer on one batch: the base activation and outputs, and how to run ablated rows."""

    lay: Layer
    h: torch.Tensor  # the activation at the unit's point, [batch, ...]
    base_out: Any
    run: Callable[[torch.Tensor, torch.Tensor], Any]  # (row samples, row units) -> outputs
    plan: _Plan | None
    base: Any  # the graph plan's (env, h), or None
    value: torch.Tensor | None  # the ablation value per unit (mean mode), None for zero


def _job(graph: ModelGraph, plans: dict[str, _Plan | None], n: str, lay: Layer, batch: Batch, bi: int,
         value: torch.Tensor | None, res: AblationResult, cache: dict | None = None) -> _Job:
    """Stage 1 (plan, per batch): the prefix once; the suffix (or the whole input, when the graph
    cannot be split at the unit) is what each chunk of ablated units reruns."""
    plan = plans[n]
    if plan is not None:
        base = guarded(batch, graph, bi, _graph_base, plan, batch, cache)
        try:
            _check_batch_first(plan, base, batch.size)
        except _NotBatchFirst:
            plans[n] = plan = None
    if plan is not None:
        env, h = base
        res.method[n] = "graph-suffix" + ("+rank1" if plan.linear_weight is not None else "")
        return _Job(lay, h, env[_output_node(plan.gm)],
                    lambda rb, ru: _graph_rows(plan, env, h, rb, ru, lay, value), plan, base, value)
    job = _prefix_job(graph, plans, n, lay, batch, bi, value, res, cache)
    if job is not None:
        return job
    if res.method.get(n) != "input-expansion":
        res.notes.append(f"ablation of {n}: the model's graph could not be split at the unit, "
                         "so the whole input is expanded per chunk (slower, same result)")
    res.method[n] = "input-expansion"
    held: list[torch.Tensor] = []
    with ablation_point(graph, lay, lambda t: (held.append(t.detach()), t)[1]):
        base_out = guarded(batch, graph, bi, graph, batch)
    h = held[0] if len(held) == 1 else lay.kind.stack_writes(held)  # hidden channels: every write into the stream
    return _Job(lay, h, base_out, lambda rb, ru: _input_rows(graph, batch, rb, ru, lay, value), None, None, value)


def ablation_point(graph: ModelGraph, lay: Layer, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Where ``lay``'s units are masked: its activation point, or the places its kind names
    (``ablation_tap``: hidden channels are zeroed at every write into the residual stream)."""
    own = getattr(lay.kind, "ablation_tap", None)
    if own is None:
        return graph.tap({lay.name: fn})
    return own(dict(graph.runner.named_modules()), lay, fn)


def _prefix_job(graph: ModelGraph, plans: dict[str, _Plan | None], n: str, lay: Layer, batch: Batch, bi: int,
                value: torch.Tensor | None, res: AblationResult, cache: dict | None) -> _Job | None:
    """Stage 1 without a graph: the prefix shared at block granularity (``BlockPrefix``), one
    unablated run per batch for every layer ablated this way; None for a layer in no block."""
    blocks, key = plans.get(BLOCKS_KEY), ("block-prefix", id(batch))
    if not blocks or cache is None or res.method.get(n) == "input-expansion":
        return None
    if key not in cache or n not in cache[key][1]:
        cache[key] = BlockPrefix.base_run(graph, blocks, [m for m, p in plans.items() if p is None], batch, bi)
    (rec, held, out), block = cache[key], cache[key][0].block_of(n)
    if block is None or n not in held:
        return None
    if res.method.get(n) != "block-prefix":
        res.notes.append(f"ablation of {n}: no graph to split; the blocks before {block} run once per batch")
    res.method[n] = "block-prefix"

    def run(rb: torch.Tensor, ru: torch.Tensor) -> Any:
        with rec.replay(block, rb, batch.size), graph.tap({n: lambda t: _set_units(t, ru, value, lay)}):
            return graph(batch.select(rb))
    return _Job(lay, held[n], out, run, None, None, value)


def _chunk(job: _Job, batch: Batch, us: list[int], loss_fn: LossFn, accuracy: bool, dev: torch.device):
    """Stage 3 (run): the rows of one chunk of units, each with its unit ablated -> (rows' unit
    index in the chunk, rows' sample, losses, correct)."""
    row_k, row_b = changed_rows(job.h, us, job.lay, job.value)
    if not row_b.numel():
        return row_k, row_b, torch.zeros(0, dtype=torch.float64, device=dev), None
    us_t = torch.tensor(us, device=dev, dtype=torch.long)
    outs = job.run(row_b, us_t[row_k])
    losses, correct = _losses_correct(outs, batch.select(row_b), loss_fn, accuracy,
                                      primary_output(job.base_out).index_select(0, row_b))
    return row_k, row_b, losses, correct


def _run_layer(job: _Job, batch: Batch, todo: list[int], k: int, loss_fn: LossFn, accuracy: bool,
               dev: torch.device, res: AblationResult, bar) -> int:
    """Stage 2 (chunk): the selected units in chunks of ``k`` (halved on out-of-memory); returns
    the chunk size that worked."""
    n = job.lay.name
    base_losses, base_correct = _losses_correct(job.base_out, batch, loss_fn, accuracy)
    i = 0
    while i < len(todo):
        us = todo[i : i + k]
        try:
            row_k, row_b, losses, correct = _chunk(job, batch, us, loss_fn, accuracy, dev)
        except Exception as e:
            if is_oom(e) and k > 1:
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                k = max(1, k // 2)
                continue
            if isinstance(e, (InputError, RuntimeAuditError)):
                raise
            raise RuntimeAuditError(f"ablation of {n} failed: {type(e).__name__}: {first_line(e)}") from e
        # a row is (unit, sample); samples where the unit already had the ablated value everywhere
        # are unchanged by the ablation: their loss change is exactly 0
        us_t = torch.tensor(us, device=dev, dtype=torch.long)
        d = torch.zeros(len(us), dtype=torch.float64, device=dev)
        d.index_add_(0, row_k, losses - base_losses[row_b])
        res.delta_sum[n][us_t] += d
        if correct is not None:
            dc = torch.zeros(len(us), dtype=torch.float64, device=dev)
            dc.index_add_(0, row_k, correct - base_correct[row_b])
            res.acc_sum[n][us_t] += dc
        i += len(us)
        bar.advance()
    return k


def _run_whole(graph: ModelGraph, job: _Job, batch: Batch, bi: int, units: list[int], loss_fn: LossFn,
               accuracy: bool, res: AblationResult) -> None:
    """``--whole-layer``: every selected unit of the layer ablated at once."""
    n = job.lay.name
    base_losses, base_correct = _losses_correct(job.base_out, batch, loss_fn, accuracy)
    outs = guarded(batch, graph, bi, _whole, graph, job.plan, job.base, batch, job.lay, job.value, units, job.h)
    wl, wc = _losses_correct(outs, batch, loss_fn, accuracy, primary_output(job.base_out))
    res.whole_sum[n] += float((wl - base_losses).sum())
    if wc is not None:
        res.whole_acc[n] += float((wc - base_correct).sum())


def ablate_layers(
    graph: ModelGraph,
    names: list[str],
    data: Iterable[Batch],
    loss_fn: LossFn,
    mode: str = "zero",
    device: torch.device | str = "cpu",
    chunk_size: int | None = None,
    progress: Progress = NO_PROGRESS,
    units: dict[str, list[int] | None] | None = None,
    whole_layer: bool = False,
    accuracy: bool = False,
    group: Any = None,
) -> AblationResult:
    """Exact ablation of every (selected) unit of each named layer over all of ``data``: per batch
    and layer, plan (the prefix once), chunk (units per pass from free memory), run (the suffix
    on the changed rows).

    ``group``: a process group. Each rank ablates every selected unit on its shard of the batches
    (batch i on rank i % world) and the float64 sums and counts are all-reduced: every rank ends
    with the single-process result (to float64 rounding). With fewer batches than ranks the units
    are partitioned instead (unit j of a layer's selection on rank j % world; every rank reads every
    batch; whole layers on rank 0): the sums of disjoint units add up to the same result. Mean mode
    all-reduces the means first."""
    d = group if group is None or isinstance(group, distributed.Dist) else distributed.of(group)
    dev = torch.device(device)
    layers = {lay.name: lay for lay in graph.layers}
    units = units or {}
    sel = {n: (units.get(n) if units.get(n) is not None else list(range(layers[n].units))) for n in names}
    zero_only = [n for n in names if getattr(layers[n].kind, "ablation_tap", None) is not None]
    if mode == "mean" and zero_only:
        raise UsageError(f"layer {zero_only[0]}: hidden channels are ablated by zeroing them in the residual "
                         "stream; {ablation_mode} 'mean' is not defined for them", setting="ablation_mode")
    means = unit_means(graph, names, layers, data, dev, group=d) if mode == "mean" else {}
    res = AblationResult(names, {n: layers[n].units for n in names}, dev)
    res.accuracy_known = accuracy
    total = getattr(data, "total", None)
    by_units = d is not None and total is not None and total < d.world
    if by_units:  # fewer batches than ranks: each rank reads them all and ablates its share of the units
        mine, local = {n: sel[n][d.rank::d.world] for n in names}, data
    else:
        mine, local = sel, distributed.shard(data, d)
    with distributed.phase(d):
        _ablate_batches(graph, names, layers, mine, local, loss_fn, dev, chunk_size, progress,
                        whole_layer and not (by_units and d.rank != 0), accuracy, means, res, whole_units=sel)
    if d is not None:
        distributed.reduce_ablation(d, res, counts=not by_units)
    res.partition = "units" if by_units else ("batches" if d is not None else None)
    if res.batches == 0:
        raise InputError(f"data {getattr(data, 'spec', '')}: yields no batches (empty data)")
    if getattr(loss_fn, "kind", None):
        res.notes.append(f"ablation loss: how far the model's output moves ({loss_fn.kind}); the data has no targets")
    return res


def _ablate_batches(graph: ModelGraph, names: list[str], layers: dict[str, Layer], sel: dict[str, list[int]],
                    data: Iterable[Batch], loss_fn: LossFn, dev: torch.device, chunk_size: int | None,
                    progress: Progress, whole_layer: bool, accuracy: bool, means: dict, res: AblationResult,
                    whole_units: dict[str, list[int]] | None = None) -> None:
    plans: dict = {n: make_plan(graph, layers[n]) for n in names}
    total = getattr(data, "total", None)
    chunks = total * sum(-(-len(sel[n]) // chunk_size) for n in names) if total and chunk_size else None
    with torch.no_grad(), progress.task("ablating", chunks) as bar:
        cache: dict = {}  # the unablated run of the batch, shared by every layer
        for bi, cpu_batch in enumerate(data):
            batch = cpu_batch.to(dev)
            if BLOCKS_KEY not in plans:  # where a graph cannot be split: blocks to share the prefix at
                plans[BLOCKS_KEY] = prefix_blocks(graph.runner) if None in plans.values() else []
            for n in names:
                job = _job(graph, plans, n, layers[n], batch, bi, means.get(n), res, cache)
                k = chunk_size or res.chunk_sizes.get(n) or _auto_chunk(job.h, job.plan, job.base, len(sel[n]), dev)
                res.chunk_sizes[n] = _run_layer(job, batch, sel[n], k, loss_fn, accuracy, dev, res, bar)
                if whole_layer:
                    _run_whole(graph, job, batch, bi, (whole_units or sel)[n], loss_fn, accuracy, res)
            res.samples += batch.size
            res.batches += 1
            cache.clear()


def changed_rows(h: torch.Tensor, us: list[int], lay: Layer, value: torch.Tensor | None):
    """(unit-in-chunk, sample) pairs whose activation differs from the ablation value somewhere.

    Only those rows need the suffix: elsewhere the ablated and the original activations are the
    same tensor values, so the loss change is exactly zero (a ReLU unit that is off for a sample).
    """
    idx = torch.tensor(us, device=h.device, dtype=torch.long)
    hu = lay.units_view(h).index_select(1, idx)  # [B, K, ...positions]
    hu = hu.reshape(hu.shape[0], hu.shape[1], -1)
    if value is None:
        changed = (hu != 0).any(dim=2)
    else:
        changed = (hu != value.to(hu.dtype).index_select(0, idx).reshape(1, -1, 1)).any(dim=2)
    rows = changed.t().nonzero()  # [R, 2]: (k, b), grouped by unit
    return rows[:, 0], rows[:, 1]


def _targets_for(value: torch.Tensor | None, row_unit: torch.Tensor, dtype) -> torch.Tensor:
    if value is None:
        return torch.zeros(row_unit.numel(), dtype=dtype, device=row_unit.device)
    return value.to(row_unit.device, dtype).index_select(0, row_unit)


def _set_units(h_rows: torch.Tensor, row_unit: torch.Tensor, value, lay: Layer) -> torch.Tensor:
    """Copy of ``h_rows`` ([R, ...]) with row r's unit ``row_unit[r]`` set to its ablation value."""
    out = h_rows.clone()
    view = lay.units_view(out)  # [R, U, ...positions], a view of out
    tgt = _targets_for(value, row_unit, out.dtype)
    r = torch.arange(out.shape[0], device=out.device)
    view[r, row_unit] = tgt.reshape(-1, *([1] * (view.dim() - 2))).expand_as(view[r, row_unit])
    return out


def _index_rows(v: Any, rows: torch.Tensor, batch: int) -> Any:
    if isinstance(v, torch.Tensor):
        if v.dim() == 0 or v.shape[0] != batch:
            raise _NotBatchFirst()
        return v.index_select(0, rows)
    if isinstance(v, (tuple, list)):
        return type(v)(_index_rows(x, rows, batch) for x in v)
    return v


def _graph_rows(plan: _Plan, env: dict, h: torch.Tensor, row_b: torch.Tensor, row_unit: torch.Tensor,
                lay: Layer, value):
    """Run the suffix on one row per (unit, sample) pair, each with its unit ablated."""
    bsz = h.shape[0]
    if plan.linear_weight is not None:
        z = env[plan.start]  # [B, ..., out]
        hu = h.movedim(lay.unit_dim, 1)[row_b, row_unit]  # [R, ...middle]
        dh = hu - _targets_for(value, row_unit, hu.dtype).reshape(-1, *([1] * (hu.dim() - 1)))
        wc = plan.linear_weight.detach().index_select(1, row_unit).t().to(z.dtype)  # [R, out]
        start_val = torch.addcmul(z.index_select(0, row_b), dh.unsqueeze(-1),
                                  wc.reshape(wc.shape[0], *([1] * (z.dim() - 2)), -1), value=-1)
    else:
        start_val = _set_units(h.index_select(0, row_b), row_unit, value, lay)
    return _run_suffix(plan, env, row_b, bsz, {plan.start: start_val})


def _run_suffix(plan: _Plan, env: dict, row_b: torch.Tensor, bsz: int, given: dict):
    """Evaluate only the nodes that depend on the ablated unit, on the rows ``row_b``: every other
    value comes from the base run (those the suffix reads are gathered to the rows)."""
    init = {}
    for n, v in env.items():
        if n in plan.dep:
            continue
        init[n] = _index_rows(v, row_b, bsz) if (n in plan.frontier and n in plan.batch_nodes) else v
    init.update(given)
    interp = fx.Interpreter(plan.gm)
    placeholders = [n for n in plan.gm.graph.nodes if n.op == "placeholder"]
    return interp.run(*[init.get(p) for p in placeholders], initial_env=init)


def _set_all(t: torch.Tensor, units: list[int], value, lay: Layer) -> torch.Tensor:
    """Copy of ``t`` with every unit in ``units`` set to its ablation value, for every sample."""
    out = t.clone()
    view = lay.units_view(out)  # [B, U, ...positions]
    idx = torch.tensor(units, device=t.device, dtype=torch.long)
    tgt = _targets_for(value, idx, out.dtype)
    view[:, idx] = tgt.reshape(1, -1, *([1] * (view.dim() - 2))).expand_as(view[:, idx])
    return out


def _whole(graph: ModelGraph, plan: _Plan | None, base, batch: Batch, lay: Layer, value, units: list[int], h):
    """Outputs with all ``units`` of the layer ablated at once (``--whole-layer``)."""
    if plan is not None:
        env, hh = base
        # the probe's value is replaced; the suffix (including a rank-1 plan's Linear) recomputes
        rows = torch.arange(batch.size, device=hh.device)
        return _run_suffix(plan, env, rows, batch.size, {plan.probe: _set_all(hh, units, value, lay)})
    with ablation_point(graph, lay, lambda t: _set_all(t, units, value, lay)):
        return graph(batch)


def _input_rows(graph: ModelGraph, batch: Batch, row_b: torch.Tensor, row_unit: torch.Tensor, lay: Layer, value):
    """Fallback: run the whole model on the rows' samples, each row with its unit ablated."""
    big = batch.select(row_b)
    with ablation_point(graph, lay, lambda t: _set_units(t, row_unit, value, lay)):
        return graph(big)


def _output_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def _graph_base(plan: _Plan, batch: Batch, cache: dict | None = None):
    """Every node's value on the unablated batch (one run per batch, shared by every layer's plan:
    they all split the same graph), and the value at this plan's point."""
    key = (id(plan.gm), id(batch))
    if cache is not None and key in cache:
        env = cache[key]
    else:
        interp = _Interp(plan.gm)
        out = interp.run(*batch.args, **batch.kwargs) if not batch.kwargs else _run_kwargs(interp, plan.gm, batch)
        env = dict(interp.env)
        env[_output_node(plan.gm)] = out
        if cache is not None:
            cache.clear()  # one batch at a time
            cache[key] = env
    return env, env[plan.probe]


def _run_kwargs(interp: _Interp, gm: fx.GraphModule, batch: Batch):
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    args = list(batch.args) + [batch.kwargs.get(str(nm).lstrip("*"), None) for nm in names[len(batch.args):]]
    return interp.run(*args)


def _check_batch_first(plan: _Plan, base, bsz: int) -> None:
    env, h = base
    if not isinstance(h, torch.Tensor) or h.dim() == 0 or h.shape[0] != bsz:
        raise _NotBatchFirst()
    for n in plan.frontier:
        if n in plan.batch_nodes:
            v = env[n]
            if isinstance(v, torch.Tensor) and (v.dim() == 0 or v.shape[0] != bsz):
                raise _NotBatchFirst()


def _auto_chunk(h: torch.Tensor, plan: _Plan | None, base, n_units: int, dev: torch.device) -> int:
    """Units per pass from free memory: each copy costs about the suffix's activations."""
    if n_units <= 1:
        return 1
    if plan is not None and base is not None:
        env = base[0]
        per_copy = sum(_tensors_nbytes(env[n]) for n in plan.dep if n in env) + sum(
            _tensors_nbytes(env[n]) for n in plan.frontier if n in plan.batch_nodes)
    else:
        per_copy = 8 * _tensors_nbytes(h)
    per_copy = max(per_copy * 3, 1)  # temporaries during the suffix
    budget = free_bytes(dev) * 0.4
    if dev.type == "cpu":
        # on a CPU, chunks beyond a few dozen MB only add cache misses: matmuls are already
        # efficient at that size, and elementwise passes over huge tensors are memory-bound
        budget = min(budget, CPU_CHUNK_BYTES)
    k = int(budget // per_copy)
    return max(1, min(n_units, k, 4096))


__all__ = ["ablate_layers", "AblationResult", "unit_means", "make_plan"]
