"""Physical removal of units: ``prune(model, data, remove=...) -> PruneResult``.

The pruned model is a deep copy (the caller's module is never touched). Per layer, the chosen
units' rows go from the producing layer (with their BatchNorm entries and bias), their columns
from every consuming layer; a unit whose value at its consumers is constant on the data is
folded into the consumers' bias first (``b += W[:, j] * c``), so its removal changes nothing.
Removing a unit otherwise equals zero-ablating it at its activation point, which is what the
predicted loss change measures (all chosen units masked together, with hooks, on the original).

The dependency graph (which parameters hold a unit's channel, through flatten, BatchNorm,
concatenation...) is Torch-Pruning's (the ``prune`` extra); what a unit may not take part in is
decided here: a channel coupled to other layers' outputs (a residual stream, a gated product),
a final layer's outputs, attention heads, and a constant that a padded convolution would not
see as constant are refused, each with its reason.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fitcli.data import Batch
from fitcli.discovery import discover
from fitcli.engine import peek, pick_device
from fitcli.errors import InputError, UsageError
from fitcli.losses import check_loss, primary_output, resolve_loss
from fitcli.prune_export import check_outputs, export_program, output_paths, plain, plain_outputs  # noqa: F401
from fitcli.prune_groups import (
    NORMS,
    check_kinds,
    check_streams,
    choose_streams,
    cut_streams,
    find_streams,
    out_fn,
    stream_units,
    torch_pruning,
    writer_streams,
)
from fitcli.prune_measure import (  # noqa: F401
    CONST_TOL,
    consumer_constants,
    count_flops,
    count_params,
    evaluate,
    fold,
    fold_reason,
    is_constant,
    unit_ranges,
)
from fitcli.report import replace_atomically
from fitcli.settings import Settings


class PruneRefused(InputError):
    """Units the caller named cannot be removed exactly: a coupling the surgery cannot follow."""


@dataclass
class PruneResult:
    """What ``prune`` did. ``module``: the pruned deep copy; ``removed``: units taken out of
    each layer (original indices), ``folded``: those among them whose constant value went
    into the consumers' bias ({layer: {unit: value}}); ``refused``: {layer, units, reason};
    ``streams``: residual-stream channels removed from every coupled layer at once
    ({"conv1+layer1.0.conv2": [channels]}, the writers joined by ``+``)."""

    module: nn.Module
    removed: dict[str, list[int]]
    folded: dict[str, dict[int, float]]
    refused: list[dict[str, Any]]
    selection: str
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    loss_before: float | None
    loss_after: float | None
    predicted_loss_change: float | None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    rank_by: str | None = None
    loss_name: str | None = None
    notes: list[str] = field(default_factory=list)
    example: Batch | None = field(default=None, repr=False)
    inputs: list[str] = field(default_factory=list, repr=False)  # files never to overwrite
    streams: dict[str, list[int]] = field(default_factory=dict)

    @property
    def loss_change(self) -> float | None:
        if self.loss_before is None or self.loss_after is None:
            return None
        return self.loss_after - self.loss_before

    def to_dict(self) -> dict[str, Any]:
        return {
            "selection": self.selection, "rank_by": self.rank_by, "loss_name": self.loss_name,
            "removed": self.removed, "streams": self.streams,
            "folded": {k: {str(u): c for u, c in v.items()} for k, v in self.folded.items()},
            "refused": self.refused,
            "parameters": {"before": self.params_before, "after": self.params_after},
            "flops": {"before": self.flops_before, "after": self.flops_after},
            "loss": {"before": self.loss_before, "after": self.loss_after, "change": self.loss_change,
                     "predicted_change": self.predicted_loss_change},
            "accuracy": {"before": self.accuracy_before, "after": self.accuracy_after},
            "notes": self.notes,
        }

    def save(self, out: str | Path, protect: list[str | Path] = ()) -> list[Path]:
        """``OUT.pt2`` (``torch.export`` of the pruned model on an example batch, with a dynamic
        batch dimension where it exports) and ``OUT.safetensors`` (its weights), each written
        atomically and never over an input file."""
        pt2, st = check_outputs(out, [*self.inputs, *protect])
        program = export_program(self.module, self.example)
        replace_atomically(pt2, lambda f: torch.export.save(program, f))
        from safetensors.torch import save_file

        sd = {k: v.detach().contiguous().clone() for k, v in self.module.state_dict().items()}
        replace_atomically(st, lambda f: save_file(sd, f))
        return [pt2, st]


# --------------------------------------------------------------------------------------------
# the dependency graph (Torch-Pruning) and what may be removed


@dataclass
class _Plan:
    """One layer's surgery: its module, and per unit the consumers' input columns."""

    layer: str
    module: nn.Module
    consumers: dict[int, list[tuple[str, list[int]]]]  # unit -> [(consumer module name, input idxs)]


def _layer_reason(lay, mod: nn.Module | None, tp) -> str | None:
    if lay.final:
        return "it is the final layer: its units are the model's outputs"
    if (why := lay.kind.removal(lay)) is not None:
        return why
    if mod is None or out_fn(tp, mod) is None:
        return f"{lay.type} layers are not supported (Linear and ungrouped ConvNd are)"
    return None


def _group_of(dg, tp, mod: nn.Module, fn, idxs: list[int], names: dict[nn.Module, str], layer: str
              ) -> tuple[list[tuple[str, list[int]]], str | None]:
    """The consumers' input columns of ``idxs``, or the reason the channel cannot go alone."""
    try:
        group = dg.get_pruning_group(mod, fn, idxs=idxs)
    except Exception as e:
        return [], f"the dependency graph does not hold it ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    consumers, coupled = [], []
    for dep, didx in group:
        target, handler = dep.target.module, getattr(dep.handler, "__name__", str(dep.handler))
        name = names.get(target)
        if name is None:  # Torch-Pruning's own nodes for functions (elementwise, reshape, concat)
            continue
        if "out_channels" in handler and name != layer and not isinstance(target, NORMS):
            coupled.append(name)
        elif "in_channels" in handler:
            consumers.append((name, [int(i) for i in didx]))
    if coupled:
        return [], (f"its channels are coupled to {', '.join(sorted(set(coupled))[:4])}"
                    + (" ..." if len(set(coupled)) > 4 else "")
                    + ": its outputs join theirs (a residual sum or a shared stream), so a channel could only "
                    "go from all of them at once")
    if not consumers:
        return [], "its outputs reach the model's output without passing a layer"
    return consumers, None


