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

Models that do not trace fall back to expanding the *input* K times (the whole forward runs on
K·B, one hook masks each copy); the report says which method ran. K comes from free memory
(CUDA free memory or available RAM), halves on out-of-memory, or ``--chunk-size``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from fitcli.data import Batch, DataSource
from fitcli.errors import InputError, RuntimeAuditError
from fitcli.losses import LossFn, primary_output
from fitcli.metrics.ablation import Ablation
from fitcli.units import Layer, ModelGraph, getattr_path

CPU_CHUNK_BYTES = 192 << 20


@dataclass
class AblationResult:
    metrics: dict[str, Ablation]
    accuracy: dict[str, torch.Tensor | None] = field(default_factory=dict)
    layer_delta: dict[str, float | None] = field(default_factory=dict)
    layer_accuracy: dict[str, float | None] = field(default_factory=dict)
    samples: int = 0
    batches: int = 0
    method: dict[str, str] = field(default_factory=dict)
    chunk_sizes: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2 << 30


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
    probe_mod = graph._probes[layer.name]
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
    if len(users) == 1 and users[0].args and users[0].args[0] is probe and layer.unit_dim == -1:
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


def _losses_correct(outputs: Any, targets: torch.Tensor | None, loss_fn: LossFn, accuracy: bool):
    losses = loss_fn(outputs, targets).detach().to(torch.float64)
    correct = None
    if accuracy and targets is not None:
        out = primary_output(outputs)
        correct = (out.argmax(dim=-1) == targets.to(out.device)).to(torch.float64)
    return losses, correct


def unit_means(graph: ModelGraph, names: list[str], layers: dict[str, Layer], data: DataSource,
               device: torch.device) -> dict[str, torch.Tensor]:
    """E[h_i] over every observation of the data, per layer (a streamed sum + count)."""
    from fitcli.units import unit_view

    sums = {n: torch.zeros(layers[n].units, dtype=torch.float64, device=device) for n in names}
    counts = dict.fromkeys(names, 0)

    def grab(n):
        def fn(t):
            v = unit_view(t.detach(), layers[n].unit_dim).to(torch.float64)  # [B, U, P]
            sums[n] += v.sum(dim=(0, 2))
            counts[n] += v.shape[0] * v.shape[2]
            return t
        return fn

    with torch.no_grad(), graph.tap({n: grab(n) for n in names}):
        for i, b in enumerate(data):
            b = b.to(device)
            guarded(b, graph, i, graph, b)
    return {n: (sums[n] / max(counts[n], 1)) for n in names}


