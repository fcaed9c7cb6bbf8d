"""Graph discovery: the auditable layers of a model, their units, and each unit's activation point.

A layer owns units: ``nn.Linear`` and Hugging Face's ``Conv1D`` (output features), ``nn.ConvNd``
(output channels), ``nn.Bilinear`` (output features); ``nn.Embedding`` rows are weight-only units.
Where two layers' outputs meet in an elementwise product (``act(gate(x)) * up(x) -> down``) the
unit is the shared channel, owned by both rows and read at the product: one *gated* layer.

The activation point follows the unit from the layer's output through every operation that keeps
channel i in channel i (BatchNorm in eval mode, bias and scale, dropout, casts, elementwise
nonlinearities of any class or function, recognised by a probe: ``fitcli.elementwise``) and stops
where the signal is mixed or used twice. ``Layer.chain`` shows the path.

Three discovery methods, and the report says which:

- ``fx``: the model traces with ``torch.fx.symbolic_trace``; a GraphModule sharing the model's
  parameters gets an identity ``Probe`` module after each activation point.
- ``export``: a ``torch.export`` program; the same, on its aten graph.
- ``runtime``: the model does not trace (Hugging Face models, data-dependent control flow); one
  example forward with hooks and a ``TorchFunctionMode`` records which module or function
  consumed which tensor, and capture follows the same chains at run time.

``ModelGraph.tap({layer: fn})`` is the single capture/ablation mechanism: inside it, ``fn`` gets
the activation tensor of that layer on every forward and returns the tensor to pass on.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from fitcli import attention, recurrent
from fitcli.elementwise import is_channelwise, probe_shape
from fitcli.errors import InputError, first_line

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, *CONV_TYPES, nn.Bilinear)
_EXPORT_LAYER_OPS = {"linear", "conv1d", "conv2d", "conv3d", "convolution"}
_MUL_NAMES = {"mul", "mul_", "__mul__", "__rmul__"}


def _fn_name(target: Any) -> str:
    name = getattr(target, "__name__", None) or str(target)
    # aten overloads: torch.ops.aten.relu.default -> "relu"
    if hasattr(target, "_schema"):
        name = target._schema.name.split("::")[-1]
    return name


def is_hf_conv1d(mod: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D (GPT-2's layers): a Linear whose weight is in x out."""
    t = type(mod)
    return t.__name__ == "Conv1D" and t.__module__.startswith("transformers") and \
        isinstance(getattr(mod, "weight", None), torch.Tensor) and mod.weight.dim() == 2


def is_layer_module(mod: nn.Module) -> bool:
    return isinstance(mod, LAYER_TYPES) or is_hf_conv1d(mod)