def dependency_graph(module: nn.Module, example: Batch):
    """Torch-Pruning's dependency graph of ``module``, from one forward on ``example``."""
    return torch_pruning().DependencyGraph().build_dependency(module, example_inputs=example,
                                                    forward_fn=lambda m, b: m(*b.args, **b.kwargs),
                                                    output_transform=primary_output, verbose=False)


def plan_layers(dg, module: nn.Module, graph, chosen: dict[str, list[int]],
                folds: set[tuple[str, int]] = frozenset()) -> tuple[dict[str, _Plan], list[dict[str, Any]]]:
    """Per chosen layer of ``module``: its plan, or its refusal with the reason. The coupling is
    checked on the group of all the layer's chosen units at once; each unit in ``folds`` (a
    nonzero constant at its point) gets its own consumers' columns, to fold it."""
    tp = torch_pruning()
    mods = dict(module.named_modules())
    names = {m: n for n, m in mods.items()}
    lays = {lay.name: lay for lay in graph.layers}
    plans: dict[str, _Plan] = {}
    refused: list[dict[str, Any]] = []
    for lname, units in chosen.items():
        if not units:
            continue
        lay = lays[lname]
        mod = mods.get(lname)
        reason = _layer_reason(lay, mod, tp)
        per_unit: dict[int, list[tuple[str, list[int]]]] = {}
        if reason is None and len(units) >= lay.units:
            reason = "it would remove every unit of the layer (the layer itself would go)"
        if reason is None:
            fn = out_fn(tp, mod)
            _, reason = _group_of(dg, tp, mod, fn, list(units), names, lname)
            for u in units:
                if reason is None and (lname, u) in folds:
                    per_unit[u], reason = _group_of(dg, tp, mod, fn, [u], names, lname)
        if reason is not None:
            refused.append({"layer": lname, "units": list(units), "reason": reason})
            continue
        plans[lname] = _Plan(lname, mod, per_unit)
    return plans, refused


