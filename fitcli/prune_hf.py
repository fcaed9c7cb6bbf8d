"""Shrinking a Hugging Face transformer: ``prune_transformer(model, data, kinds=..., budget=...)``.

No Torch-Pruning tracer: the units are found by ``fitcli.surgery`` (LLaMA-style decoders, GPT-2,
BERT). The stages, each a function below:

1. ``calibrate``: one pass over the calibration data (the consumers' float64 Gram sums, block
   influence, residual-stream energy) and the loss before;
2. ``split_budget``: the parameter budget split evenly over the kinds asked for, as counts that
   are the same in every block (so a stock config holds the result);
3. ``choose``: per block, the least fit units by the named ranking (``fitcli.surgery.rank``);
4. ``prune_hf``: the surgery on a deep copy, with ridge / mean compensation folded in;
5. ``measure``: parameters, FLOPs per token, calibration and held-out loss before and after, the
   change predicted by exact ablation of the whole removed set (compensation applied, on the
   original, with hooks), and the same counts removed at random, measured on the same lines.

The input model is never modified.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fitcli.compensate import MODES, columns_of, fit_compensation
from fitcli.errors import UsageError
from fitcli.surgery import KINDS, Plan, find_family, prune_hf, save_pretrained_folder, uniform_plan
from fitcli.surgery.arch import UNSUPPORTED, Family
from fitcli.surgery.folder import uniform_problem
from fitcli.surgery.hf import HIDDEN_TYPES
from fitcli.surgery.rank import (
    DEFAULT_RANK,
    RANKERS,
    Calibration,
    block_scores,
    calibrate,
    hidden_scores,
    unit_scores,
)

RETRAIN_NOTE = ("quality beyond this needs retraining or distillation (e.g. Minitron: prune, then distil from the "
                "original); fitcli does not train")


@dataclass
class TransformerPruneResult:
    """What ``prune_transformer`` did and what it cost. Losses are mean next-token negative
    log-likelihoods per real token (None for a model that is not a causal LM)."""

    module: nn.Module
    counts: dict[str, int]  # per kind: blocks removed, channels per block, heads per group, hidden channels
    plan: Plan
    rank_by: str
    compensate: str
    per_layer: bool
    params: tuple[int, int]
    flops_per_token: tuple[float, float]
    calib_loss: tuple[float | None, float | None]
    eval_loss: tuple[float | None, float | None]
    predicted_change: float | None
    random: dict[str, float | None]  # the same counts at random: calib_loss, eval_loss
    lambdas: dict[str, int]  # ridge choices over the consumers: "lambda=…" / "mean" / "none" -> count
    notes: list[str] = field(default_factory=list)
    source_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        def ppl(x):
            return None if x is None else math.exp(min(x, 700.0))

        return {
            "counts": dict(self.counts), "rank_by": self.rank_by, "compensate": self.compensate,
            "per_layer": self.per_layer, "lambda_choices": dict(self.lambdas),
            "parameters": {"before": self.params[0], "after": self.params[1]},
            "flops_per_token": {"before": self.flops_per_token[0], "after": self.flops_per_token[1]},
            "calibration_loss": {"before": self.calib_loss[0], "after": self.calib_loss[1],
                                 "predicted_change": self.predicted_change, "random_after": self.random.get("calib_loss")},
            "heldout_loss": {"before": self.eval_loss[0], "after": self.eval_loss[1],
                             "random_after": self.random.get("eval_loss")},
            "heldout_perplexity": {"before": ppl(self.eval_loss[0]), "after": ppl(self.eval_loss[1]),
                                   "random_after": ppl(self.random.get("eval_loss"))},
            "notes": list(self.notes),
        }

    def save(self, out: str | Path, protect: Iterable[str | Path] = ()) -> list[Path]:
        """Uniform counts: a folder stock ``from_pretrained`` loads. ``per_layer``: ``OUT.pt2`` +
        ``OUT.safetensors`` (a stock config holds one count per kind for every layer)."""
        if not self.per_layer:
            return [save_pretrained_folder(self.module, out, source_dir=self.source_dir)]
        from fitcli.data import Batch
        from fitcli.prune_export import check_outputs, export_program
        from fitcli.report import replace_atomically

        pt2, st = check_outputs(out, [*protect, *([self.source_dir] if self.source_dir else [])])
        ids = torch.zeros(1, 8, dtype=torch.long)
        program = export_program(self.module, Batch((), {"input_ids": ids}))
        replace_atomically(pt2, lambda f: torch.export.save(program, f))
        from safetensors.torch import save_file

        sd = {k: v.detach().contiguous().clone() for k, v in self.module.state_dict().items()}
        replace_atomically(st, lambda f: save_file(sd, f))
        return [pt2, st]


# --------------------------------------------------------------------------------------------
# data and loss


def as_inputs(batch: Any) -> dict[str, torch.Tensor]:
    """A fitcli ``Batch``, a dict or a tensor of token ids -> model keyword inputs."""
    kwargs = getattr(batch, "kwargs", None)
    if kwargs is not None:
        if "input_ids" in kwargs:
            return {k: v for k, v in kwargs.items() if k in ("input_ids", "attention_mask")}
        return {"input_ids": batch.args[0]}
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch}
    raise UsageError(f"a batch of token ids is a tensor or a dict with input_ids, not {type(batch).__name__}")


def token_batches(data: Any) -> list[dict[str, torch.Tensor]]:
    if data is None:
        return []
    if isinstance(data, (str, Path)):
        from fitcli.data import load_data

        data = load_data(data, batch_size=8)
    out = [as_inputs(b) for b in data]
    for b in out:
        ids = b["input_ids"]
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dim() != 2:
            raise UsageError("a Hugging Face transformer is pruned on token ids: integer [batch, length] tensors "
                             "(text, or token data)", setting="data")
    if not out:
        raise UsageError("the data yields no batches (empty data)", setting="data")
    return out


def is_causal(model: nn.Module) -> bool:
    return find_family(model).name in ("llama", "gpt2") and hasattr(model, "lm_head")


def lm_loss(model: nn.Module, batches: list[dict]) -> float | None:
    """Mean next-token NLL per real token (padding excluded); None for a model that is not a
    causal LM or with no data."""
    if not batches or not is_causal(model):
        return None
    tot, n = 0.0, 0
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in batches:
                b = {k: v.to(dev) for k, v in b.items()}
                logits = model(**b).logits[:, :-1].to(torch.float64)
                ids = b["input_ids"][:, 1:]
                mask = b.get("attention_mask", torch.ones_like(b["input_ids"]))
                m = (mask[:, 1:] * mask[:, :-1]).to(torch.float64)
                nll = -torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
                tot += float((nll * m).sum())
                n += int(m.sum())
    finally:
        model.train(was)
    return tot / n if n else None


def flops_per_token(model: nn.Module, length: int = 32) -> float:
    """FLOPs of one forward on a [1, length] sequence over its length (matmuls, attention included)."""
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.zeros(1, length, dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad(), FlopCounterMode(display=False) as fcm:
        model(input_ids=ids)
    return fcm.get_total_flops() / length


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# the budget


def step_costs(fam: Family) -> dict[str, float]:
    """Parameters one step of each kind removes: a block (the mean block); one MLP channel from
    every block; one query head from every key-value group of every block; one hidden channel."""
    n = len(fam.layers)

    def ins(p):
        return p.weight.shape[1] + (p.bias is not None)

    m, a = fam.mlp(0), fam.attn(0)
    mlp = sum(ins(p) for p in m.producers) + m.consumer.weight.shape[0]
    qrows = sum(ins(p) for p in a.q) + (3 * ins(a.fused) if a.fused is not None else 0)
    head = a.head_dim * (qrows + a.o.weight.shape[0])
    out = {"blocks": sum(p.numel() for b in fam.layers for p in b.parameters()) / n,
           "mlp": n * mlp, "heads": n * a.kv_heads * head}
    emb = fam.model.get_input_embeddings().weight
    untied = [h for h in (getattr(fam.model, "lm_head", None),) if h is not None and h.weight is not emb]
    per_block = sum(p.weight.shape[0] for p in a.inputs + m.producers) + sum(ins(p) for p in a.outputs + [m.consumer]) + 2
    out["hidden"] = emb.shape[0] + sum(h.weight.shape[0] for h in untied) + n * per_block + 1
    return out


def check_kinds(fam: Family, kinds: list[str], per_layer: bool) -> None:
    """UsageError for a kind this model cannot lose (with the reason)."""
    for k in kinds:
        if k not in KINDS:
            raise UsageError(f"unknown kind {k!r}: use {', '.join(KINDS)}", setting="kinds")
    if "heads" in kinds:
        if fam.name in UNSUPPORTED:
            raise UsageError(f"heads: {UNSUPPORTED[fam.name]['heads']}", setting="kinds")
        a = fam.attn(0)
        if a.heads == a.kv_heads:
            raise UsageError("heads: every query head has its own key-value head here; removing query heads "
                             "alone would leave key-value heads without a query", setting="kinds")
    if "hidden" in kinds:
        if fam.name in UNSUPPORTED:
            raise UsageError(f"hidden: {UNSUPPORTED[fam.name]['hidden']}", setting="kinds")
        mt = getattr(fam.model.config, "model_type", None)
        if mt not in HIDDEN_TYPES:
            raise UsageError(f"hidden: {mt!r} models are not supported (supported: {', '.join(HIDDEN_TYPES)})",
                             setting="kinds")
    if per_layer and kinds != ["mlp"]:
        raise UsageError("{per_layer} applies to MLP channels only (query heads stay uniform: grouped-query "
                         "attention needs the same heads per group): give {kinds} mlp", setting=("per_layer", "kinds"))


def split_budget(fam: Family, kinds: list[str], remove: float) -> dict[str, int]:
    """``remove`` parameters split evenly over ``kinds`` -> uniform counts: blocks removed, MLP
    channels per block, query heads per key-value group, hidden channels (the kept width a
    multiple of the query heads, as a stock LLaMA config requires)."""
    cost = step_costs(fam)
    share = remove / len(kinds)
    n = len(fam.layers)
    a, width = fam.attn(0), fam.mlp(0).consumer.weight.shape[1]
    counts = {k: 0 for k in kinds}
    if "blocks" in kinds:
        counts["blocks"] = min(n - 1, round(share / cost["blocks"]))
    kept = (n - counts.get("blocks", 0)) / n
    if "mlp" in kinds:
        counts["mlp"] = min(width - 1, round(share / (cost["mlp"] * kept)))
    if "heads" in kinds:
        counts["heads"] = min(a.heads // a.kv_heads - 1, round(share / (cost["heads"] * kept)))
    if "hidden" in kinds:
        d = fam.model.get_input_embeddings().weight.shape[1]
        heads = a.heads - a.kv_heads * counts.get("heads", 0)
        k = round(share / cost["hidden"])
        keep = max(heads, round((d - k) / heads) * heads)
        counts["hidden"] = d - keep
    if not any(counts.values()):
        raise UsageError(f"the budget ({remove:,.0f} parameters) is smaller than one step of every kind asked for "
                         f"({', '.join(f'{k}: {cost[k]:,.0f}' for k in kinds)} parameters): nothing would be removed",
                         setting="budget")
    return counts


def removal_target(total: int, budget: float | None, target_params: int | None) -> float:
    if (budget is None) == (target_params is None):
        raise UsageError("give a budget (percent of the parameters) or a target parameter count, one of them",
                         setting="budget")
    if budget is not None:
        if isinstance(budget, bool) or not 0 < float(budget) < 100:
            raise UsageError(f"budget {budget!r}: give a percentage above 0 and below 100", setting="budget")
        return total * float(budget) / 100
    if isinstance(target_params, bool) or not 0 < int(target_params) < total:
        raise UsageError(f"target {target_params!r} parameters: give a count above 0 and below the model's "
                         f"{total:,}", setting="target_params")
    return float(total - int(target_params))


# --------------------------------------------------------------------------------------------
# choosing


def choose(fam: Family, calib: Calibration, counts: dict[str, int], by: str, mode: str, per_layer: bool,
           seed: int) -> Plan:
    """The plan: the least fit units of each kind, the same counts in every kept block."""
    gen = torch.Generator().manual_seed(seed)
    n = len(fam.layers)
    drop = []
    if counts.get("blocks"):
        s = block_scores(calib, by, gen)
        drop = sorted(torch.argsort(s, stable=True)[: counts["blocks"]].tolist())
    kept = [i for i in range(n) if i not in drop]
    mlp = {i: unit_scores(fam, "mlp", i, calib, by, mode, gen) for i in kept} if counts.get("mlp") else {}
    heads = {i: unit_scores(fam, "heads", i, calib, by, mode, gen) for i in kept} if counts.get("heads") else {}
    plan = uniform_plan(fam.model, mlp, counts.get("mlp", 0), heads, counts.get("heads", 0))
    if per_layer and mlp:
        plan.mlp = global_mlp(mlp, counts["mlp"] * len(kept))
    plan.drop_blocks = drop
    if counts.get("hidden"):
        s = hidden_scores(calib, by, gen)
        plan.hidden = sorted(torch.argsort(s, descending=True, stable=True)[: s.numel() - counts["hidden"]].tolist())
    return plan


def global_mlp(scores: dict[int, torch.Tensor], total: int) -> dict[int, list[int]]:
    """``total`` MLP channels, the least fit over every block (each block keeps at least one)."""
    flat = sorted((float(s[j]), i, j) for i, s in scores.items() for j in range(len(s)))
    gone: dict[int, set[int]] = {i: set() for i in scores}
    for _v, i, j in flat:
        if total == 0:
            break
        if len(gone[i]) < len(scores[i]) - 1:
            gone[i].add(j)
            total -= 1
    return {i: [j for j in range(len(s)) if j not in gone[i]] for i, s in scores.items()}


def random_plan(fam: Family, plan: Plan, seed: int) -> Plan:
    """The same counts as ``plan`` (per block and per kind), chosen uniformly at random."""
    g = torch.Generator().manual_seed(seed + 1)

    def pick(total, keep):
        return sorted(torch.randperm(total, generator=g)[:keep].tolist())

    out = Plan()
    n = len(fam.layers)
    out.drop_blocks = pick(n, len(plan.drop_blocks)) if plan.drop_blocks else []
    kept = [i for i in range(n) if i not in out.drop_blocks]
    old = [i for i in range(n) if i not in plan.drop_blocks]
    for new_i, old_i in zip(kept, old, strict=True):
        if old_i in plan.mlp:
            out.mlp[new_i] = pick(fam.mlp(new_i).consumer.weight.shape[1], len(plan.mlp[old_i]))
        if old_i in plan.heads:
            a = fam.attn(new_i)
            per, keep = a.heads // a.kv_heads, len(plan.heads[old_i]) // a.kv_heads
            out.heads[new_i] = sorted(gi * per + j for gi in range(a.kv_heads) for j in pick(per, keep))
    if plan.hidden is not None:
        out.hidden = pick(fam.model.get_input_embeddings().weight.shape[1], len(plan.hidden))
    return out


# --------------------------------------------------------------------------------------------
# predicting and measuring


@contextmanager
def ablated(model: nn.Module, plan: Plan, calib: Calibration, mode: str):
    """Hooks on ``model``: the removed units' inputs to their consumers replaced by their
    compensation (``B x_K + c``; 0 with ``none``) and the dropped blocks skipped: what the pruned
    model computes, on the original (exact ablation of the whole removed set)."""
    fam = find_family(model)
    handles = []

    def replace(removed, fit):
        def hook(_m, args):
            x = args[0].clone()
            keep = torch.ones(x.shape[-1], dtype=torch.bool, device=x.device)
            keep[removed] = False
            if fit is None:
                x[..., removed] = 0
            else:
                b, c = fit.b.to(x.device, torch.float64), fit.c.to(x.device, torch.float64)
                x[..., removed] = (x[..., keep].to(torch.float64) @ b.T + c).to(x.dtype)
            return (x,) + tuple(args[1:])
        return hook

    def skip(_m, args, kwargs, out):
        h = args[0] if args else kwargs["hidden_states"]
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    for kind, table in (("mlp", plan.mlp), ("heads", plan.heads)):
        for i, keep in table.items():
            consumer = fam.mlp(i).consumer if kind == "mlp" else fam.attn(i).o
            width = 1 if kind == "mlp" else fam.attn(i).head_dim
            units = consumer.weight.shape[1] // width
            removed = columns_of(sorted(set(range(units)) - set(keep)), width)
            fit = None if mode == "none" else fit_compensation(calib.stats[(kind, i)], removed, consumer.weight, mode)
            handles.append(consumer.m.register_forward_pre_hook(replace(removed, fit)))
    for i in plan.drop_blocks:
        handles.append(fam.layers[i].register_forward_hook(skip, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def predicted_change(model: nn.Module, plan: Plan, calib: Calibration, mode: str, batches: list[dict],
                     before: float | None) -> tuple[float | None, str | None]:
    """The calibration loss change exact ablation predicts, or None with the reason."""
    if before is None:
        return None, None
    if plan.hidden is not None:
        return None, ("the change is not predicted with hidden channels: RMSNorm over fewer channels is another "
                      "function unless the removed channels carry nothing")
    with ablated(model, plan, calib, mode):
        after = lm_loss(model, batches)
    return (None if after is None else after - before), None


def prune_transformer(model: nn.Module, data: Any, *, kinds: Iterable[str] = ("mlp",), budget: float | None = None,
                      target_params: int | None = None, rank_by: str | None = None, compensate: str = "ridge",
                      per_layer: bool = False, eval_data: Any = None, seed: int = 0,
                      source_dir: str | None = None, random_baseline: bool = True) -> TransformerPruneResult:
    """Remove ``budget`` percent of the parameters (or down to ``target_params``) from a deep copy
    of a Hugging Face transformer, split evenly over ``kinds`` (``mlp``, ``heads``, ``hidden``,
    ``blocks``), the least fit units of every block by ``rank_by`` (default ``flap``),
    compensated by ``compensate`` (``ridge``, ``mean`` or ``none``). ``data``: calibration batches
    of token ids; ``eval_data``: held-out batches for the loss and perplexity. See the module
    docstring for the stages; the result says what it cost."""
    kinds = list(dict.fromkeys(kinds))
    by = rank_by or DEFAULT_RANK
    if by not in RANKERS:
        raise UsageError(f"unknown ranking {by!r} for a transformer: use one of {', '.join(RANKERS)}", setting="rank_by")
    if compensate not in MODES:
        raise UsageError(f"unknown compensation {compensate!r}: use one of {', '.join(MODES)}", setting="compensate")
    fam = find_family(model)
    check_kinds(fam, kinds, per_layer)
    total = count_params(model)
    counts = split_budget(fam, kinds, removal_target(total, budget, target_params))
    calib_b, eval_b = token_batches(data), token_batches(eval_data)
    calib = calibrate(model, calib_b)
    plan = choose(fam, calib, counts, by, compensate, per_layer, seed)
    stats = None if compensate == "none" else calib.stats
    log: list = []
    pruned = prune_hf(model, plan, stats=stats, compensate=compensate, log=log)
    notes = []
    problem = uniform_problem(pruned)
    if per_layer and problem:
        notes.append(f"written as .pt2 + safetensors: {problem}")
    before = (lm_loss(model, calib_b), lm_loss(model, eval_b))
    pred, why = predicted_change(model, plan, calib, compensate, calib_b, before[0])
    if why:
        notes.append(why)
    rnd: dict[str, float | None] = {}
    if random_baseline:
        other = prune_hf(model, random_plan(fam, plan, seed), stats=stats, compensate=compensate)
        rnd = {"calib_loss": lm_loss(other, calib_b), "eval_loss": lm_loss(other, eval_b)}
        del other
    if before[0] is None:
        notes.append("no loss: the model is not a causal language model")
    elif not eval_b:
        notes.append("no held-out data (eval data): held-out loss and perplexity not measured")
    notes.append(RETRAIN_NOTE)
    return TransformerPruneResult(
        module=pruned, counts=counts, plan=plan, rank_by=by, compensate=compensate, per_layer=per_layer,
        params=(total, count_params(pruned)), flops_per_token=(flops_per_token(model), flops_per_token(pruned)),
        calib_loss=(before[0], lm_loss(pruned, calib_b)), eval_loss=(before[1], lm_loss(pruned, eval_b)),
        predicted_change=pred, random=rnd, lambdas=dict(Counter(e["choice"] for e in log)), notes=notes,
        source_dir=source_dir)


def prune_from_api(model: nn.Module, data: Any, *, remove: Any = "dead", budget: float | None = None,
                   kinds: Any = None, rank_by: str | None = None, seed: int | None = None,
                   source_dir: str | None = None, target_params: int | None = None, compensate: str | None = None,
                   per_layer: bool = False, eval_data: Any = None) -> TransformerPruneResult:
    """``fitcli.prune`` on a Hugging Face transformer: ``prune_transformer`` with the API's words
    (``kinds`` a list or a comma-separated string, default ``mlp``)."""
    if not (isinstance(remove, str) and remove == "dead"):
        raise UsageError("{remove} is for models pruned through the dependency graph; a Hugging Face transformer "
                         "takes {budget} or {target_params} with {kinds}",
                         setting=("remove", "budget", "target_params", "kinds"))
    if budget is None and target_params is None:
        raise UsageError("a Hugging Face transformer is pruned to a {budget} (percent of the parameters) or "
                         "{target_params}", setting=("budget", "target_params"))
    names = [k.strip() for k in kinds.split(",")] if isinstance(kinds, str) else list(kinds or ["mlp"])
    return prune_transformer(model, data, kinds=[k for k in names if k], budget=budget, target_params=target_params,
                             rank_by=rank_by, compensate=compensate or "ridge", per_layer=per_layer,
                             eval_data=eval_data, seed=0 if seed is None else seed, source_dir=source_dir)


def hf_module(model: Any, how: dict[str, Any]) -> tuple[nn.Module, str | None] | None:
    """(the module, its folder) when ``model`` is a Hugging Face transformer fitcli's own surgery
    prunes (a ``PreTrainedModel`` or a model folder), else None (Torch-Pruning's graph then)."""
    import sys

    folder = None
    if isinstance(model, (str, Path)) and Path(model).is_dir() and (Path(model) / "config.json").is_file():
        from fitcli import api

        folder, model = str(model), api.load(model, **how).module
    tf = sys.modules.get("transformers")
    if tf is None or not isinstance(model, tf.PreTrainedModel):
        return None
    try:
        find_family(model)
    except UsageError:
        return None
    return model, folder


__all__ = ["RANKERS", "DEFAULT_RANK", "MODES", "TransformerPruneResult", "as_inputs", "choose", "count_params",
           "hf_module", "prune_from_api",
           "flops_per_token", "lm_loss", "predicted_change", "prune_transformer", "random_plan", "split_budget", "step_costs", "token_batches"]
