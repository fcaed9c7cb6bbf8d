"""Structural surgery on Hugging Face transformers: MLP channels, query heads, hidden channels
and whole blocks. ``prune_hf(model, plan)`` returns a new, smaller model; the input model is
never modified (its weights stay bitwise identical).

Order of work on the copy: compensation is folded into the consumers first (on the full-width
layers), then MLP channels and heads are cut per block, then hidden channels, then blocks go
(plan indices always refer to the input model's blocks).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fitcli.compensate import MODES, SplitGram, columns_of, fit_compensation, fold
from fitcli.errors import UsageError
from fitcli.surgery.arch import UNSUPPORTED, Family, Proj, find_family

# LLaMA-style model types whose blocks have exactly an input and a post-attention RMSNorm (x·w)
HIDDEN_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class Plan:
    """What to keep. ``mlp`` / ``heads``: block index -> the MLP channels / query heads to keep;
    ``hidden``: the hidden (residual-stream) channels to keep; ``drop_blocks``: blocks to remove.
    Indices refer to the input model."""

    mlp: dict[int, Sequence[int]] = field(default_factory=dict)
    heads: dict[int, Sequence[int]] = field(default_factory=dict)
    hidden: Sequence[int] | None = None
    drop_blocks: Sequence[int] = ()


def _index(keep: Sequence[int], total: int, what: str) -> torch.Tensor:
    idx = torch.as_tensor(list(keep), dtype=torch.long).reshape(-1)
    if idx.numel() == 0:
        raise UsageError(f"{what}: nothing would be kept; keep at least one")
    if int(idx.min()) < 0 or int(idx.max()) >= total:
        raise UsageError(f"{what}: index out of range (it has {total})")
    if idx.unique().numel() != idx.numel():
        raise UsageError(f"{what}: an index is listed twice")
    return idx.sort().values


def check_plan(fam: Family, plan: Plan) -> None:
    """UsageError for a plan the model cannot take (before anything is built)."""
    n = len(fam.layers)
    for kind, table in (("mlp", plan.mlp), ("heads", plan.heads)):
        for i in table:
            if not 0 <= int(i) < n:
                raise UsageError(f"{kind}: block {i} does not exist (the model has {n})")
    drop = sorted({int(i) for i in plan.drop_blocks})
    if any(not 0 <= i < n for i in drop):
        raise UsageError(f"blocks: index out of range (the model has {n} blocks)")
    if len(drop) == n:
        raise UsageError("blocks: every block would be removed; keep at least one")
    if plan.hidden is not None and "hidden" in UNSUPPORTED.get(fam.name, {}):
        raise UsageError(UNSUPPORTED[fam.name]["hidden"])
    model_type = getattr(getattr(fam.model, "config", None), "model_type", None)
    if plan.hidden is not None and model_type not in HIDDEN_TYPES:
        raise UsageError(f"hidden channels: {model_type!r} models are not supported (their norms may differ from "
                         f"the two RMSNorms per block this surgery rescales); supported: {', '.join(HIDDEN_TYPES)}")
    for i, keep in plan.heads.items():
        a = fam.attn(int(i))
        idx = _index(keep, a.heads, f"heads of block {i}")
        check_groups(idx, a.heads, a.kv_heads, int(i))


def check_groups(idx: torch.Tensor, heads: int, kv_heads: int, block: int) -> None:
    """With grouped-query attention the same number of query heads must stay in every group."""
    per = heads // kv_heads
    counts = torch.bincount(idx // per, minlength=kv_heads)
    if kv_heads < heads and int(counts.min()) != int(counts.max()):
        raise UsageError(f"heads of block {block}: grouped-query attention keeps every key-value head, so the same "
                         f"number of query heads must stay in each of its {kv_heads} groups (kept per group: "
                         f"{counts.tolist()})")


def prune_hf(model: nn.Module, plan: Plan, stats: dict | None = None, compensate: str | None = None,
             log: list | None = None) -> nn.Module:
    """A pruned deep copy of ``model``. ``stats``: calibration sums from ``collect_stats`` (keys
    ``("mlp", i)`` / ``("heads", i)``); the removed units are compensated by ``compensate``
    (``ridge``, ``mean`` or ``none``; default ``ridge`` with stats, ``none`` without) and each
    fit's summary is appended to ``log``."""
    fam = find_family(model)
    check_plan(fam, plan)
    compensate = compensate or ("ridge" if stats else "none")
    if compensate not in MODES:
        raise UsageError(f"unknown compensation {compensate!r}: use one of {', '.join(MODES)}")
    if compensate != "none":
        wanted = [("mlp", int(i)) for i in plan.mlp] + [("heads", int(i)) for i in plan.heads]
        missing = [f"block {i} {k}" for k, i in wanted if (k, i) not in (stats or {})]
        if missing:
            raise UsageError(f"{compensate} compensation needs calibration sums (collect_stats) for "
                             f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    new = copy.deepcopy(model)
    nfam = find_family(new)
    stats = stats or {}
    for i, keep in sorted(plan.mlp.items()):
        prune_mlp(nfam, int(i), keep, stats.get(("mlp", int(i))), compensate, log)
    for i, keep in sorted(plan.heads.items()):
        prune_heads(nfam, int(i), keep, stats.get(("heads", int(i))), compensate, log)
    if plan.hidden is not None:
        prune_hidden(nfam, plan.hidden)
    if plan.drop_blocks:
        drop_blocks(nfam, plan.drop_blocks)
    harmonise_biases(nfam)
    update_config(nfam)
    return new


def compensate_consumer(consumer: Proj, removed_cols: torch.Tensor, stats: SplitGram | None, mode: str,
                        log: list | None, where: str) -> None:
    """Fold the compensation for removing ``removed_cols`` into ``consumer`` (full width)."""
    if stats is None or mode == "none" or removed_cols.numel() == 0:
        return
    fit = fit_compensation(stats, removed_cols, consumer.weight, mode=mode)
    removed_cols = removed_cols.to(consumer.weight.device)
    keep = torch.ones(consumer.weight.shape[1], dtype=torch.bool, device=removed_cols.device)
    keep[removed_cols] = False
    new_w, new_b = fold(consumer.weight, consumer.bias, removed_cols, fit)
    w = consumer.weight.detach().clone()
    w[:, keep] = new_w
    w[:, removed_cols] = 0  # about to be cut
    consumer.set(w, new_b if (consumer.bias is not None or bool(new_b.any())) else None)
    if log is not None:
        log.append({"where": where, **fit.summary()})


def prune_mlp(fam: Family, i: int, keep: Sequence[int], stats: SplitGram | None, mode: str, log: list | None) -> None:
    m = fam.mlp(i)
    width = m.consumer.weight.shape[1]
    idx = _index(keep, width, f"MLP channels of block {i}")
    removed = torch.tensor(sorted(set(range(width)) - set(idx.tolist())), dtype=torch.long)
    compensate_consumer(m.consumer, removed, stats, mode, log, f"block {i} mlp")
    for p in m.producers:
        p.keep_out(idx)
    m.consumer.keep_in(idx)


def prune_heads(fam: Family, i: int, keep: Sequence[int], stats: SplitGram | None, mode: str, log: list | None) -> None:
    a = fam.attn(i)
    idx = _index(keep, a.heads, f"heads of block {i}")
    removed = torch.tensor(sorted(set(range(a.heads)) - set(idx.tolist())), dtype=torch.long)
    compensate_consumer(a.o, columns_of(removed, a.head_dim), stats, mode, log, f"block {i} heads")
    cols = columns_of(idx, a.head_dim)
    for p in a.q:
        p.keep_out(cols)
    if a.fused is not None:  # [q; k; v], each heads x head_dim rows
        span = a.heads * a.head_dim
        a.fused.keep_out(torch.cat([cols, cols + span, cols + 2 * span]))
    a.o.keep_in(cols)
    n = idx.numel()
    mod = a.module
    if hasattr(mod, "num_key_value_groups"):
        mod.num_key_value_groups = n // a.kv_heads
    for attr in ("num_heads", "num_attention_heads"):
        if hasattr(mod, attr):
            setattr(mod, attr, n)
    if hasattr(mod, "split_size"):
        mod.split_size = n * a.head_dim
    if hasattr(mod, "all_head_size"):
        mod.all_head_size = n * a.head_dim


def prune_hidden(fam: Family, keep: Sequence[int]) -> None:
    """LLaMA-style models: the embedding columns, every RMSNorm, every residual read (columns)
    and write (rows), the final norm and the head(s) reading it (a tied head stays tied). RMSNorm over fewer channels is rescaled
    by √(d/d') with ε·d/d', so the function is unchanged where the removed channels are zero
    everywhere in the residual stream (their energy is otherwise lost)."""
    emb = fam.base.embed_tokens
    d = emb.weight.shape[1]
    idx = _index(keep, d, "hidden channels")
    inside = {id(m) for m in fam.base.modules()}
    heads = [m for m in fam.model.modules() if isinstance(m, nn.Linear) and id(m) not in inside and m.in_features == d]
    tied = [h for h in heads if h.weight is emb.weight]
    emb.weight = nn.Parameter(emb.weight.detach()[:, idx].clone(), requires_grad=emb.weight.requires_grad)
    emb.embedding_dim = idx.numel()
    ratio = d / idx.numel()
    norms = [fam.base.norm] + [n for b in fam.layers for n in (b.input_layernorm, b.post_attention_layernorm)]
    for norm in norms:
        slice_norm(norm, idx, ratio)
    for i in range(len(fam.layers)):
        a, m = fam.attn(i), fam.mlp(i)
        for p in a.inputs + m.producers:
            p.keep_in(idx)
        for p in a.outputs + [m.consumer]:
            p.keep_out(idx)
    for head in heads:  # lm_head, or a classifier's score: reads the final norm's output
        if any(head is h for h in tied):
            head.weight = emb.weight
            head.in_features = idx.numel()
        else:
            Proj(head).keep_in(idx)


def slice_norm(norm: nn.Module, idx: torch.Tensor, ratio: float) -> None:
    """Keep ``idx`` of an RMSNorm's weight, scaled by √ratio; ε times ratio."""
    w = norm.weight.detach()[idx] * math.sqrt(ratio)
    norm.weight = nn.Parameter(w.to(norm.weight.dtype).clone(), requires_grad=norm.weight.requires_grad)
    for attr in ("variance_epsilon", "eps"):
        if isinstance(getattr(norm, attr, None), float):
            setattr(norm, attr, getattr(norm, attr) * ratio)
    if getattr(norm, "bias", None) is not None:
        norm.bias = nn.Parameter(norm.bias.detach()[idx].clone())


def drop_blocks(fam: Family, drop: Sequence[int]) -> None:
    """Remove blocks; later blocks' ``layer_idx`` (cache slots) renumbered from 0."""
    gone = {int(i) for i in drop}
    kept = [b for j, b in enumerate(fam.layers) if j not in gone]
    layers = fam.layers
    while len(layers):
        del layers[len(layers) - 1]
    for b in kept:
        layers.append(b)
    for j in range(len(layers)):
        for m in fam.attn_modules(j):
            m.layer_idx = j
    cfg = getattr(fam.model, "config", None)
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, list):
        cfg.layer_types = [t for j, t in enumerate(types) if j not in gone]