# --------------------------------------------------------------------------------------------
# choosing units


def _parse_remove(remove: Any) -> str | dict[str, list[int]]:
    if isinstance(remove, str):
        if remove not in ("dead", "removable"):
            raise UsageError(f"remove {remove!r}: use 'dead', 'removable' or {{layer: [units]}}")
        return remove
    if isinstance(remove, dict):
        out: dict[str, list[int]] = {}
        for k, v in remove.items():
            if not isinstance(k, str) or not isinstance(v, (list, tuple, set, range)):
                raise UsageError("remove must map layer names to lists of unit indices")
            for i in v:
                if isinstance(i, bool) or not isinstance(i, int):
                    raise UsageError(f"unit {i!r} of {k} is not an index")
            out[k] = sorted(set(v))
        return out
    raise UsageError(f"remove must be 'dead', 'removable' or {{layer: [units]}}, not {type(remove).__name__}")


def _check_units(chosen: dict[str, list[int]], graph) -> None:
    from fitcli.errors import close_matches

    lays = {lay.name: lay for lay in graph.layers}
    for name, units in chosen.items():
        if name not in lays:
            raise UsageError(f"layer {name!r} is not an auditable layer" + close_matches(name, list(lays)),
                             hint="fitcli.inspect(model) lists the layers",
                             cli_hint="`fitcli inspect MODEL` lists the layers")
        for i in units:
            if not 0 <= i < lays[name].units:
                raise UsageError(f"unit {i} is out of range for {name} (the layer has {lays[name].units} units: "
                                 f"0-{lays[name].units - 1})")


def _constant_units(ranges: dict[str, tuple[torch.Tensor, ...]]) -> dict[str, list[int]]:
    return {n: [i for i in range(lo.numel()) if is_constant(float(lo[i]), float(hi[i]), float(m[i]))]
            for n, (lo, hi, m) in ranges.items()}


def _union(*dicts: dict[str, list[int]]) -> dict[str, list[int]]:
    out: dict[str, set[int]] = {}
    for d in dicts:
        for k, v in d.items():
            out.setdefault(k, set()).update(v)
    return {k: sorted(v) for k, v in out.items() if v}


def _choose(how: str | dict, budget: float | None, loaded, ds, loss, s: Settings, candidates: list[str],
            ranges) -> tuple[dict[str, list[int]], str, str | None, list[dict] | None]:
    """-> ({layer: units}, a description of the choice, the ranking metric for a budget, the
    ranked rows of every layer for a budget)."""
    from fitcli import api

    if budget is not None:
        report = api.audit(loaded, ds, loss=loss, metrics=[s.rank_by] if s.rank_by else None, settings=s)
        by = report.settings.get("rank_by")
        every = report.ranked(by=by, top=None)
        rows = [r for r in every if r["layer"] in candidates]
        total = sum(len(ranges[n][0]) for n in candidates)
        k = int(math.floor(budget / 100.0 * total + 1e-9))
        picked: dict[str, list[int]] = {}
        for r in rows[:k]:
            picked.setdefault(r["layer"], []).append(int(r["unit"]))
        return _union(picked), f"budget {budget:g}% ({k} of {total} units, least fit by {by})", by, every
    consts = {n: v for n, v in _constant_units(ranges).items() if n in candidates}
    if how == "dead" and s.tau == 0:  # dormancy 0 = exactly zero on every observation: constant 0
        return consts, "dead (zero on all the data) and constant units", None, None
    if how == "dead":
        from fitcli.metrics.registry import dead_metrics

        report = api.audit(loaded, ds, loss=loss, metrics=dead_metrics()[:1], settings=s)
        dead = {n: v for n, v in report.dead.items() if n in candidates}
        return _union(dead, consts), f"dead (dormancy ≤ τ = {s.tau:g}) and constant units", None, None
    if how == "removable":
        report = api.audit(loaded, ds, loss=loss, metrics=["ablation"], settings=s)
        rem = {n: v for n, v in report.removable.items() if n in candidates}
        return _union(rem, consts), "removable (exact ablation |Δloss| ≤ 1e-6) and constant units", None, None
    assert isinstance(how, dict)
    return {k: v for k, v in how.items() if v}, "units given", None, None