def ablate_layers(
    graph: ModelGraph,
    names: list[str],
    data: DataSource,
    loss_fn: LossFn,
    mode: str = "zero",
    device: torch.device | str = "cpu",
    chunk_size: int | None = None,
    progress: bool = False,
    units: dict[str, list[int] | None] | None = None,
    whole_layer: bool = False,
    accuracy: bool = False,
) -> AblationResult:
    """Exact ablation of every (selected) unit of each named layer over all of ``data``."""
    from fitcli.engine import Progress

    dev = torch.device(device)
    layers = {lay.name: lay for lay in graph.layers}
    units = units or {}
    sel = {n: (units.get(n) if units.get(n) is not None else list(range(layers[n].units))) for n in names}
    means = unit_means(graph, names, layers, data, dev) if mode == "mean" else {}
    res = AblationResult(metrics={n: Ablation(layers[n].units).to(dev) for n in names})
    acc_sum = {n: torch.zeros(layers[n].units, dtype=torch.float64, device=dev) for n in names}
    whole_sum = dict.fromkeys(names, 0.0)
    whole_acc = dict.fromkeys(names, 0.0)
    plans = {n: make_plan(graph, layers[n]) for n in names}
    fallback_noted: set[str] = set()
    nsamp = 0
    chunks = None
    if data.total is not None and (chunk_size or 0) > 0:
        chunks = data.total * sum(-(-len(sel[n]) // chunk_size) for n in names)
    with torch.no_grad(), Progress(progress, "ablating", chunks) as bar:
        for bi, cpu_batch in enumerate(data):
            batch = cpu_batch.to(dev)
            bsz = batch.size
            for n in names:
                lay = layers[n]
                plan = plans[n]
                value = means.get(n)
                if plan is not None:
                    base = guarded(batch, graph, bi, _graph_base, plan, batch)
                    try:
                        _check_batch_first(plan, base, bsz)
                    except _NotBatchFirst:
                        plans[n] = plan = None
                if plan is not None:
                    env, h = base
                    base_out = env[_output_node(plan.gm)]
                    run = lambda rb, ru, env=env, h=h, plan=plan, lay=lay, value=value: _graph_rows(  # noqa: E731
                        plan, env, h, rb, ru, lay, value)
                    res.method[n] = "graph-suffix" + ("+rank1" if plan.linear_weight is not None else "")
                else:
                    if n not in fallback_noted:
                        fallback_noted.add(n)
                        res.notes.append(f"ablation of {n}: the model's graph could not be split at the unit, "
                                         "so the whole input is expanded per chunk (slower, same result)")
                    h_holder: dict[str, torch.Tensor] = {}
                    with graph.tap({n: lambda t, h_holder=h_holder: h_holder.setdefault("h", t.detach())}):
                        base_out = guarded(batch, graph, bi, graph, batch)
                    h = h_holder["h"]
                    run = lambda rb, ru, batch=batch, lay=lay, value=value: _input_rows(  # noqa: E731
                        graph, batch, rb, ru, lay, value)
                    res.method[n] = "input-expansion"
                base_losses, base_correct = _losses_correct(base_out, batch.targets, loss_fn, accuracy)
                todo = list(sel[n])
                k = chunk_size or res.chunk_sizes.get(n) or _auto_chunk(h, plan, base if plan is not None else None,
                                                                        len(todo), dev)
                i = 0
                while i < len(todo):
                    us = todo[i : i + k]
                    row_k, row_b = changed_rows(h, us, lay, value)
                    us_t = torch.tensor(us, device=dev, dtype=torch.long)
                    try:
                        if row_b.numel():
                            outs = run(row_b, us_t[row_k])
                            targets = batch.targets[row_b] if batch.targets is not None else None
                            losses, correct = _losses_correct(outs, targets, loss_fn, accuracy)
                        else:
                            losses, correct = torch.zeros(0, dtype=torch.float64, device=dev), None
                    except Exception as e:
                        if _is_oom(e) and k > 1:
                            if dev.type == "cuda":
                                torch.cuda.empty_cache()
                            k = max(1, k // 2)
                            continue
                        if isinstance(e, (InputError, RuntimeAuditError)):
                            raise
                        raise RuntimeAuditError(f"ablation of {n} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
                    # a row is (unit, sample); samples where the unit already had the ablated
                    # value everywhere are unchanged by the ablation: their loss change is exactly 0
                    d = torch.zeros(len(us), dtype=torch.float64, device=dev)
                    d.index_add_(0, row_k, losses - base_losses[row_b])
                    full = torch.zeros(lay.units, dtype=torch.float64, device=dev)
                    full[us_t] = d
                    res.metrics[n].update(_ub(full, bsz if i == 0 else 0))
                    if correct is not None:
                        dc = torch.zeros(len(us), dtype=torch.float64, device=dev)
                        dc.index_add_(0, row_k, correct - base_correct[row_b])
                        acc_sum[n][us_t] += dc
                    i += len(us)
                    bar.advance()
                if not todo:
                    res.metrics[n].update(_ub(torch.zeros(lay.units, dtype=torch.float64, device=dev), bsz))
                res.chunk_sizes[n] = k
                if whole_layer:
                    outs = guarded(batch, graph, bi, _whole, graph, plan, base if plan is not None else None,
                                   batch, lay, value, sel[n], h)
                    wl, wc = _losses_correct(outs, batch.targets, loss_fn, accuracy)
                    whole_sum[n] += float((wl - base_losses).sum())
                    if wc is not None:
                        whole_acc[n] += float((wc - base_correct).sum())
            nsamp += bsz
            res.batches += 1
    if res.batches == 0:
        raise InputError(f"--data {data.spec}: yields no batches (empty data)")
    res.samples = nsamp
    for n in names:
        if accuracy:
            res.accuracy[n] = (acc_sum[n] / nsamp).cpu()
        if whole_layer:
            res.layer_delta[n] = whole_sum[n] / nsamp
            res.layer_accuracy[n] = whole_acc[n] / nsamp if accuracy else None
    return res


def guarded(batch: Batch, graph: ModelGraph, index: int, fn, *args):
    """``fn(*args)``, a forward pass: the model or data failing is an InputError naming the shapes."""
    from fitcli.engine import forward_error

    try:
        return fn(*args)
    except (InputError, RuntimeAuditError):
        raise
    except Exception as e:
        if _is_oom(e):
            raise RuntimeAuditError(f"out of memory on a single batch of {batch.size} samples",
                                    hint="lower --batch-size") from e
        raise forward_error(e, batch, graph, index) from e


def changed_rows(h: torch.Tensor, us: list[int], lay: Layer, value: torch.Tensor | None):
    """(unit-in-chunk, sample) pairs whose activation differs from the ablation value somewhere.

    Only those rows need the suffix: elsewhere the ablated and the original activations are the
    same tensor values, so the loss change is exactly zero (a ReLU unit that is off for a sample).
    """
    idx = torch.tensor(us, device=h.device, dtype=torch.long)
    hu = h.movedim(lay.unit_dim, 1).index_select(1, idx)  # [B, K, ...positions]
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


def _set_units(h_rows: torch.Tensor, row_unit: torch.Tensor, value, unit_dim: int) -> torch.Tensor:
    """Copy of ``h_rows`` ([R, ...]) with row r's unit ``row_unit[r]`` set to its ablation value."""
    out = h_rows.clone()
    view = out.movedim(unit_dim, 1)  # [R, U, ...positions], a view of out
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
        start_val = _set_units(h.index_select(0, row_b), row_unit, value, lay.unit_dim)
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


def _set_all(t: torch.Tensor, units: list[int], value, unit_dim: int) -> torch.Tensor:
    """Copy of ``t`` with every unit in ``units`` set to its ablation value, for every sample."""
    out = t.clone()
    view = out.movedim(unit_dim, 1)  # [B, U, ...positions]
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
        return _run_suffix(plan, env, rows, batch.size, {plan.probe: _set_all(hh, units, value, lay.unit_dim)})
    with graph.tap({lay.name: lambda t: _set_all(t, units, value, lay.unit_dim)}):
        return graph(batch)


def _input_rows(graph: ModelGraph, batch: Batch, row_b: torch.Tensor, row_unit: torch.Tensor, lay: Layer, value):
    """Fallback: run the whole model on the rows' samples, each row with its unit ablated."""
    bsz = batch.size

    def pick(v: Any) -> Any:
        return v.index_select(0, row_b) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == bsz else v

    big = Batch(tuple(pick(a) for a in batch.args), {k: pick(v) for k, v in batch.kwargs.items()})
    with graph.tap({lay.name: lambda t: _set_units(t, row_unit, value, lay.unit_dim)}):
        return graph(big)


def _ub(delta_sum: torch.Tensor, samples: int):
    from fitcli.metrics.base import UnitBatch

    return UnitBatch(weight=delta_sum, extra={"ablation_delta_sum": delta_sum, "ablation_samples": samples})


def _output_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def _graph_base(plan: _Plan, batch: Batch):
    interp = _Interp(plan.gm)
    out = interp.run(*batch.args, **batch.kwargs) if not batch.kwargs else _run_kwargs(interp, plan.gm, batch)
    env = dict(interp.env)
    env[_output_node(plan.gm)] = out
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
