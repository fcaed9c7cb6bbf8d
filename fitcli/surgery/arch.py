"""Where the units of a Hugging Face transformer live: one ``Family`` per supported architecture
(LLaMA-style decoders incl. Mistral and Qwen2, GPT-2, BERT), found by module structure.

Every projection is handled as a ``[out, in]`` matrix: ``Proj`` hides whether the module is an
``nn.Linear`` (weight ``[out, in]``) or a GPT-2 ``Conv1D`` (weight ``[in, out]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fitcli.errors import UsageError

KINDS = ("mlp", "heads", "hidden", "blocks")


def is_conv1d(m: nn.Module) -> bool:
    """A GPT-2 style ``Conv1D``: a linear layer whose weight is stored ``[in, out]``."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


class Proj:
    """A linear projection seen as ``y = W x + b`` with ``W`` ``[out, in]``."""

    def __init__(self, module: nn.Module):
        self.m = module
        self.t = is_conv1d(module)

    @property
    def weight(self) -> torch.Tensor:
        """``W`` as ``[out, in]`` (a view: do not modify)."""
        return self.m.weight.T if self.t else self.m.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.m.bias

    def set(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Replace ``W`` (``[out, in]``) and ``b``; the module's size attributes follow."""
        w = weight.T if self.t else weight
        self.m.weight = nn.Parameter(w.detach().contiguous().clone(), requires_grad=self.m.weight.requires_grad)
        if bias is not None:
            self.m.bias = nn.Parameter(bias.detach().contiguous().clone(), requires_grad=self.m.weight.requires_grad)
        out, inp = weight.shape
        if self.t:
            self.m.nf = out
        else:
            self.m.in_features, self.m.out_features = inp, out

    def keep_out(self, idx: torch.Tensor) -> None:
        b = self.bias
        self.set(self.weight[idx], None if b is None else b[idx])

    def keep_in(self, idx: torch.Tensor) -> None:
        self.set(self.weight[:, idx], self.bias)


@dataclass
class Attn:
    """One block's attention: the projections that make the query heads (rows of ``q``, or of the
    q/k/v slices of a fused projection), the output projection (its input columns are the heads)
    and how many query heads share a key-value head."""

    module: nn.Module
    q: list[Proj]  # projections whose output rows are per query head (q; with MHA also k and v)
    fused: Proj | None  # GPT-2's c_attn: [q; k; v] rows of one projection
    o: Proj
    heads: int
    kv_heads: int
    head_dim: int
    inputs: list[Proj]  # projections reading the residual stream
    outputs: list[Proj]  # projections writing it


@dataclass
class Mlp:
    producers: list[Proj]  # output rows are the channels (gate and up, or fc)
    consumer: Proj  # input columns are the channels (down)


@dataclass
class Family:
    """An architecture's unit locations."""

    name: str
    model: nn.Module
    base: nn.Module  # the module holding the blocks
    layers: nn.ModuleList
    config_keys: dict[str, str]  # unit kind -> the config field holding its count

    def attn(self, i: int) -> Attn:
        return ATTN[self.name](self, self.layers[i])

    def mlp(self, i: int) -> Mlp:
        return MLP[self.name](self.layers[i])

    def attn_modules(self, i: int) -> list[nn.Module]:
        """The modules that carry a ``layer_idx`` (cache slots) in block ``i``."""
        block = self.layers[i]
        return [m for m in block.modules() if hasattr(m, "layer_idx")]


def llama_attn(fam: Family, block: nn.Module) -> Attn:
    a = block.self_attn
    q, k, v, o = (Proj(getattr(a, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    hd = int(a.head_dim)
    heads, kv = q.weight.shape[0] // hd, k.weight.shape[0] // hd
    return Attn(a, [q], None, o, heads, kv, hd, [q, k, v], [o])


def gpt2_attn(fam: Family, block: nn.Module) -> Attn:
    a = block.attn
    c = Proj(a.c_attn)
    hd = int(a.head_dim)
    heads = c.weight.shape[0] // (3 * hd)
    return Attn(a, [], c, Proj(a.c_proj), heads, heads, hd, [c], [Proj(a.c_proj)])


def bert_attn(fam: Family, block: nn.Module) -> Attn:
    s = block.attention.self
    q, k, v = Proj(s.query), Proj(s.key), Proj(s.value)
    hd = int(s.attention_head_size)
    heads = q.weight.shape[0] // hd
    o = Proj(block.attention.output.dense)
    return Attn(s, [q, k, v], None, o, heads, heads, hd, [q, k, v], [o])


def llama_mlp(block: nn.Module) -> Mlp:
    m = block.mlp
    return Mlp([Proj(m.gate_proj), Proj(m.up_proj)], Proj(m.down_proj))


def gpt2_mlp(block: nn.Module) -> Mlp:
    return Mlp([Proj(block.mlp.c_fc)], Proj(block.mlp.c_proj))


def bert_mlp(block: nn.Module) -> Mlp:
    return Mlp([Proj(block.intermediate.dense)], Proj(block.output.dense))


ATTN = {"llama": llama_attn, "gpt2": gpt2_attn, "bert": bert_attn}
MLP = {"llama": llama_mlp, "gpt2": gpt2_mlp, "bert": bert_mlp}
CONFIG_KEYS = {
    "llama": {"mlp": "intermediate_size", "heads": "num_attention_heads", "hidden": "hidden_size", "blocks": "num_hidden_layers"},
    "gpt2": {"mlp": "n_inner", "heads": "n_head", "hidden": "n_embd", "blocks": "n_layer"},
    "bert": {"mlp": "intermediate_size", "heads": "num_attention_heads", "hidden": "hidden_size", "blocks": "num_hidden_layers"},
}
# what a stock config of the family cannot hold, and why
UNSUPPORTED = {
    "gpt2": {"hidden": "GPT-2's config derives the attention width and head size from n_embd (it has no head_dim), "
                       "and LayerNorm centres over every channel: hidden channels cannot be removed exactly or stored",
             "heads": "GPT-2's config has no head_dim: n_embd / n_head is the head size, so fewer heads of the same "
                      "size cannot be stored in a stock config"},
    "bert": {"hidden": "BERT's config derives the attention width and head size from hidden_size (it has no head_dim), "
                       "and LayerNorm centres over every channel: hidden channels cannot be removed exactly or stored",
             "heads": "BERT's config has no head_dim: hidden_size / num_attention_heads is the head size, so fewer "
                      "heads of the same size cannot be stored in a stock config"},
}


def _llama_base(model: nn.Module) -> nn.Module | None:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) and all(
            hasattr(b, "self_attn") and hasattr(b, "mlp") and hasattr(b.mlp, "gate_proj")
            and hasattr(b.self_attn, "q_proj") for b in layers):
        return base
    return None


def find_family(model: nn.Module) -> Family:
    """The ``Family`` of a supported Hugging Face model, or UsageError naming what is supported."""
    base = _llama_base(model)
    if base is not None:
        return Family("llama", model, base, base.layers, CONFIG_KEYS["llama"])
    tr = getattr(model, "transformer", model)
    if isinstance(getattr(tr, "h", None), nn.ModuleList) and hasattr(tr, "wte"):
        return Family("gpt2", model, tr, tr.h, CONFIG_KEYS["gpt2"])
    bert = getattr(model, "bert", model)
    enc = getattr(bert, "encoder", None)
    if enc is not None and isinstance(getattr(enc, "layer", None), nn.ModuleList) and hasattr(bert, "embeddings"):
        return Family("bert", model, bert, enc.layer, CONFIG_KEYS["bert"])
    raise UsageError(f"no transformer surgery for {type(model).__name__}: supported are LLaMA-style decoders "
                     "(LLaMA, Mistral, Qwen2: q/k/v/o and gate/up/down projections), GPT-2 and BERT")


__all__ = ["KINDS", "Attn", "Family", "Mlp", "Proj", "UNSUPPORTED", "find_family", "is_conv1d"]