# --------------------------------------------------------------------------------------------
# prune


def _mask_fns(graph, zeroed: dict[str, list[int]]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    lays = {lay.name: lay for lay in graph.layers}

    def fn(lay, units):
        def mask(t: torch.Tensor) -> torch.Tensor:
            t = t.clone()
            lay.units_view(t)[:, units] = 0
            return t
        return mask

    return {n: fn(lays[n], us) for n, us in zeroed.items() if us}


def _decide(plans: dict[str, _Plan], chosen: dict[str, list[int]], consts, mods: dict[str, nn.Module]
            ) -> tuple[dict[str, list[int]], dict[str, dict[int, float]], list[dict[str, Any]]]:
    """Per planned layer: the units removed, those folded (with their constant), those refused."""
    removed: dict[str, list[int]] = {}
    folded: dict[str, dict[int, float]] = {}
    refused: list[dict[str, Any]] = []
    for lname, p in plans.items():
        for u in chosen[lname]:
            vals = consts.get((lname, u))
            if vals is not None and any(bool((v != 0).any()) for v in vals):
                why = next((r for (cname, _), v in zip(p.consumers[u], vals, strict=True)
                            if (r := fold_reason(mods[cname], v)) is not None), None)
                if why is not None:
                    refused.append({"layer": lname, "units": [u], "reason": why})
                    continue
                folded.setdefault(lname, {})[u] = float(vals[0].mean())
            removed.setdefault(lname, []).append(u)
    return removed, folded, refused


def _checked_request(remove: Any, budget: float | None) -> str | dict[str, list[int]]:
    """What to remove (``remove`` parsed), checked against ``budget``."""
    how = _parse_remove(remove)
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not 0 <= budget <= 100):
        raise UsageError(f"budget must be a percentage between 0 and 100, got {budget!r}")
    if budget is not None and isinstance(how, dict):
        raise UsageError("give units to remove or a budget, not both")
    return how


def _predicted_change(graph, zeroed: dict[str, list[int]], ranges, base, ds, loss_fn, dev) -> float | None:
    """The loss change with every zeroed unit masked together on the original (hooks)."""
    if loss_fn is None:
        return None
    if all(float(ranges[n][0][u]) == 0 == float(ranges[n][1][u]) for n, us in zeroed.items() for u in us):
        return 0.0  # every zeroed unit is 0 on the whole data already: masking it changes nothing
    with graph.tap(_mask_fns(graph, zeroed)):
        masked = evaluate(graph, ds, loss_fn, dev, graph)
    return masked[0] - base[0]


