"""Hidden channels: the model dimension of a pre-norm transformer, shared by the embeddings, every
residual add and every normalisation layer (channel i of the residual stream is one unit).

- **read** at every normalisation layer's output (``LayerNorm`` / ``RMSNorm`` modules of the model's
  width, Hugging Face's ``LlamaRMSNorm`` included): one tap per forward hands the metrics the L
  norm outputs stacked, ``[L, batch, tokens, width]``, viewed as L·batch samples of ``tokens``
  observations (padding excluded). A metric's mean over samples or observations is then its mean
  over the norm outputs: L times it is Minitron's sum over the layers.
- **ablated** in the residual stream: channel i is zeroed where the stream is written, the stream
  entering the first block (the embeddings, position embeddings added) and every attention and MLP
  sublayer's output, by forward hooks (``ablation_tap``); the weights are never edited.

Found from the whole model (``find_in_model``): the blocks are the parents of the attention
modules (``HeadKind``) that also hold an MLP: a child named ``mlp``, ``feed_forward`` or ``ffn``
(a pre-norm decoder: LLaMA, GPT-2 and their kin), else the block's down projection, a linear child
outside the attention module from a width other than the model's to the model's (``linear2`` of
``nn.TransformerEncoderLayer``, ``fc_out`` of a block of one's own). A post-norm block (one saying
``norm_first=False``: ``nn.TransformerEncoderLayer`` by default) writes the stream with its norms
too: they are ablated with the other writes. Opt-in: asked for by name (``model.hidden``) or glob.
This module imports no torch at import time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fitcli.discovery.kinds import HEADS, UnitKind, add_builtin
from fitcli.discovery.model import Layer, unit_view

NORM_SUFFIXES = ("LayerNorm", "RMSNorm")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
# means over (norm output, sample) or (norm output, token) that are reported summed over the norm outputs
SUMMED = frozenset({"act_mean", "taylor", "taylor_delta"})


@dataclass
class HiddenLayer(Layer):
    """A hidden-channel layer: where its channels are read and where the stream is written."""

    norms: list[str] = field(default_factory=list)  # the normalisation modules read, in call order
    entry: str = ""  # the first block: the stream entering it is the embeddings' write
    writes: list[str] = field(default_factory=list)  # every attention and MLP module adding to the stream


def is_norm(module: Any) -> bool:
    """A normalisation module (``nn.LayerNorm``, ``nn.RMSNorm``, ``LlamaRMSNorm``, ...)."""
    return type(module).__name__.endswith(NORM_SUFFIXES)


def norm_width(module: Any) -> int | None:
    """The width a normalisation module normalises over (its last dimension), if one."""
    w = getattr(module, "weight", None)
    if w is not None and getattr(w, "dim", None) is not None and w.dim() == 1:
        return int(w.shape[0])
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and len(shape) == 1:
        return int(shape[0])
    return None


def down_projection(block: str, attn: str, width: int | None, mods: dict[str, Any]) -> str | None:
    """A block's MLP write without an MLP child: its last linear child outside the attention module
    from another width to the model's (``width``: the attention's output)."""
    found = None
    for n, m in mods.items():
        if n.rsplit(".", 1)[0] != block or n == attn or n.startswith(attn + "."):
            continue
        w = getattr(m, "weight", None)
        if type(m).__name__ == "Linear" and w is not None and w.dim() == 2 and width is not None \
                and int(w.shape[0]) == width and int(w.shape[1]) != width:
            found = n
    return found


def blocks_of(model: Any, mods: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(block, attention module, MLP module) of every block holding both, in model order."""
    found = []
    for lay, _proj in HEADS.find_in_model(model):
        attn = lay.name[: -len(".heads")]
        block = attn.rsplit(".", 1)[0] if "." in attn else ""
        mlp = next((f"{block}.{c}" if block else c for c in MLP_NAMES if (f"{block}.{c}" if block else c) in mods), None)
        if block and mlp is None:
            mlp = down_projection(block, attn, lay.units * lay.head_dim if lay.head_dim else None, mods)
        if block and mlp is not None:
            found.append((block, attn, mlp))
    return found


def post_norms(blocks: list[tuple[str, str, str]], mods: dict[str, Any], width: int) -> list[str]:
    """The norms of the post-norm blocks (``norm_first=False``): they write the stream."""
    post = {b for b, _a, _m in blocks if getattr(mods[b], "norm_first", None) is False}
    return [n for n, m in mods.items() if n.rsplit(".", 1)[0] in post and is_norm(m) and norm_width(m) == width]


