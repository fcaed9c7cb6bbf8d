"""What each layer is to a transformer, the unit kinds a user picks with ``kinds``:

- ``heads``: attention heads (the layers whose kind ``is_head``), and with grouped-query
  attention each key-value group too (its own table: ``kv_groups``);
- ``mlp``: the MLP channels of a block: the gated channels (the input of the down projection),
  or, for a plain MLP, the channels of its first linear layer read after the activation (GPT-2
  ``mlp.c_fc``, BERT ``intermediate.dense``): a channel layer of a block with heads, outside the
  attention module, whose width is not the model's and whose chain goes through an operation;
- ``hidden``: the layers of the registered kind named "hidden" (the residual stream's channels);
- ``blocks``: the residual blocks themselves (measured whole, not a layer);
- ``rows``: every other layer (projection rows, the output head, embeddings).

A model is a transformer here when one of its blocks (the item of a layer stack holding an
attention module: the path up to the last numeric name component of its heads) has both heads and
an MLP: a Hugging Face transformer, a stack of ``nn.TransformerEncoderLayer`` or blocks of one's
own with ``nn.MultiheadAttention`` and an MLP. A transformer's default kinds are heads, mlp and
blocks (projection rows only when asked for); any other model keeps every layer but the opt-in
ones by default (its kinds are there when asked for). Name patterns (``--layer fc2``) select
layers as without kinds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fitcli.errors import UsageError

KINDS = ("heads", "mlp", "hidden", "blocks", "rows")
# the kinds of layer entries, in the order of the report's tables ("heads" also picks "kv_groups")
LAYER_KINDS = ("heads", "kv_groups", "mlp", "hidden", "rows")
PICKS = {"heads": ("heads", "kv_groups")}
TRANSFORMER_DEFAULT = ("heads", "mlp", "blocks")


def block_of(name: str, blocks: Any = None) -> str | None:
    """The block a layer belongs to. Without ``blocks``: its name up to the last numeric component
    (``model.layers.3`` for an attention module's heads, ``0.layers.1`` for those of an encoder
    wrapped in ``nn.Sequential``); with ``blocks`` (the blocks of the heads): the innermost of them
    holding it (``model.layers.3`` for ``model.layers.3.mlp.experts.5.down_proj``)."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i, p in enumerate(parts) if p.isdigit()]
    if blocks is None:
        return prefixes[-1] if prefixes else None
    inside = [b for b in prefixes if b in blocks]
    return inside[-1] if inside else None


def _attention_module(head_name: str) -> str:
    return head_name[: -len(".heads")] if head_name.endswith(".heads") else head_name


def _plain_mlp(lay: Any, heads: dict[str, list[Any]]) -> bool:
    """A channel layer of a block with heads, outside its attention modules, wider or narrower than
    the model (heads x head width) and followed by an operation (the activation)."""
    block = block_of(lay.name, heads)
    if block is None or block not in heads or not lay.kind.chained or lay.final or len(lay.chain) < 2:
        return False
    widths = {h.units * (h.head_dim or 0) for h in heads[block]}
    inside = any(lay.name.startswith(_attention_module(h.name) + ".") for h in heads[block])
    return not inside and lay.units not in widths


def roles(layers: list[Any]) -> dict[str, str]:
    """Layer name -> its kind among ``KINDS`` (never "blocks": blocks are not layers)."""
    heads: dict[str, list[Any]] = {}
    for lay in layers:
        if lay.kind.is_head and block_of(lay.name) is not None:
            heads.setdefault(block_of(lay.name), []).append(lay)
    out = {}
    for lay in layers:
        if lay.kind.is_head:
            out[lay.name] = "kv_groups" if lay.kind.name == "kv_groups" else "heads"
        elif lay.kind.name == "gated" or _plain_mlp(lay, heads):
            out[lay.name] = "mlp"
        elif lay.kind.name == "hidden":
            out[lay.name] = "hidden"
        else:
            out[lay.name] = "rows"
    return out


def transformer(layers: list[Any], role: dict[str, str]) -> bool:
    """Has a block both heads and MLP channels?"""
    with_heads = {block_of(n) for n, r in role.items() if r == "heads"} - {None}
    return any(block_of(n, with_heads) is not None for n, r in role.items() if r == "mlp")


@dataclass
class KindChoice:
    """The unit kinds an audit covers: ``kinds`` (None: the selection of a model that is not a
    transformer, by layers, as without kinds), the kind of every layer (``roles``; empty when
    kinds are not in use), and the residual blocks to measure (``blocks``)."""

    kinds: tuple[str, ...] | None = None
    roles: dict[str, str] = field(default_factory=dict)
    blocks: list[str] = field(default_factory=list)


def transformer_blocks(role: dict[str, str], model: Any) -> list[str]:
    """The blocks (modules of ``model``) with both heads and MLP channels, in the model's order."""
    with_heads = {block_of(n) for n, r in role.items() if r == "heads"} - {None}
    both = {block_of(n, with_heads) for n, r in role.items() if r == "mlp"} - {None}
    return [n for n, _ in model.named_modules() if n in both] if model is not None else []


def _present(role: dict[str, str], blocks: list[str]) -> list[str]:
    have = {"heads" if r == "kv_groups" else r for r in role.values()} | ({"blocks"} if blocks else set())
    return [k for k in KINDS if k in have]


def _checked(kinds: list[str], present: list[str]) -> tuple[str, ...]:
    has = f"the kinds this model has: {', '.join(present)}" if present else "this model has none of these kinds"
    for k in kinds:
        if k not in KINDS:
            raise UsageError(f"{{kinds}}: {k!r} is not a unit kind (one of {', '.join(KINDS)}; {has})",
                             setting="kinds")
        if k not in present:
            raise UsageError(f"{{kinds}}: this model has no {k} units ({has})", setting="kinds")
    return tuple(k for k in KINDS if k in kinds)


def choose(layers: list[Any], by_pattern: list[Any], patterns: bool, kinds: list[str] | None, model: Any,
           find_blocks: Any) -> tuple[list[Any], KindChoice]:
    """The layers an audit covers and its kinds. ``by_pattern``: the layers the name patterns (or
    the default selection) chose; ``find_blocks()``: the residual blocks of a model that is not a
    transformer (one forward: asked only when blocks are asked for)."""
    role = roles(layers)
    is_tf = transformer(layers, role)
    if not kinds and (patterns or not is_tf):  # as without kinds: a transformer's layers still say their kind
        return by_pattern, KindChoice(roles={lay.name: role[lay.name] for lay in by_pattern} if is_tf else {})
    blocks = transformer_blocks(role, model) if is_tf else []
    if kinds and "blocks" in kinds and not is_tf:
        blocks = list(find_blocks())
    picked = _checked(list(kinds), _present(role, blocks)) if kinds else TRANSFORMER_DEFAULT
    pool = by_pattern if patterns else layers
    roles_picked = {r for k in picked for r in PICKS.get(k, (k,))}
    chosen = [lay for lay in pool if role[lay.name] in roles_picked]
    return chosen, KindChoice(kinds=picked, roles={lay.name: role[lay.name] for lay in chosen},
                              blocks=blocks if "blocks" in picked else [])


__all__ = ["KINDS", "LAYER_KINDS", "TRANSFORMER_DEFAULT", "KindChoice", "block_of", "choose", "roles", "transformer",
           "transformer_blocks"]