def _plan_removal(dg, pruned: nn.Module, graph, how: Any, chosen: dict[str, list[int]], ranges, ds, dev):
    """Which chosen units go (their rows and consumers' columns), which are folded into the
    consumers' bias first (constant on the data), and which are refused with the reason; units
    the caller named are removed exactly or the call is refused."""
    _check_units(chosen, graph)
    folds = {(n, u) for n, us in chosen.items() if n in ranges for u in us
             if is_constant(*(float(t[u]) for t in ranges[n])) and float(ranges[n][2][u]) != 0}
    plans, refused = plan_layers(dg, pruned, graph, chosen, folds)
    _refuse_named(how, refused)
    consts = consumer_constants(pruned, plans, ds, dev)
    removed, folded, refused_fold = _decide(plans, chosen, consts, dict(pruned.named_modules()))
    refused += refused_fold
    _refuse_named(how, refused)
    return plans, consts, removed, folded, refused


def _load_inputs(model: Any, data: Any, s: Settings, how: dict[str, Any]):
    """The model (a module we can edit: not a .pt2 program) and the data, loaded."""
    from fitcli import api

    loaded = api.load(model, **how)
    if not loaded.runnable or loaded.format == "export":
        raise InputError(f"{loaded.path}: pruning needs the model's module (a .pt2 program cannot be edited); "
                         "give its architecture ({arch})", setting="arch")
    ds = api.load_data(data, batch_size=s.batch_size, max_batches=s.max_batches, seed=s.seed)
    if ds is None:
        raise UsageError("pruning needs data")
    return loaded, ds


def _budget_candidates(dg, pruned: nn.Module, graph, candidates: list[str]) -> list[str]:
    """Only layers whose units can go count towards a budget."""
    ok, _ = plan_layers(dg, pruned, graph, {n: [0] for n in candidates})
    return [n for n in candidates if n in ok]


@dataclass
class _Selection:
    """What goes: per-layer units (plans, removed, folded, refused) and residual-stream channels."""

    plans: dict[str, _Plan]
    consts: dict
    removed: dict[str, list[int]]
    folded: dict[str, dict[int, float]]
    refused: list[dict[str, Any]]
    streams: list  # every prune_groups.Stream found (with kinds hidden)
    picked: dict[str, list[int]]  # stream label -> channels removed
    selection: str
    rank_by: str | None

    @property
    def zeroed(self) -> dict[str, list[int]]:
        """Per layer, the units zeroed by the removal: the removed (not folded) ones, and every
        writer's channels of the streams that lose channels."""
        own = {n: [u for u in us if u not in self.folded.get(n, {})] for n, us in self.removed.items()}
        return _union(own, stream_units(self.streams, self.picked))


def _select(dg, pruned: nn.Module, graph, how: Any, budget: float | None, kinds: tuple[str, ...], loaded, ds,
            loss, s: Settings, candidates: list[str], ranges, dev) -> _Selection:
    """The units and stream channels to remove. With ``hidden``, a residual stream's channels
    go as one coupled group (named units of a writer are its stream's channels)."""
    streams = find_streams(dg, pruned, graph, candidates) if "hidden" in kinds else []
    writers = writer_streams(streams)
    own = {k: v for k, v in how.items() if k not in writers} if isinstance(how, dict) else how
    cands = [n for n in candidates if n not in writers] if "channels" in kinds else []
    cands = _budget_candidates(dg, pruned, graph, cands) if budget is not None else cands
    chosen, selection, by, rows = _choose(own, budget, loaded, ds, loss, s, cands, ranges)
    picked, refused_streams = choose_streams(how, budget, streams, ranges, rows)
    _refuse_named(how, refused_streams)
    check_streams(streams, kinds, budget, picked, refused_streams)
    plans, consts, removed, folded, refused = _plan_removal(dg, pruned, graph, own, chosen, ranges, ds, dev)
    if "hidden" in kinds:
        n = sum(len(c) for c in picked.values())
        selection = (selection + "; " if "channels" in kinds else "") + (
            f"residual streams: {n} channel(s) of {len(streams)} stream(s)"
            + (f" (least fit by {by} summed over each stream's writers)" if budget is not None else ""))
    return _Selection(plans, consts, removed, folded, refused + refused_streams, streams, picked, selection, by)