class HiddenKind(UnitKind):
    """Hidden (residual stream) channels of a pre-norm transformer; see the module's docstring."""

    name = "hidden"
    opt_in = True
    point_kinds = ("hidden",)

    def find(self, name: str, module: Any) -> list[Layer]:
        return []  # found from the whole model: see find_in_model

    def find_in_model(self, model: Any, called: set[str] | None = None) -> list[Layer]:
        """The model's hidden-channel layer (``[]`` without pre-norm blocks); ``called``: the
        modules a forward called (the norms never called are not read)."""
        mods = dict(model.named_modules())
        blocks = blocks_of(model, mods)
        if not blocks:
            return []
        first = blocks[0][0]
        inner = [m for n, m in mods.items() if n.startswith(first + ".") and is_norm(m) and norm_width(m)]
        if not inner:
            return []
        width = norm_width(inner[0])
        norms = [n for n, m in mods.items() if n and is_norm(m) and norm_width(m) == width
                 and (called is None or n in called)]
        if not norms:
            return []
        container = first.rsplit(".", 1)[0] if "." in first else ""
        prefix = container.rsplit(".", 1)[0] if "." in container else ""
        name = f"{prefix}.hidden" if prefix and "hidden" in mods else "hidden"  # a module's name is never taken
        parts = [(f"{n}.weight", mods[n].weight, 0) for n in norms if getattr(mods[n], "weight", None) is not None]
        writes = list(dict.fromkeys([w for _b, attn, mlp in blocks for w in (attn, mlp)]
                                    + post_norms(blocks, mods, int(width))))
        return [HiddenLayer(name=name, type="Hidden", units=int(width), unit_dim=-1, parts=parts, bias=None,
                            point=f"{len(norms)} norm outputs", point_kind="hidden",
                            chain=[f"{len({b for b, _a, _m in blocks})} blocks: {len(norms)} norms read, "
                                   f"{len(writes) + 1} writes"],
                            norms=norms, entry=first, writes=writes, kind=self)]

    def aggregate(self, layer: Layer, metric: str, value: Any) -> Any:
        """A metric's value as reported: the per-point means of ``SUMMED`` metrics summed over the
        L norm outputs (Minitron's aggregation: mean |x| over tokens, summed over the layers; the
        Taylor values of each point, summed); the other metrics pooled over every norm output."""
        norms = len(getattr(layer, "norms", ()) or ())
        return value * norms if metric in SUMMED and norms else value

    def view(self, layer: Layer, t: Any) -> Any:
        """``[L, batch, ..., width]`` (the stacked norm outputs) as ``[L·batch, width, positions]``."""
        return unit_view(t.reshape(-1, *t.shape[2:]), -1)

    def units_view(self, layer: Layer, t: Any) -> Any:
        """A write into the stream (``[batch, ..., width]``) with channels at dim 1."""
        return t.movedim(-1, 1)

    def removal(self, layer: Layer) -> str | None:
        return ("hidden channels: removing one cuts every layer that reads or writes the residual stream; "
                "not supported yet")

    def token_mask(self, layer: Layer, t: Any, mask: Any) -> Any:
        """The real-token mask of the ``[L·batch, positions]`` samples (None: every position counts)."""
        if mask is None or t.dim() != 4 or tuple(t.shape[1:3]) != tuple(mask.shape) or bool(mask.all()):
            return None
        return mask.to(t.device).repeat(t.shape[0], 1)

    def stack_writes(self, writes: list[Any]) -> Any:
        """The writes of one forward as one ``[batch, writes, ..., width]`` tensor: a channel that is
        zero in all of them for a sample is zero in that sample's stream (its ablation changes nothing)."""
        import torch

        return torch.stack(writes, dim=1)

    @contextlib.contextmanager
    def tap(self, modules: dict[str, Any], layers: list[Layer],
            callbacks: dict[str, Callable[[Any], Any]]) -> Iterator[None]:
        """Each callback gets, once per forward (when the model returns), the layer's norm outputs
        stacked ``[L, batch, ..., width]``. With autograd on, that tensor is a leaf added (as zeros)
        to every norm output, so the gradient of the loss with respect to it is the stacked
        gradients at the norm outputs."""
        handles: list[Any] = []
        try:
            for lay in layers:
                if lay.name in callbacks:
                    handles += _capture(modules, lay, callbacks[lay.name])
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def ablation_tap(self, modules: dict[str, Any], layer: Layer, fn: Callable[[Any], Any]) -> Iterator[None]:
        """Every write into the residual stream goes through ``fn`` (which returns the value to pass
        on): the stream entering the first block, and every attention and MLP module's output."""
        handles = [modules[layer.entry].register_forward_pre_hook(
            lambda m, args, kwargs: _entry(fn, args, kwargs), with_kwargs=True)]
        try:
            for w in layer.writes:
                handles.append(modules[w].register_forward_hook(lambda m, a, out: _first(fn, out)))
            yield
        finally:
            for h in handles:
                h.remove()