@dataclass
class Layer:
    """Units owned by rows of one or more parameters, read at one activation point."""

    name: str
    type: str
    units: int
    unit_dim: int  # dimension of the activation that indexes units (1 for conv, -1 for features last)
    parts: list[tuple[str, torch.Tensor, int]]  # (parameter name, tensor, axis that indexes units)
    bias: torch.Tensor | None
    point: str  # activation point: module name, "fn(previous)", or the layer's own name
    point_kind: str  # "module" | "function" | "output" | "gated" | "weights" | "unknown"
    final: bool = False
    consumers: list[str] | None = None  # layers that read this unit directly; None = unknown
    chain: list[str] = field(default_factory=list)  # layer -> per-channel ops -> the point
    weight_only: bool = False  # no activation (embedding rows)
    members: list[str] | None = None  # the layers a gated unit is made of
    chain_modules: list[str] = field(default_factory=list)  # modules the chain passes through
    gates: int = 1  # recurrent layers: the weight rows of unit i are row i of each gate block
    head_dim: int | None = None  # attention heads: a unit is a slice of head_dim features
    mha: str | None = None  # heads of nn.MultiheadAttention: read inside its (replaced) forward
    # heads: (attention module, how its probabilities are reached: "mha" (asked of the module) or
    # "output" (a Hugging Face module in eager mode returns them)), or None when out of reach
    attention: tuple[str, str] | None = None
    rnn: tuple[str, str] | None = None  # recurrent layers: (module name, parameter suffix)

    @property
    def weight(self) -> torch.Tensor:
        """The units' weights as rows, ``[units, ...]``: the parameter itself for one row-major
        parameter, else a detached concatenation of every part's rows."""
        return self.rows([t for _, t, _ in self.parts])

    def rows(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """``tensors`` (one per part, shaped like the parts: weights or their gradients) as
        ``[units, ...]`` rows."""
        if len(self.parts) == 1 and self.parts[0][2] == 0 and self.gates == 1 and tensors[0].shape[0] == self.units:
            return tensors[0]
        return torch.cat([self._unit_rows(t, ax) for t, (_, _, ax) in zip(tensors, self.parts, strict=True)], dim=1)

    def _unit_rows(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        t = t.detach().movedim(axis, 0)
        if self.gates > 1:  # [gates * units, ...] -> [units, gates, ...]
            t = t.reshape(self.gates, self.units, -1).transpose(0, 1)
        return t.reshape(self.units, -1)

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """The activation as ``[batch, units, observations]`` (a head's observations are its
        positions times its slice's features)."""
        if self.head_dim:
            b = t.shape[0]
            return t.reshape(b, -1, self.units, self.head_dim).permute(0, 2, 1, 3).reshape(b, self.units, -1)
        return unit_view(t, self.unit_dim)

    def units_view(self, t: torch.Tensor) -> torch.Tensor:
        """A view of ``t`` with units at dim 1 (writing into it writes into ``t``)."""
        if self.head_dim:
            return t.unflatten(-1, (self.units, self.head_dim)).movedim(-2, 1)
        return t.movedim(self.unit_dim, 1)

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [t for _, t, _ in self.parts]

    @property
    def in_weight(self) -> torch.Tensor | None:
        """This layer's weight arranged ``[out, in, ...]`` (as a consumer of other units)."""
        if len(self.parts) != 1 or self.weight_only:
            return None
        _, t, ax = self.parts[0]
        return t if ax == 0 else t.movedim(ax, 0)

    @property
    def n_params(self) -> int:
        return sum(t.numel() for t in self.tensors) + (self.bias.numel() if self.bias is not None else 0)

    @property
    def chain_text(self) -> str:
        return " -> ".join(self.chain) if self.chain else self.point


@dataclass
class ModelGraph:
    layers: list[Layer]
    method: str  # "fx" | "export" | "runtime" | "weights"
    runner: nn.Module | None = None
    unsupported: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _probes: dict[str, Probe] = field(default_factory=dict, repr=False)
    _runtime: _RuntimeTap | None = field(default=None, repr=False)

    def layer(self, name: str) -> Layer:
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise KeyError(name)

    @property
    def active(self) -> list[Layer]:
        """The layers with an activation point (not weight-only)."""
        return [lay for lay in self.layers if not lay.weight_only]

    @contextlib.contextmanager
    def tap(self, callbacks: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
        """Route each named layer's activation through its callback; always undone on exit."""
        if self.runner is None:
            raise InputError("this checkpoint has no runnable model (give its architecture)")
        rnn = {lay.name: lay.rnn for lay in self.layers if lay.rnn is not None}
        mha = {lay.name: lay.mha for lay in self.layers if lay.mha is not None}
        tapped = {n: f for n, f in callbacks.items() if n in rnn}
        heads = {mha[n]: f for n, f in callbacks.items() if n in mha}
        if tapped or heads:
            mods = dict(self.runner.named_modules())
            with recurrent.tap(mods, rnn, tapped), attention.tap(mods, heads), \
                    self.tap({n: f for n, f in callbacks.items() if n not in rnn and n not in mha}):
                yield
            return
        if self.method in ("fx", "export"):
            try:
                for name, fn in callbacks.items():
                    self._probes[name].fn = fn  # KeyError for a layer without a point
                yield
            finally:
                for p in self._probes.values():
                    p.fn = None
        else:
            assert self._runtime is not None
            with self._runtime.tap(callbacks):
                yield

    def __call__(self, batch: Any) -> Any:
        assert self.runner is not None
        return self.runner(*batch.args, **batch.kwargs)


class Probe(nn.Module):
    """Identity inserted after an activation point in a traced copy of the graph."""

    def __init__(self, layer: str):
        super().__init__()
        self.layer = layer
        self.fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.fn is None else self.fn(x)


def _layer_from_module(name: str, mod: nn.Module) -> Layer:
    if is_hf_conv1d(mod):  # weight [in, out]: unit i is column i
        return Layer(name=name, type="Conv1D", units=int(mod.weight.shape[1]), unit_dim=-1,
                     parts=[(f"{name}.weight", mod.weight, 1)], bias=getattr(mod, "bias", None),
                     point=name, point_kind="output", chain=[name])
    is_conv = isinstance(mod, CONV_TYPES)
    return Layer(name=name, type=type(mod).__name__, units=int(mod.weight.shape[0]), unit_dim=1 if is_conv else -1,
                 parts=[(f"{name}.weight", mod.weight, 0)], bias=getattr(mod, "bias", None),
                 point=name, point_kind="output", chain=[name])


def _recurrent_layers(name: str, mod: nn.Module) -> list[Layer]:
    """One layer per layer and direction of an RNN/LSTM/GRU: units are hidden units."""
    out = []
    for _, _, sfx in recurrent.suffixes(mod):
        lname = recurrent.layer_name(name, sfx)
        parts = [(f"{name}.weight_ih{sfx}", getattr(mod, f"weight_ih{sfx}"), 0),
                 (f"{name}.weight_hh{sfx}", getattr(mod, f"weight_hh{sfx}"), 0)]
        out.append(Layer(name=lname, type=type(mod).__name__, units=int(mod.hidden_size), unit_dim=-1, parts=parts,
                         bias=None, point=f"{lname} (hidden state at every step)", point_kind="recurrent",
                         chain=[lname], chain_modules=[name], gates=recurrent.gates(mod), rnn=(name, sfx)))
    return out


PROJ_NAMES = ("o_proj", "out_proj", "c_proj", "proj", "dense", "output.dense", "out")


def _int_attr(m: Any, names: tuple[str, ...]) -> int | None:
    for n in names:
        v = getattr(m, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _in_features(mod: nn.Module) -> int | None:
    if is_hf_conv1d(mod):
        return int(mod.weight.shape[0])
    return int(mod.weight.shape[1]) if isinstance(mod, nn.Linear) else None


def _eager(m: nn.Module) -> bool:
    """A Hugging Face attention module that returns its attention probabilities (eager mode)."""
    return getattr(getattr(m, "config", None), "_attn_implementation", None) == "eager"


def head_layers(model: nn.Module) -> list[tuple[Layer, str]]:
    """Attention heads as units: for every module that says how wide its heads are (``head_dim``
    or ``attention_head_size``: Hugging Face, timm), the output projection whose input is the
    concatenated per-head context; head h is that input's slice h. (layer, projection name)."""
    mods = dict(model.named_modules())
    out = []
    for name, m in mods.items():
        if isinstance(m, nn.MultiheadAttention) and name and attention.supported(m) is None:
            lay = Layer(name=f"{name}.heads", type="Heads", units=m.num_heads, unit_dim=-1,
                        parts=[(f"{name}.out_proj.weight", m.out_proj.weight, 1)], bias=None,
                        point=f"{name} (per-head context)", point_kind="heads",
                        chain=[f"{name}: {m.num_heads} heads x {m.head_dim} -> out_proj"], head_dim=m.head_dim,
                        mha=name, chain_modules=[name, f"{name}.out_proj"], attention=(name, "mha"))
            out.append((lay, name))
            continue
        d = _int_attr(m, ("head_dim", "attention_head_size"))
        if not name or d is None or isinstance(m, nn.MultiheadAttention):
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        candidates = [f"{name}.{p}" for p in PROJ_NAMES] + [f"{parent}.{p}" if parent else p for p in PROJ_NAMES]
        proj = next((c for c in candidates if c in mods and _in_features(mods[c])), None)
        if proj is None:
            continue
        width = _in_features(mods[proj])
        h = _int_attr(m, ("num_heads", "num_attention_heads", "n_head", "n_heads")) or width // d
        if h * d != width:
            continue
        pm = mods[proj]
        axis = 0 if is_hf_conv1d(pm) else 1  # the projection's input features
        lay = Layer(name=f"{name}.heads", type="Heads", units=h, unit_dim=-1, parts=[(f"{proj}.weight", pm.weight, axis)],
                    bias=None, point=f"{proj} (input)", point_kind="heads",
                    chain=[f"{name}: {h} heads x {d} -> {_short(proj, name)}"], head_dim=d, consumers=[proj],
                    attention=(name, "output") if _eager(m) else None)
        out.append((lay, proj))
    return out


def _is_recurrent(mod: nn.Module | None) -> bool:
    return isinstance(mod, recurrent.RECURRENT_TYPES) and recurrent.supported(mod) is None


def _embedding_layer(name: str, mod: nn.Embedding) -> Layer:
    return Layer(name=name, type=type(mod).__name__, units=int(mod.weight.shape[0]), unit_dim=-1,
                 parts=[(f"{name}.weight", mod.weight, 0)], bias=None, point="weights only",
                 point_kind="weights", chain=[name], weight_only=True)


def _spatial(lay: Layer) -> int:
    return int(lay.type[4]) if lay.type in ("Conv1d", "Conv2d", "Conv3d") else 0


def _probe(lay: Layer, like: torch.Tensor | None = None) -> torch.Tensor:
    dtype = lay.tensors[0].dtype if lay.tensors[0].is_floating_point() else torch.float32
    if like is not None and like.dim() >= 1:
        small = like[:2] if like.dim() > 1 else like
        return torch.randn(small.shape, generator=torch.Generator().manual_seed(1), dtype=small.dtype)
    return torch.randn(probe_shape(lay.units, _spatial(lay), lay.unit_dim),
                       generator=torch.Generator().manual_seed(1), dtype=dtype)


def _short(name: str, layer: str) -> str:
    """A module's name relative to the layer's parent (``layer1.0.bn1`` next to ``layer1.0.conv1``)."""
    parent = layer.rsplit(".", 1)[0] + "." if "." in layer else ""
    return name[len(parent):] if parent and name.startswith(parent) else name


def _covered(layers: list[Layer]) -> set[str]:
    """Modules that a layer owns or that its chain passes through."""
    out: set[str] = set()
    for lay in layers:
        out.update(lay.members or [lay.name])
        out.update(lay.chain_modules)
    return out


def _unsupported(model: nn.Module, covered: set[str], reason_missing: str) -> list[dict[str, str]]:
    """Every module with parameters of its own that no layer or chain covers, with its type."""
    out = []
    for n, m in model.named_modules():
        if n in covered or not any(True for _ in m.parameters(recurse=False)):
            continue
        if is_layer_module(m) or isinstance(m, nn.Embedding):
            out.append({"name": n, "type": type(m).__name__, "reason": reason_missing})
        else:
            out.append({"name": n, "type": type(m).__name__,
                        "reason": f"{type(m).__name__} is not an auditable layer type (not supported yet)"})
    return out


# --------------------------------------------------------------------------------------------
# graph-based discovery (fx and export share it)


def getattr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _resolve(a: Any, gm: torch.fx.GraphModule) -> tuple[bool, Any]:
    """An argument's constant value: (True, value), or (False, None) when it is computed per batch."""
    if isinstance(a, torch.fx.Node):
        if a.op == "get_attr":
            return True, getattr_path(gm, str(a.target))
        return False, None
    if isinstance(a, (tuple, list)):
        vals = [_resolve(x, gm) for x in a]
        return all(ok for ok, _ in vals), type(a)(v for _, v in vals)
    return True, a


def _unary(u: torch.fx.Node, gm: torch.fx.GraphModule, modules: dict[str, nn.Module]
           ) -> Callable[[torch.Tensor], Any] | None:
    """``u`` as a function of its first argument, the others held constant; None when another
    argument is computed per batch (a product of two activations, a residual add...)."""
    ok, rest = _resolve(list(u.args[1:]), gm)
    ok_kw, kwargs = _resolve(dict(u.kwargs), gm) if u.kwargs else (True, {})
    if not ok or not ok_kw:
        return None
    if u.op == "call_module":
        mod = modules.get(str(u.target))
        if mod is None or is_layer_module(mod) or rest or kwargs:
            return None
        return lambda t: mod(t)
    if u.op == "call_function":
        return lambda t: u.target(t, *rest, **kwargs)
    if u.op == "call_method":
        return lambda t: getattr(t, str(u.target))(*rest, **kwargs)
    return None


def _label(u: torch.fx.Node, prev: str) -> tuple[str, str]:
    """(activation point name, kind) after ``u``."""
    if u.op == "call_module":
        return str(u.target), "module"
    name = str(u.target) if u.op == "call_method" else _fn_name(u.target)
    return f"{name.rstrip('_')}({prev})", "function"


def _follow(node: torch.fx.Node, lay: Layer, gm: torch.fx.GraphModule, modules: dict[str, nn.Module],
            layer_nodes: set[torch.fx.Node]) -> torch.fx.Node:
    """From the layer's output through channel-wise operations; sets the layer's point and chain."""
    probe = _probe(lay, node.meta.get("fitcli_like"))
    point, prev = node, lay.name
    while True:
        users = list(point.users)
        if len(users) != 1 or users[0] in layer_nodes or users[0].op == "output":
            return point
        u = users[0]
        if not u.args or u.args[0] is not point:
            return point
        fn = _unary(u, gm, modules)
        if fn is None or not is_channelwise(fn, probe):
            return point
        lay.point, lay.point_kind = _label(u, prev)
        lay.chain.append(_short(str(u.target), lay.name) if u.op == "call_module" else lay.point.split("(")[0])
        if u.op == "call_module":
            lay.chain_modules.append(str(u.target))
        prev = str(u.target) if u.op == "call_module" else lay.point
        point = u


def _graph_layers(gm: torch.fx.GraphModule, exported: bool) -> list[tuple[torch.fx.Node, Layer]]:
    modules = dict(gm.named_modules())
    found = []
    for node in gm.graph.nodes:
        if not exported and node.op == "call_module":
            mod = modules.get(str(node.target))
            if _is_recurrent(mod):
                found.extend((node, lay) for lay in _recurrent_layers(str(node.target), mod))
            elif mod is not None and is_layer_module(mod):
                found.append((node, _layer_from_module(str(node.target), mod)))
            elif isinstance(mod, nn.Embedding):
                found.append((node, _embedding_layer(str(node.target), mod)))
        elif exported and node.op == "call_function" and _fn_name(node.target) in _EXPORT_LAYER_OPS:
            w = node.args[1] if len(node.args) > 1 else None
            if not isinstance(w, torch.fx.Node) or w.op != "get_attr":
                continue
            wname = str(w.target)
            name = wname[: -len(".weight")] if wname.endswith(".weight") else wname
            weight = getattr_path(gm, wname)
            b = node.args[2] if len(node.args) > 2 else None
            bias = getattr_path(gm, str(b.target)) if isinstance(b, torch.fx.Node) and b.op == "get_attr" else None
            is_conv = weight.dim() > 2
            typ = f"Conv{weight.dim() - 2}d" if is_conv else "Linear"
            found.append((node, Layer(name=name, type=typ, units=int(weight.shape[0]), unit_dim=1 if is_conv else -1,
                                      parts=[(wname, weight, 0)], bias=bias, point=name, point_kind="output",
                                      chain=[name])))
    return found


def _is_pass_node(node: torch.fx.Node, gm: torch.fx.GraphModule, modules: dict[str, nn.Module],
                  points: set[torch.fx.Node]) -> bool:
    """Between an activation point and a consumer: a channel-wise op (a Probe, a chain op)."""
    if node.op == "call_module" and isinstance(modules.get(str(node.target)), Probe):
        return True
    return node in points


def _consumers(start: torch.fx.Node, layer_nodes: dict[torch.fx.Node, str]) -> list[str] | None:
    """Layers reading ``start`` directly; None if any path leads elsewhere."""
    out: list[str] = []
    for u in start.users:
        if u in layer_nodes and u.args and u.args[0] is start:
            out.append(layer_nodes[u])
        else:
            return None
    return sorted(set(out)) or None


def _is_mul(n: torch.fx.Node) -> bool:
    if n.op == "call_function":
        return n.target in (operator.mul, torch.mul) or _fn_name(n.target) in _MUL_NAMES
    return n.op == "call_method" and str(n.target) in _MUL_NAMES


def _gate_groups(points: list[tuple[torch.fx.Node, Layer]], layer_nodes: dict[torch.fx.Node, str]
                 ) -> list[tuple[torch.fx.Node, Layer, Layer, str]]:
    """``act(gate(x)) * up(x) -> down``: (product node, gate layer, up layer, down layer name)."""
    by_node = {p: lay for p, lay in points}
    groups = []
    seen: set[torch.fx.Node] = set()
    for p, _lay in points:
        users = list(p.users)
        if len(users) != 1 or not _is_mul(users[0]) or users[0] in seen:
            continue
        m = users[0]
        args = [a for a in m.args if isinstance(a, torch.fx.Node)]
        if len(args) != 2 or len(m.args) != 2 or not all(a in by_node for a in args):
            continue
        a, b = by_node[args[0]], by_node[args[1]]
        if a is b or a.units != b.units or a.unit_dim != b.unit_dim or a.weight_only or b.weight_only:
            continue
        musers = list(m.users)
        if len(musers) != 1 or musers[0] not in layer_nodes or musers[0].args[0] is not m:
            continue
        gate, up = (a, b) if len(a.chain) >= len(b.chain) else (b, a)
        groups.append((m, gate, up, layer_nodes[musers[0]]))
        seen.add(m)
    return groups


def gated_layer(gate: Layer, up: Layer, down: str) -> Layer:
    """One unit per shared channel of ``act(gate) * up``, read at the product (down's input)."""
    return Layer(name=f"{down}.input", type=f"Gated{gate.type}", units=gate.units, unit_dim=gate.unit_dim,
                 parts=gate.parts + up.parts, bias=None, point=f"{gate.point} * {up.point}", point_kind="gated",
                 chain=[f"({' -> '.join(gate.chain)}) * ({' -> '.join(up.chain)})", _short(down, gate.name)],
                 members=[gate.name, up.name], consumers=[down],
                 chain_modules=gate.chain_modules + up.chain_modules)


def _head_probes(gm: torch.fx.GraphModule, model: nn.Module | None, order: list[Layer],
                 points: list[tuple[torch.fx.Node, Layer]]) -> list[tuple[torch.fx.Node, Layer]]:
    """Head layers whose output projection is called as a module in the graph: their point is
    that call's input. Inserted in ``order`` before the projection."""
    if model is None:
        return []
    calls = {str(n.target): n for n in gm.graph.nodes if n.op == "call_module"}
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    layer_at = {str(n.target): index[n] for n in gm.graph.nodes if n.op == "call_module"}
    found = []
    for lay, proj in head_layers(model):
        if lay.mha is not None:  # read inside the module's forward: no probe
            if proj in calls:  # after the layers called before the attention
                at = sum(1 for x in order if layer_at.get(x.name.rsplit(".", 1)[0] if x.rnn else x.name, -1)
                         < index[calls[proj]])
                order.insert(at, lay)
            continue
        node = calls.get(proj)
        if node is None or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        found.append((node, lay))
        at = next((i for i, x in enumerate(order) if x.name == proj), len(order))
        order.insert(at, lay)
    return found


def _instrument(gm: torch.fx.GraphModule, exported: bool, model: nn.Module | None = None
                ) -> tuple[list[Layer], dict[str, Probe]]:
    modules = dict(gm.named_modules())
    found = _graph_layers(gm, exported)
    layer_nodes = {node: lay.name for node, lay in found if not lay.weight_only and lay.rnn is None}
    points: list[tuple[torch.fx.Node, Layer]] = []
    for node, lay in found:
        if not lay.weight_only and lay.rnn is None:
            points.append((_follow(node, lay, gm, modules, set(layer_nodes)), lay))
    groups = _gate_groups(points, layer_nodes)
    order = [lay for _, lay in found]
    for m, gate, up, down in groups:
        g = gated_layer(gate, up, down)
        points = [(p, lay) for p, lay in points if lay is not gate and lay is not up] + [(m, g)]
        order[order.index(gate)] = g
        order.remove(up)
    for p, lay in points:  # consumers before probes change the graph
        lay.consumers = lay.consumers or _consumers(p, layer_nodes)
    heads = _head_probes(gm, model, order, points) if not exported else []
    probes: dict[str, Probe] = {}
    for i, (point, lay) in enumerate(points):
        pname = f"_fitcli_probe_{i}"
        probe = Probe(lay.name)
        gm.add_submodule(pname, probe)
        with gm.graph.inserting_after(point):
            pnode = gm.graph.call_module(pname, (point,))
        point.replace_all_uses_with(pnode, delete_user_cb=lambda u, p=pnode: u is not p)
        probes[lay.name] = probe
    for j, (proj_node, lay) in enumerate(heads):  # a head's point: the projection's input, for it alone
        pname = f"_fitcli_head_probe_{j}"
        probe = Probe(lay.name)
        gm.add_submodule(pname, probe)
        src = proj_node.args[0]
        with gm.graph.inserting_before(proj_node):
            pnode = gm.graph.call_module(pname, (src,))
        proj_node.replace_input_with(src, pnode)
        probes[lay.name] = probe
    gm.recompile()
    active = [lay for lay in order if not lay.weight_only and lay.rnn is None and lay.point_kind != "heads"]
    if active and order and order[-1] is active[-1]:
        active[-1].final = True
    return order, probes


# --------------------------------------------------------------------------------------------
# runtime discovery and capture


@dataclass
class _Step:
    kind: str  # "module" | "function"
    name: str  # module name, or function name


def _layer_modules(modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    return {n: m for n, m in modules.items() if n and (is_layer_module(m) or isinstance(m, nn.Embedding))}


def _norm_name(func: Any) -> str:
    """A function's name as chains store it: ``relu_`` -> ``relu``; dunder names kept."""
    n = _fn_name(func)
    return n if n.startswith("__") else n.rstrip("_")


@dataclass
class _Event:
    kind: str  # "module" | "function"
    name: str  # module name, or function name (``_norm_name``)
    args: tuple
    kwargs: dict
    func: Any = None  # the function (function events)
    out: Any = None  # filled when the call returns


class _Recorder(TorchFunctionMode):
    """One example forward: who consumed every tensor (modules, and functions called outside
    leaf modules), and which tensors were computed during the forward."""

    def __init__(self, modules: dict[str, nn.Module]):
        super().__init__()
        self.modules = modules
        self.keep: list[Any] = []  # keeps ids unique during the forward
        self.consumers: dict[int, list[_Event]] = {}
        self.produced: set[int] = set()
        self.layer_out: dict[str, torch.Tensor] = {}
        self.order: list[str] = []
        self.stack: list[tuple[_Event | None, bool]] = []  # open module calls: (event, is leaf)
        self.called: set[str] = set()

    def _consume(self, t: Any, ev: _Event) -> None:
        if isinstance(t, torch.Tensor):
            self.keep.append(t)
            self.consumers.setdefault(id(t), []).append(ev)

    def _produce(self, t: Any) -> None:
        if isinstance(t, torch.Tensor):
            self.keep.append(t)
            self.produced.add(id(t))

    def in_leaf(self) -> bool:
        return bool(self.stack) and self.stack[-1][1]

    def pre(self, name: str, mod: nn.Module, args: tuple) -> None:
        self.called.add(name)
        ev = None
        if args and not self.in_leaf():
            ev = _Event("module", name, tuple(args), {})
            self._consume(args[0], ev)
        self.stack.append((ev, not any(True for _ in mod.children())))

    def post(self, name: str, mod: nn.Module, args: tuple, out: Any) -> None:
        ev, _ = self.stack.pop()
        if ev is not None:
            ev.out = out
        self._produce(out)
        if _is_recurrent(mod) and name not in self.order:
            self.order.append(name)
        elif (is_layer_module(mod) or isinstance(mod, nn.Embedding)) and name not in self.layer_out \
                and isinstance(out, torch.Tensor):
            self.order.append(name)
            self.layer_out[name] = out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.in_leaf() and isinstance(out, torch.Tensor):
            ev = _Event("function", _norm_name(func), tuple(args), dict(kwargs or {}), func, out)
            seen = set()
            for a in args:
                if isinstance(a, torch.Tensor) and id(a) not in seen:
                    seen.add(id(a))
                    self._consume(a, ev)
            self._produce(out)
        return out


def _runtime_unary(ev: _Event, t: torch.Tensor, produced: set[int], modules: dict[str, nn.Module]):
    """The event as a function of ``t`` alone, or None (``t`` is not its first input, or another
    computed tensor takes part: the signal is mixed)."""
    if not ev.args or ev.args[0] is not t:
        return None
    if ev.kind == "module":
        mod = modules[ev.name]
        if is_layer_module(mod) or len(ev.args) != 1:
            return None
        return lambda x: mod(x)
    rest, kwargs, func = ev.args[1:], ev.kwargs, ev.func
    if any(isinstance(a, torch.Tensor) and id(a) in produced for a in (*rest, *kwargs.values())):
        return None
    return lambda x: func(x, *rest, **kwargs)


def _runtime_chains(rec: _Recorder, modules: dict[str, nn.Module], layers: list[Layer]
                    ) -> tuple[dict[str, list[_Step]], dict[str, torch.Tensor]]:
    """Each layer's chain of channel-wise steps from its output, and the tensor at its point."""
    steps: dict[str, list[_Step]] = {}
    ends: dict[str, torch.Tensor] = {}
    for lay in layers:
        t = rec.layer_out.get(lay.name)
        if t is None or lay.weight_only:
            continue
        probe = _probe(lay, t)
        chain: list[_Step] = []
        prev = lay.name
        start = 0  # events of ``t`` already passed (a module that returned ``t`` itself: dropout in eval)
        while True:
            evs = rec.consumers.get(id(t), [])[start:]
            ev = evs[0] if evs else None
            identity = ev is not None and ev.kind == "module" and ev.out is t
            if ev is None or (len(evs) != 1 and not identity) or not isinstance(ev.out, torch.Tensor):
                break
            fn = _runtime_unary(ev, t, rec.produced, modules)
            if fn is None or not is_channelwise(fn, probe):
                break
            chain.append(_Step(ev.kind, ev.name))
            if ev.kind == "module":
                lay.point, lay.point_kind = ev.name, "module"
                lay.chain.append(_short(ev.name, lay.name))
                lay.chain_modules.append(ev.name)
                prev = ev.name
            else:
                lay.point, lay.point_kind = f"{ev.name}({prev})", "function"
                lay.chain.append(ev.name)
                prev = lay.point
            start = start + 1 if ev.out is t else 0
            t = ev.out
        steps[lay.name] = chain
        ends[lay.name] = t
    return steps, ends


def _runtime_gates(rec: _Recorder, layers: list[Layer], ends: dict[str, torch.Tensor]) -> list[tuple[Layer, Layer, str]]:
    """``act(gate(x)) * up(x) -> down`` seen at run time: (gate, up, down name) per product."""
    by_end = {id(t): name for name, t in ends.items()}
    by_name = {lay.name: lay for lay in layers}
    groups, used = [], set()
    for name, t in ends.items():
        evs = rec.consumers.get(id(t), [])
        if len(evs) != 1 or evs[0].kind != "function" or evs[0].name not in _MUL_NAMES or name in used:
            continue
        args = [a for a in evs[0].args if isinstance(a, torch.Tensor)]
        if len(args) != 2 or len(evs[0].args) != 2 or id(args[0]) not in by_end or id(args[1]) not in by_end:
            continue
        a, b = by_name[by_end[id(args[0])]], by_name[by_end[id(args[1])]]
        pev = rec.consumers.get(id(evs[0].out), [])
        if a is b or a.units != b.units or len(pev) != 1 or pev[0].kind != "module" or \
                pev[0].name not in by_name or by_name[pev[0].name].weight_only:
            continue
        gate, up = (a, b) if len(a.chain) >= len(b.chain) else (b, a)
        groups.append((gate, up, pev[0].name))
        used.update({a.name, b.name})
    return groups


class _RuntimeTap:
    """At run time, follow each tapped layer's chain (module hooks for module steps, a
    TorchFunctionMode for function steps and gated products) and hand the value at its point to
    the callback."""

    def __init__(self, model: nn.Module, layers: list[Layer], steps: dict[str, list[_Step]]):
        self.model = model
        self.layers = {lay.name: lay for lay in layers}
        self.modules = dict(model.named_modules())
        self.steps = steps

    @contextlib.contextmanager
    def tap(self, callbacks: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
        heads = {n: f for n, f in callbacks.items() if self.layers[n].point_kind == "heads"}
        state = _TapState(self, {n: f for n, f in callbacks.items() if n not in heads})
        handles = []
        try:
            for n, f in heads.items():  # a head's point: its projection's input
                proj = self.modules[(self.layers[n].consumers or [""])[0]]
                handles.append(proj.register_forward_pre_hook(lambda m, args, f=f: (f(args[0]), *args[1:])))
            for mod_name, (pre, post) in state.hooks().items():
                mod = self.modules[mod_name]
                if pre is not None:
                    handles.append(mod.register_forward_pre_hook(pre))
                handles.append(mod.register_forward_hook(post))
            if state.needs_mode:
                with _TapMode(state):
                    yield
            else:
                yield
        finally:
            for h in handles:
                h.remove()
            state.current.clear()


class _TapState:
    """Where each tapped chain stands during one forward: the id of its current tensor."""

    def __init__(self, tap: _RuntimeTap, callbacks: dict[str, Callable[[torch.Tensor], torch.Tensor]]):
        self.tap, self.callbacks = tap, callbacks
        self.current: dict[str, tuple[int, int]] = {}  # chain key -> (tensor id, next step index)
        self.chains: dict[str, list[_Step]] = {}
        self.gates: dict[str, tuple[str, str]] = {}  # gated layer -> (gate chain key, up chain key)
        self.inside: list[str] = []
        for name in callbacks:
            lay = tap.layers[name]
            if lay.point_kind == "gated":
                gate, up = lay.members or []
                self.chains[gate] = tap.steps.get(gate, [])
                self.chains[up] = tap.steps.get(up, [])
                self.gates[name] = (gate, up)
            elif not lay.weight_only:
                self.chains[name] = tap.steps.get(name, [])
        self.needs_mode = bool(self.gates) or any(s.kind == "function" for c in self.chains.values() for s in c)
        self.leaf = {n for n, m in tap.modules.items() if not list(m.children())}

    def hooks(self) -> dict[str, tuple[Any, Any]]:
        out: dict[str, tuple[Any, Any]] = {}
        for key, chain in self.chains.items():
            out.setdefault(key, (self._enter(key), self._layer_post(key)))
            for step in chain:
                if step.kind == "module":
                    out.setdefault(step.name, (self._enter(step.name), self._module_post(step.name)))
        return out

    def _enter(self, name: str):
        def pre(m, args):
            self.inside.append(name)
        return pre

    def _finish(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """The chain of ``key`` reached its point with ``t``."""
        if key in self.callbacks:
            return self.callbacks[key](t)
        return t

    def _advance(self, key: str, out: Any) -> Any:
        chain = self.chains[key]
        idx = self.current[key][1]
        if idx >= len(chain):
            out = self._finish(key, out)
        self.current[key] = (id(out), idx)
        return out

    def _layer_post(self, key: str):
        def post(m, args, out):
            if self.inside and self.inside[-1] == key:
                self.inside.pop()
            if not isinstance(out, torch.Tensor):
                return out
            self.current[key] = (id(out), 0)
            return self._advance(key, out)
        return post

    def _module_post(self, mod_name: str):
        def post(m, args, out):
            if self.inside and self.inside[-1] == mod_name:
                self.inside.pop()
            if not args or not isinstance(out, torch.Tensor):
                return out
            for key, chain in self.chains.items():
                cur = self.current.get(key)
                if cur is None or cur[0] != id(args[0]) or cur[1] >= len(chain):
                    continue
                step = chain[cur[1]]
                if step.kind == "module" and step.name == mod_name:
                    self.current[key] = (id(out), cur[1] + 1)
                    out = self._advance(key, out)
            return out
        return post

    def in_leaf(self) -> bool:
        return bool(self.inside) and self.inside[-1] in self.leaf

    def on_function(self, name: str, args: tuple, out: Any) -> Any:
        if not isinstance(out, torch.Tensor) or self.in_leaf():
            return out
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if first is not None:
            for key, chain in self.chains.items():
                cur = self.current.get(key)
                if cur is None or cur[0] != id(first) or cur[1] >= len(chain):
                    continue
                step = chain[cur[1]]
                if step.kind == "function" and step.name == name:
                    self.current[key] = (id(out), cur[1] + 1)
                    out = self._advance(key, out)
        if name in _MUL_NAMES and self.gates:
            ids = {id(a) for a in args if isinstance(a, torch.Tensor)}
            for gname, (gate, up) in self.gates.items():
                g, u = self.current.get(gate), self.current.get(up)
                if g and u and g[1] >= len(self.chains[gate]) and u[1] >= len(self.chains[up]) \
                        and {g[0], u[0]} == ids:
                    out = self.callbacks[gname](out)
                    self.current.pop(gate, None)
                    self.current.pop(up, None)
        return out


class _TapMode(TorchFunctionMode):
    def __init__(self, state: _TapState):
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        return self.state.on_function(_norm_name(func), tuple(args), out)


def _record(model: nn.Module, modules: dict[str, nn.Module], example: Any) -> _Recorder:
    rec = _Recorder(modules)
    handles = []
    try:
        for name, mod in modules.items():
            if not name:
                continue
            handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: rec.pre(n, m, a)))
            handles.append(mod.register_forward_hook(lambda m, a, o, n=name: rec.post(n, m, a, o)))
        with torch.no_grad(), rec:
            try:
                model(*example.args, **example.kwargs)
            except Exception as e:
                raise InputError(f"data batch of shape {example.describe()} does not fit the model "
                                 f"({type(e).__name__}: {first_line(e)})") from e
    finally:
        for h in handles:
            h.remove()
    return rec


def runtime_discover(model: nn.Module, example: Any) -> ModelGraph:
    modules = dict(model.named_modules())
    rec = _record(model, modules, example)
    lmods = _layer_modules(modules)
    layers = []
    for n in rec.order:
        if _is_recurrent(modules[n]):
            layers.extend(_recurrent_layers(n, modules[n]))
        else:
            layers.append(_embedding_layer(n, lmods[n]) if isinstance(lmods[n], nn.Embedding)
                          else _layer_from_module(n, lmods[n]))
    steps, ends = _runtime_chains(rec, modules, layers)
    called = rec.called
    for lay, proj in head_layers(model):
        if proj in called:
            at = next((i for i, x in enumerate(layers) if x.name == proj), len(layers))
            layers.insert(at, lay)
    for gate, up, down in _runtime_gates(rec, layers, ends):
        g = gated_layer(gate, up, down)
        layers[layers.index(gate)] = g
        layers.remove(up)
    by_name = {lay.name: lay for lay in layers}
    for lay in layers:
        if lay.point_kind != "gated" and lay.name in ends:
            evs = rec.consumers.get(id(ends[lay.name]), [])
            if evs and all(ev.kind == "module" and ev.name in by_name and ev.args[0] is ends[lay.name] for ev in evs):
                lay.consumers = sorted({ev.name for ev in evs})
    active = [lay for lay in layers if not lay.weight_only and lay.rnn is None and lay.point_kind != "heads"]
    order = [lay for lay in layers if lay.point_kind != "heads"]  # head layers are appended after the rest
    if active and order and order[-1] is active[-1]:
        active[-1].final = True
    covered = _covered(layers)
    unsupported = _unsupported(model, covered, "never called as a module during the forward pass, so it cannot be hooked")
    g = ModelGraph(layers, "runtime", runner=model, unsupported=unsupported)
    g._runtime = _RuntimeTap(model, layers, steps)
    return g


# --------------------------------------------------------------------------------------------
# entry point


def weight_layers(state_dict: dict[str, torch.Tensor]) -> ModelGraph:
    """Layers of a bare state dict: every ``*.weight`` of 2 (Linear) or 3-5 (ConvNd) dims."""
    layers = []
    for key, w in state_dict.items():
        if not key.endswith("weight") or w.dim() < 2 or w.dim() > 5:
            continue
        name = key[: -len(".weight")] if key.endswith(".weight") else key
        typ = "Linear" if w.dim() == 2 else f"Conv{w.dim() - 2}d"
        layers.append(Layer(name=name, type=typ, units=int(w.shape[0]), unit_dim=-1 if w.dim() == 2 else 1,
                            parts=[(key, w, 0)], bias=state_dict.get(name + ".bias"), point="n/a",
                            point_kind="unknown", chain=[name]))
    # sorted key names say nothing about which layer is the output: none is guessed
    return ModelGraph(layers, "weights", notes=["layers read from the state dict alone (no architecture given): "
                                                "the output layer is unknown, so every layer is counted"])


class _Shapes(torch.fx.Interpreter):
    """One example forward through the traced graph, keeping each node's output as an empty
    tensor of its shape and dtype (``node.meta["fitcli_like"]``)."""

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            n.meta["fitcli_like"] = torch.empty(out.shape, dtype=out.dtype)
        return out


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer with ``torch.nn`` containers opened: its default keeps every ``torch.nn``
    module a leaf, so the layers inside ``nn.TransformerEncoderLayer`` and the like would never be
    seen. Leaves are modules without children (layers, norms, activations) and attention modules
    (their heads are sliced by functional calls, not submodules)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, nn.MultiheadAttention):
            return True
        if any(True for _ in m.children()):
            return False
        return super().is_leaf_module(m, module_qualified_name)


def _shape_prop(gm: torch.fx.GraphModule, example: Any) -> None:
    """Shapes of every node from one example batch (probes then look like the real activations).
    This is a forward of the model: its failure is the data not fitting the model."""
    if example is None or example.kwargs:
        return
    try:
        with torch.no_grad():
            _Shapes(gm).run(*example.args)
    except Exception as e:
        raise InputError(f"data batch of shape {example.describe()} does not fit the model "
                         f"({type(e).__name__}: {first_line(e)})") from e


def discover(model: nn.Module | None, state_dict: dict[str, torch.Tensor] | None = None,
             example: Any = None, exported: bool = False) -> ModelGraph:
    """Find layers and activation points. ``example`` (a Batch) is needed only when fx fails."""
    if model is None:
        return weight_layers(state_dict or {})
    if exported and isinstance(model, torch.fx.GraphModule):
        layers, probes = _instrument(model, exported=True)
        g = ModelGraph(layers, "export", runner=model)
        g._probes = probes
        return g
    trace_error = None
    try:
        gm = torch.fx.GraphModule(model, _Tracer().trace(model))
    except Exception as e:  # any tracing failure: fall back to runtime discovery
        trace_error = f"{type(e).__name__}: {first_line(e, 160)}"
        gm = None
    if gm is not None:
        _shape_prop(gm, example)
        layers, probes = _instrument(gm, exported=False, model=model)
        covered = _covered(layers)
        unsupported = _unsupported(model, covered, "never called as a module in the traced graph (e.g. used by "
                                                   "nn.MultiheadAttention through functional calls), so it cannot be hooked")
        g = ModelGraph(layers, "fx", runner=gm, unsupported=unsupported)
        g._probes = probes
        return g
    if example is None:  # the layers from the modules themselves; where each unit is read needs a forward
        mods = _layer_modules(dict(model.named_modules()))
        layers = [_embedding_layer(n, m) if isinstance(m, nn.Embedding) else _layer_from_module(n, m)
                  for n, m in mods.items()]
        for lay in layers:
            if not lay.weight_only:
                lay.point, lay.point_kind = "unknown (needs data: the model does not trace with torch.fx)", "unknown"
        g = ModelGraph(layers, "runtime", runner=model)
        g.notes = [f"torch.fx could not trace the model ({trace_error}); give data to find activation points"]
        return g
    g = runtime_discover(model, example)
    g.notes.append(f"torch.fx could not trace the model ({trace_error}); activation points found at run time")
    return g


def token_mask(t: torch.Tensor, lay: Layer, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The batch's real-token mask when ``t`` is a per-token activation ([batch, tokens, units]):
    padding positions are not observations."""
    if mask is None or lay.unit_dim != -1 or t.dim() != 3 or tuple(t.shape[:2]) != tuple(mask.shape):
        return None
    if bool(mask.all()):  # no padding in this batch: every position is an observation (the fast paths)
        return None
    if lay.head_dim:  # a head's observations are (position, feature of its slice)
        return mask.to(t.device).repeat_interleave(lay.head_dim, dim=1)
    return mask.to(t.device)


def unit_view(t: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """[batch, ..., units] or [batch, units, ...] -> [batch, units, positions]."""
    if t.dim() == 1:
        return t.reshape(1, -1, 1)
    if unit_dim == -1 or unit_dim == t.dim() - 1:
        b, u = t.shape[0], t.shape[-1]
        return t.reshape(b, -1, u).transpose(1, 2)
    return t.reshape(t.shape[0], t.shape[1], -1)


__all__ = ["Layer", "ModelGraph", "discover", "unit_view", "weight_layers", "gated_layer", "is_hf_conv1d"]