def prune(model: Any, data: Any = None, *, remove: Any = "dead", budget: float | None = None, kinds: Any = None,
          loss: Any = None, arch: Any = None, arch_kwargs: dict[str, Any] | None = None,
          trust_checkpoint: bool = False, settings: Settings | None = None, device: str | None = None,
          seed: int | None = None, tau: float | None = None, rank_by: str | None = None,
          batch_size: int | None = None, max_batches: int | None = None, chunk_size: int | None = None,
          ablation_mode: str | None = None, target_params: int | None = None, compensate: str | None = None,
          per_layer: bool = False, eval_data: Any = None) -> Any:
    """Physically remove units from a deep copy of ``model``; see the module docstring.

    Args:
        model, data, loss, arch, arch_kwargs, trust_checkpoint, settings: as for ``fitcli.audit``.
        remove: ``"dead"`` (the audit's dead units and every unit constant on the data),
            ``"removable"`` (exact ablation changes the loss by ≤ 1e-6, and constant units), or
            ``{layer: [units]}``. Units named that cannot be removed exactly raise
            ``PruneRefused``; chosen by the audit, they are listed in ``refused`` with the reason.
        budget: remove this percent of the prunable units, least fit first by the audit's
            ranking (``rank_by``, default the audit's).
        kinds: ``"channels"`` (default: each layer's own units), ``"hidden"`` (residual-stream
            channels, cut from every coupled layer at once, scored by the sum of the writers'
            scores), or both. A Hugging Face transformer: ``mlp``, ``heads``, ``hidden``, ``blocks``.
        device, seed, tau, rank_by, batch_size, max_batches, chunk_size, ablation_mode: Settings fields.
        target_params, compensate, per_layer, eval_data: a Hugging Face transformer only, see
            ``fitcli.prune_hf.prune_transformer``.

    Returns:
        A ``PruneResult``: the pruned copy, what was removed, folded and refused, loss and accuracy.
        A Hugging Face transformer (LLaMA-style, GPT-2, BERT) with a ``budget`` or
        ``target_params`` goes through fitcli's own transformer surgery (no Torch-Pruning
        tracer) and gives a ``TransformerPruneResult``; its named, dead or removable units go
        through the dependency graph like any model's.

    Examples:
        >>> fitcli.prune(model, loader, remove="dead", device="cpu").removed
    """
    from fitcli.prune_hf import hf_module, prune_from_api

    transformer = {k: v for k, v in dict(target_params=target_params, compensate=compensate,
                                         per_layer=per_layer or None, eval_data=eval_data).items() if v is not None}
    hf = hf_module(model, {"arch": arch, "arch_kwargs": arch_kwargs, "trust_checkpoint": trust_checkpoint})
    if hf is not None and (budget is not None or transformer):  # named, dead, removable: the graph, exactly
        return prune_from_api(hf[0], data, remove=remove, budget=budget, kinds=kinds, rank_by=rank_by,
                              seed=seed, source_dir=hf[1], **transformer)
    if transformer:
        raise UsageError(f"{', '.join(sorted(transformer))}: for a Hugging Face transformer only")
    s = Settings.make(settings, device=device, seed=seed, tau=tau, rank_by=rank_by, batch_size=batch_size,
                      max_batches=max_batches, chunk_size=chunk_size, ablation_mode=ablation_mode).check()
    how, kinds_t = _checked_request(remove, budget), check_kinds(kinds)
    check_loss(loss)
    loaded, ds = _load_inputs(model, data, s, {"arch": arch, "arch_kwargs": arch_kwargs,
                                               "trust_checkpoint": trust_checkpoint})
    return _prune_loaded(loaded, ds, data, how, budget, kinds_t, loss, s)