ENTRY = "_fitcli_hidden_entry"  # the identity module a traced graph gets where the stream enters the first block


def traced_layers(gm: Any, model: Any) -> list[Layer]:
    """The hidden-channel layer of a model traced by torch.fx into ``gm`` (its submodules named as
    in ``model``). The first block is inlined in the graph, never called: the layer's entry is an
    identity module inserted into ``gm`` on the value entering it (the first input of its first
    node made outside it). ``[]`` when there is none."""
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    found = HIDDEN.find_in_model(model, called)
    if not found:
        return []
    lay = found[0]
    inside = [n for n in gm.graph.nodes if lay.entry in (n.meta.get("nn_module_stack") or {})]
    outside = [a for a in (inside[0].all_input_nodes if inside else [])
               if lay.entry not in (a.meta.get("nn_module_stack") or {}) and a.op != "get_attr"]
    if not outside or any(w not in called for w in lay.writes):
        return []
    from torch import nn

    gm.add_submodule(ENTRY, nn.Identity())
    anchor = outside[0] if outside[0].op != "placeholder" else [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(anchor):
        entry = gm.graph.call_module(ENTRY, (outside[0],))
    outside[0].replace_all_uses_with(entry, delete_user_cb=lambda u: u is not entry)
    gm.recompile()
    lay.entry = ENTRY
    return [lay]


def _entry(fn: Callable[[Any], Any], args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if args:
        return (fn(args[0]), *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
    return args, kwargs


def _first(fn: Callable[[Any], Any], out: Any) -> Any:
    if isinstance(out, tuple):
        return (fn(out[0]), *out[1:])
    return fn(out)


def _capture(modules: dict[str, Any], lay: HiddenLayer, fn: Callable[[Any], Any]) -> list[Any]:
    import torch

    index = {n: i for i, n in enumerate(lay.norms)}
    state: dict[str, Any] = {"ys": {}, "leaf": None, "on": True}  # on: the tap may open inside a forward

    def start(_m: Any, _a: Any) -> None:
        state["ys"], state["leaf"], state["on"] = {}, None, True

    def norm_hook(name: str, out: Any) -> Any:
        if not state["on"]:  # outside a forward of the model (a checkpointed block recomputed in the backward)
            return out
        if state["leaf"] is None and torch.is_grad_enabled() and out.is_floating_point():
            state["leaf"] = torch.zeros((len(lay.norms), *out.shape), dtype=out.dtype, device=out.device,
                                        requires_grad=True)
        state["ys"][name] = out.detach()
        leaf = state["leaf"]
        return out + leaf[index[name]] if leaf is not None else out

    def done(_m: Any, _a: Any, _out: Any) -> None:
        ys, leaf = state["ys"], state["leaf"]
        state["ys"], state["leaf"], state["on"] = {}, None, False
        if len(ys) != len(lay.norms):
            return  # a forward that did not reach every norm (none: a sub-call): nothing to hand on
        stacked = torch.stack([ys[n] for n in lay.norms])
        if leaf is None:
            fn(stacked)
            return
        leaf.data.copy_(stacked)  # add's backward reads no input: the gradient at each norm output stands
        fn(leaf)

    handles = [modules[n].register_forward_hook(lambda m, a, out, n=n: norm_hook(n, out)) for n in lay.norms]
    handles.append(modules[""].register_forward_pre_hook(start))
    handles.append(modules[""].register_forward_hook(done))
    return handles


HIDDEN = add_builtin(HiddenKind())

__all__ = ["HIDDEN", "HiddenKind", "HiddenLayer", "blocks_of", "is_norm", "norm_width", "traced_layers"]
