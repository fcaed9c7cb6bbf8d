"""Heads of ``nn.MultiheadAttention``: its output projection is applied functionally, so the
per-head context is never a module input a hook could see. While a tap is active, the module's
forward is replaced on the instance by the same computation written out (PyTorch's formulas, the
module's own parameters), which hands the concatenated per-head context ``z`` ([batch, steps,
heads x head_dim]) to the callback before the output projection; put back after.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def supported(mod: nn.MultiheadAttention) -> str | None:
    if mod.bias_k is not None or mod.add_zero_attn:
        return "MultiheadAttention with bias_k/bias_v or add_zero_attn: heads not supported yet"
    return None


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def tapped_forward(mod: nn.MultiheadAttention, callback: Callable[[torch.Tensor], torch.Tensor]):
    def forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: Any = None,
                need_weights: bool = True, attn_mask: Any = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        q, k, v = (t.unsqueeze(0 if mod.batch_first else 1) if unbatched else t for t in (query, key, value))
        if not mod.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        b, tq, e = q.shape
        tk = k.shape[1]
        h, d = mod.num_heads, mod.head_dim
        if mod._qkv_same_embed_dim:
            wq, wk, wv = mod.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = mod.q_proj_weight, mod.k_proj_weight, mod.v_proj_weight
        bq, bk, bv = mod.in_proj_bias.chunk(3) if mod.in_proj_bias is not None else (None, None, None)
        qh = F.linear(q, wq, bq).reshape(b, tq, h, d).transpose(1, 2)
        kh = F.linear(k, wk, bk).reshape(b, tk, h, d).transpose(1, 2)
        vh = F.linear(v, wv, bv).reshape(b, tk, h, d).transpose(1, 2)
        scores = qh @ kh.transpose(-2, -1) / math.sqrt(d)  # [b, h, tq, tk]
        am = _additive(attn_mask, scores.dtype)
        if am is not None:
            scores = scores + (am.reshape(b, h, tq, tk) if am.dim() == 3 else am)
        elif is_causal:
            causal = torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
        kpm = _additive(key_padding_mask, scores.dtype)
        if kpm is not None:
            scores = scores + kpm.reshape(b, 1, 1, tk)
        attn = torch.softmax(scores, dim=-1)
        if mod.training and mod.dropout > 0:
            attn = F.dropout(attn, mod.dropout)
        z = (attn @ vh).transpose(1, 2).reshape(b, tq, h * d)
        z = callback(z)
        out = F.linear(z, mod.out_proj.weight, mod.out_proj.bias)
        if not mod.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = attn.mean(dim=1) if average_attn_weights else attn
        if unbatched:
            out = out.squeeze(0 if mod.batch_first else 1)
            weights = weights.squeeze(0) if weights is not None else None
        return out, weights
    return forward


@contextlib.contextmanager
def tap(modules: dict[str, nn.Module], callbacks: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    """``callbacks``: attention module name -> callback. Always put back."""
    patched = []
    try:
        for name, cb in callbacks.items():
            mod = modules[name]
            patched.append((mod, "forward" in mod.__dict__, mod.__dict__.get("forward")))
            mod.forward = tapped_forward(mod, cb)
        yield
    finally:
        for mod, had, old in patched:
            if had:
                mod.forward = old
            else:
                del mod.forward


# --------------------------------------------------------------------------------------------
# attention probabilities, read during an audit's forward (the attention metrics)


@contextlib.contextmanager
def attention_probabilities(plan: Any, fed: dict[str, list[Any]]) -> Iterator[dict[str, torch.Tensor]]:
    """Attention probabilities ``[batch, heads, queries, keys]`` of the head layers whose metrics
    need them, read from the attention module's output during the forward (forward hooks, always
    removed). ``nn.MultiheadAttention`` is asked for per-head weights and still returns to its
    caller what the caller asked for; a Hugging Face module in eager mode returns them anyway."""
    probs: dict[str, torch.Tensor] = {}
    wanted = [lay for lay in plan.layers if lay.attention is not None
              and any("attention" in m.all_needs() for m in fed.get(lay.name, []))]
    if not wanted:
        yield probs
        return
    mods = dict(plan.graph.runner.named_modules())
    handles = []
    try:
        for lay in wanted:
            name, how = lay.attention
            handles.extend(_attention_hooks(mods[name], how, lay.name, probs))
        yield probs
    finally:
        for h in handles:
            h.remove()


_MHA_SIGNATURE = inspect.signature(torch.nn.MultiheadAttention.forward)


def _attention_hooks(mod: torch.nn.Module, how: str, layer: str, probs: dict[str, torch.Tensor]) -> list:
    asked: dict[str, Any] = {}

    def pre(m, args, kwargs):  # ask nn.MultiheadAttention for per-head weights; remember what the caller asked
        a = _MHA_SIGNATURE.bind(m, *args, **kwargs)
        a.apply_defaults()
        asked["need"], asked["average"] = a.arguments["need_weights"], a.arguments["average_attn_weights"]
        call = {k: v for k, v in a.arguments.items() if k != "self"}
        return (), {**call, "need_weights": True, "average_attn_weights": False}

    def post(m, args, kwargs, out):
        w = out[1] if isinstance(out, tuple) and len(out) > 1 else None
        if isinstance(w, torch.Tensor) and w.dim() == 4:
            probs[layer] = w.detach()
        if how != "mha":
            return out
        if not asked["need"]:
            return out[0], None
        return out[0], (w.mean(dim=1) if asked["average"] and w is not None else w)

    hs = [mod.register_forward_hook(post, with_kwargs=True, prepend=True)]  # before the user's hooks: they see what was asked
    if how == "mha":
        hs.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    return hs