def _prune_loaded(loaded, ds, data: Any, how: Any, budget: float | None, kinds: tuple[str, ...], loss: Any,
                  s: Settings) -> PruneResult:
    """``prune`` once the model and the data are loaded and the request checked."""
    from fitcli import api

    dev = pick_device(s.device)
    original = loaded.module
    with api.caller_state(original, s.seed):
        original.to(dev)
        example = peek(ds)
        if example is None:
            raise InputError("the data yields no batches (empty data)")
        example = example.to(dev)
        loss_fn, loss_name, _why = resolve_loss(loss, example.targets, loaded.task)
        graph = discover(original, loaded.state_dict, example=example)
        if isinstance(how, dict):
            _check_units(how, graph)
        candidates = [lay.name for lay in graph.active if not lay.final and not lay.kind.opt_in and lay.kind.tappable(lay)]
        ranges, base = unit_ranges(graph, candidates, ds, dev, loss_fn)
        pruned = copy.deepcopy(original).eval()
        dg = dependency_graph(pruned, example)
        sel = _select(dg, pruned, graph, how, budget, kinds, loaded, ds, loss, s, candidates, ranges, dev)
        predicted = _predicted_change(graph, sel.zeroed, ranges, base, ds, loss_fn, dev)
        before = (count_params(original), count_flops(original, example))
        _surgery(pruned, dg, sel.plans, sel.removed, sel.folded, sel.consts)
        cut_streams(dg, pruned, sel.streams, sel.picked)
        result = _result(pruned, example, ds, loss_fn, dev, before, base, predicted,
                         dict(removed=sel.removed, folded=sel.folded, refused=sel.refused, selection=sel.selection,
                              rank_by=sel.rank_by, loss_name=loss_name, example=example, streams=sel.picked,
                              inputs=[p for p in (loaded.path, data if isinstance(data, (str, Path)) else None) if p]))
        if loss_fn is None:
            result.notes.append(f"no loss: {_why}")
    return result


def _result(pruned: nn.Module, example, ds, loss_fn, dev, before: tuple[int, int], base, predicted,
            fields: dict[str, Any]) -> PruneResult:
    """The pruned copy measured against the original's figures (``before``: params, FLOPs)."""
    after = evaluate(lambda b: pruned(*b.args, **b.kwargs), ds, loss_fn, dev)
    return PruneResult(module=pruned, params_before=before[0], params_after=count_params(pruned),
                       flops_before=before[1], flops_after=count_flops(pruned, example), loss_before=base[0],
                       loss_after=after[0], predicted_loss_change=predicted, accuracy_before=base[1],
                       accuracy_after=after[1], **fields)


def _refuse_named(how: Any, refused: list[dict[str, Any]]) -> None:
    """Units the caller named are removed exactly or not at all."""
    if refused and isinstance(how, dict):
        r = refused[0]
        hint = ("; with {kinds} hidden it goes from all of them, as one residual-stream channel"
                if "coupled to" in r["reason"] else "")
        raise PruneRefused(f"cannot remove unit(s) {_short_units(r['units'])} of {r['layer']}: {r['reason']}{hint}",
                           setting="kinds" if hint else None)


def _short_units(units: list[int]) -> str:
    return ",".join(str(u) for u in units[:8]) + (",..." if len(units) > 8 else "")


def _surgery(pruned: nn.Module, dg, plans: dict[str, _Plan], removed: dict[str, list[int]],
             folded: dict[str, dict[int, float]], consts) -> None:
    """Fold every constant first (indices are the original ones), then remove layer by layer
    with Torch-Pruning, which takes each unit's rows, BatchNorm entries and consumer columns."""
    tp = torch_pruning()
    mods = dict(pruned.named_modules())
    for lname, units in folded.items():
        for u in units:
            for (cname, idxs), c in zip(plans[lname].consumers[u], consts[(lname, u)], strict=True):
                fold(mods[cname], idxs, c)
    for lname, units in removed.items():
        mod = mods[lname]
        dg.get_pruning_group(mod, out_fn(tp, mod), idxs=sorted(units)).prune()


__all__ = ["prune", "PruneResult", "PruneRefused", "export_program", "count_flops", "count_params"]