def harmonise_biases(fam: Family) -> None:
    """A stock LLaMA config has one flag per kind (``mlp_bias``, ``attention_bias``): when
    compensation gave one projection a bias, every projection of that kind gets one (zeros)."""
    if fam.name != "llama":
        return
    cfg = fam.model.config
    for flag, get in (("mlp_bias", lambda i: fam.mlp(i).producers + [fam.mlp(i).consumer]),
                      ("attention_bias", lambda i: fam.attn(i).inputs + fam.attn(i).outputs)):
        projs = [p for i in range(len(fam.layers)) for p in get(i)]
        if any(p.bias is not None for p in projs):
            for p in projs:
                if p.bias is None:
                    w = p.weight
                    p.set(w, torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
            setattr(cfg, flag, True)


def layer_counts(fam: Family) -> dict[str, list[int]]:
    """Per block: MLP channels, query heads; and the hidden width (one entry)."""
    n = len(fam.layers)
    return {"mlp": [fam.mlp(i).consumer.weight.shape[1] for i in range(n)],
            "heads": [fam.attn(i).heads for i in range(n)],
            "hidden": [fam.mlp(0).consumer.weight.shape[0]]}


def update_config(fam: Family) -> None:
    """The in-memory config follows the model where the counts are uniform (generation builds
    its cache from ``num_hidden_layers``); a non-uniform count is left for the saver to refuse."""
    cfg = getattr(fam.model, "config", None)
    if cfg is None:
        return
    keys = fam.config_keys
    setattr(cfg, keys["blocks"], len(fam.layers))
    counts = layer_counts(fam)
    if len(set(counts["mlp"])) == 1:
        setattr(cfg, keys["mlp"], counts["mlp"][0])
    if fam.name == "llama":
        if len(set(counts["heads"])) == 1:
            cfg.head_dim = fam.attn(0).head_dim
            cfg.num_attention_heads = counts["heads"][0]
        d = counts["hidden"][0]
        if d != cfg.hidden_size:
            cfg.rms_norm_eps = float(cfg.rms_norm_eps) * cfg.hidden_size / d
            cfg.head_dim = fam.attn(0).head_dim
            cfg.hidden_size = d


__all__ = ["Plan", "check_plan", "drop_blocks", "layer_counts", "prune_hf", "update_config"]
