"""Layers, units and activation points: where each unit's signal is read (and ablated).

A layer is an ``nn.Linear`` or ``nn.ConvNd``. Its activation point is the output of the
elementwise nonlinearity that directly consumes the layer's output (module or function), else the
layer's own output (``spec/metrics.md``). Three discovery methods, and the report says which:

- ``fx``: the model traces with ``torch.fx.symbolic_trace``; a GraphModule sharing the model's
  parameters gets an identity ``Probe`` module after each activation point.
- ``export``: a ``torch.export`` program; the same, on its aten graph.
- ``runtime``: the model does not trace; one example forward with hooks and a
  ``TorchFunctionMode`` finds the points, and capture uses the same hooks.

``ModelGraph.tap({layer: fn})`` is the single capture/ablation mechanism: inside it, ``fn`` gets
the activation tensor of that layer on every forward and returns the tensor to pass on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from fitcli.errors import InputError

LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

ACT_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU,
    nn.CELU, nn.Softplus, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.PReLU, nn.Tanhshrink,
)
ACT_NAMES = {
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "gelu", "silu", "tanh", "tanh_",
    "sigmoid", "sigmoid_", "elu", "elu_", "selu", "selu_", "celu", "softplus", "mish", "hardswish",
    "hardsigmoid", "hardtanh", "hardtanh_", "prelu", "rrelu", "tanhshrink",
}
# ops that keep units aligned element by element (followed for weight_norm_out)
PASS_MODULES: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)
PASS_NAMES = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "contiguous", "clone"}

_EXPORT_LAYER_OPS = {"linear", "conv1d", "conv2d", "conv3d", "convolution"}


def _fn_name(target: Any) -> str:
    name = getattr(target, "__name__", None) or str(target)
    # aten overloads: torch.ops.aten.relu.default -> "relu"
    if hasattr(target, "_schema"):
        name = target._schema.name.split("::")[-1]
    return name


@dataclass
class Layer:
    name: str
    type: str
    units: int
    unit_dim: int  # dimension of the activation that indexes units (1 for conv, -1 for linear)
    weight: torch.Tensor
    bias: torch.Tensor | None
    point: str  # activation point: module name, "fn(layer)", or the layer's own name
    point_kind: str  # "module" | "function" | "output" | "unknown"
    final: bool = False
    consumers: list[str] | None = None  # layers that read this unit directly; None = unknown

    @property
    def params(self) -> int:
        return self.weight.numel() + (self.bias.numel() if self.bias is not None else 0)


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

    @contextlib.contextmanager
    def tap(self, callbacks: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
        """Route each named layer's activation through its callback; always undone on exit."""
        if self.runner is None:
            raise InputError("this checkpoint has no runnable model (give its architecture)")
        if self.method in ("fx", "export"):
            try:
                for name, fn in callbacks.items():
                    self._probes[name].fn = fn
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
    is_conv = not isinstance(mod, nn.Linear)
    return Layer(
        name=name, type=type(mod).__name__, units=int(mod.weight.shape[0]),
        unit_dim=1 if is_conv else -1, weight=mod.weight, bias=mod.bias,
        point=name, point_kind="output",
    )


# --------------------------------------------------------------------------------------------
# graph-based discovery (fx and export share it)


def _is_act_node(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """If ``node`` is an elementwise nonlinearity, its activation-point name part, else None."""
    if node.op == "call_module":
        mod = modules.get(str(node.target))
        return str(node.target) if isinstance(mod, ACT_MODULES) else None
    if node.op in ("call_function", "call_method"):
        name = node.target if node.op == "call_method" else _fn_name(node.target)
        return str(name).rstrip("_") if name in ACT_NAMES else None
    return None


def _is_pass_node(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), (*ACT_MODULES, *PASS_MODULES, Probe))
    if node.op in ("call_function", "call_method"):
        name = node.target if node.op == "call_method" else _fn_name(node.target)
        return name in ACT_NAMES or name in PASS_NAMES
    return False


def _graph_layers(gm: torch.fx.GraphModule, exported: bool) -> list[tuple[torch.fx.Node, Layer]]:
    modules = dict(gm.named_modules())
    found = []
    for node in gm.graph.nodes:
        if not exported and node.op == "call_module" and isinstance(modules.get(str(node.target)), LAYER_TYPES):
            found.append((node, _layer_from_module(str(node.target), modules[str(node.target)])))
        elif exported and node.op == "call_function" and _fn_name(node.target) in _EXPORT_LAYER_OPS:
            w = node.args[1] if len(node.args) > 1 else None
            if not isinstance(w, torch.fx.Node) or w.op != "get_attr":
                continue
            wname = str(w.target)
            name = wname[: -len(".weight")] if wname.endswith(".weight") else wname
            weight = gm.get_parameter(wname) if wname in dict(gm.named_parameters()) else getattr_path(gm, wname)
            b = node.args[2] if len(node.args) > 2 else None
            bias = getattr_path(gm, str(b.target)) if isinstance(b, torch.fx.Node) and b.op == "get_attr" else None
            is_conv = weight.dim() > 2
            typ = f"Conv{weight.dim() - 2}d" if is_conv else "Linear"
            found.append((node, Layer(name=name, type=typ, units=int(weight.shape[0]),
                                      unit_dim=1 if is_conv else -1, weight=weight, bias=bias,
                                      point=name, point_kind="output")))
    return found


def getattr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _consumers(start: torch.fx.Node, modules: dict[str, nn.Module], layer_nodes: dict[torch.fx.Node, str]) -> list[str] | None:
    """Layers reading ``start`` through elementwise ops only; None if any path leaves that."""
    out: list[str] = []
    stack, seen = [start], set()
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if u in layer_nodes and u.args and u.args[0] is n:
                out.append(layer_nodes[u])
            elif u.op == "output":
                return None
            elif _is_pass_node(u, modules) and u.args and u.args[0] is n:
                stack.append(u)
            else:
                return None
    return sorted(set(out)) or None


def _instrument(gm: torch.fx.GraphModule, exported: bool) -> tuple[list[Layer], dict[str, Probe]]:
    modules = dict(gm.named_modules())
    found = _graph_layers(gm, exported)
    layer_nodes = {node: lay.name for node, lay in found}
    probes: dict[str, Probe] = {}
    points: list[tuple[torch.fx.Node, Layer]] = []
    for node, lay in found:
        users = list(node.users)
        point = node
        if len(users) == 1 and users[0].args and users[0].args[0] is node:
            act = _is_act_node(users[0], modules)
            if act is not None:
                point = users[0]
                if users[0].op == "call_module":
                    lay.point, lay.point_kind = act, "module"
                else:
                    lay.point, lay.point_kind = f"{act}({lay.name})", "function"
        points.append((point, lay))
    for _node, lay in found:  # consumers before probes change the graph
        start = next(p for p, q in points if q is lay)
        lay.consumers = _consumers(start, modules, layer_nodes)
    for i, (point, lay) in enumerate(points):
        pname = f"_fitcli_probe_{i}"
        probe = Probe(lay.name)
        gm.add_submodule(pname, probe)
        with gm.graph.inserting_after(point):
            pnode = gm.graph.call_module(pname, (point,))
        point.replace_all_uses_with(pnode, delete_user_cb=lambda u, p=pnode: u is not p)
        probes[lay.name] = probe
    gm.recompile()
    layers = [lay for _, lay in found]
    if layers:
        layers[-1].final = True
    return layers, probes


# --------------------------------------------------------------------------------------------
# runtime fallback


class _RuntimeTap:
    """Hooks plus a TorchFunctionMode for models that torch.fx cannot trace."""

    def __init__(self, model: nn.Module, layers: list[Layer], act_modules: dict[str, nn.Module]):
        self.model = model
        self.layers = {lay.name: lay for lay in layers}
        self.modules = dict(model.named_modules())
        self.act_modules = act_modules

    @contextlib.contextmanager
    def tap(self, callbacks: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
        handles = []
        outputs: dict[int, tuple[torch.Tensor, str]] = {}
        fn_points = {n: self.layers[n].point.split("(")[0] for n in callbacks if self.layers[n].point_kind == "function"}
        try:
            for name, fn in callbacks.items():
                lay = self.layers[name]
                if lay.point_kind == "module":
                    handles.append(self.modules[lay.point].register_forward_hook(
                        lambda m, i, o, fn=fn: fn(o)))
                elif lay.point_kind == "function":
                    def record(m, i, o, name=name):
                        outputs[id(o)] = (o, name)
                    handles.append(self.modules[name].register_forward_hook(record))
                else:
                    handles.append(self.modules[name].register_forward_hook(lambda m, i, o, fn=fn: fn(o)))
            if fn_points:
                with _FnMode(outputs, fn_points, callbacks):
                    yield
            else:
                yield
        finally:
            for h in handles:
                h.remove()
            outputs.clear()


class _FnMode(TorchFunctionMode):
    def __init__(self, outputs, fn_points, callbacks):
        super().__init__()
        self.outputs, self.fn_points, self.callbacks = outputs, fn_points, callbacks

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
            hit = self.outputs.get(id(args[0]))
            if hit is not None and hit[0] is args[0]:
                name = hit[1]
                if _fn_name(func).rstrip("_") == self.fn_points.get(name):
                    del self.outputs[id(args[0])]
                    out = self.callbacks[name](out)
        return out


class _DiscoverMode(TorchFunctionMode):
    def __init__(self, outputs: dict[int, tuple[torch.Tensor, str]], first: dict[str, tuple[str, Any]]):
        super().__init__()
        self.outputs, self.first = outputs, first

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
            hit = self.outputs.get(id(args[0]))
            if hit is not None and hit[0] is args[0] and hit[1] not in self.first:
                self.first[hit[1]] = ("function", _fn_name(func))
        return out


def _trace_run(model: nn.Module, modules: dict[str, nn.Module], example: Any
               ) -> tuple[list[str], dict[str, tuple[str, Any]]]:
    """One example forward with hooks: the layers in call order, and for each layer the first
    module or function that consumed its output."""
    outputs: dict[int, tuple[torch.Tensor, str]] = {}
    first: dict[str, tuple[str, Any]] = {}
    order: list[str] = []
    handles = []

    def on_layer(name):
        def hook(m, i, o):
            if name not in order:
                order.append(name)
            if isinstance(o, torch.Tensor):
                outputs[id(o)] = (o, name)
        return hook

    def on_pre(name):
        def hook(m, args):
            if args and isinstance(args[0], torch.Tensor):
                hit = outputs.get(id(args[0]))
                if hit is not None and hit[0] is args[0] and hit[1] not in first:
                    first[hit[1]] = ("module", name)
        return hook

    try:
        for name, mod in modules.items():
            if name and isinstance(mod, LAYER_TYPES):
                handles.append(mod.register_forward_hook(on_layer(name)))
            if name:
                handles.append(mod.register_forward_pre_hook(on_pre(name)))
        with torch.no_grad(), _DiscoverMode(outputs, first):
            try:
                model(*example.args, **example.kwargs)
            except Exception as e:
                msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                raise InputError(f"data batch of shape {example.describe()} does not fit the model "
                                 f"({type(e).__name__}: {msg})") from e
    finally:
        for h in handles:
            h.remove()
    return order, first


def _runtime_discover(model: nn.Module, example: Any) -> ModelGraph:
    modules = dict(model.named_modules())
    order, first = _trace_run(model, modules, example)
    layers = []
    act_modules = {}
    for name in order:
        lay = _layer_from_module(name, modules[name])
        kind, what = first.get(name, (None, None))
        if kind == "module" and isinstance(modules[what], ACT_MODULES):
            lay.point, lay.point_kind = what, "module"
            act_modules[what] = modules[what]
        elif kind == "function" and what in ACT_NAMES:
            lay.point, lay.point_kind = f"{what.rstrip('_')}({name})", "function"
        layers.append(lay)
    if layers:
        layers[-1].final = True
    called = set(order)
    unsupported = [
        {"name": n, "reason": "never called as a module during the forward pass, so it cannot be hooked"}
        for n, m in modules.items() if n and isinstance(m, LAYER_TYPES) and n not in called
    ]
    g = ModelGraph(layers, "runtime", runner=model, unsupported=unsupported)
    g._runtime = _RuntimeTap(model, layers, act_modules)
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
                            weight=w, bias=state_dict.get(name + ".bias"), point="n/a", point_kind="unknown"))
    if layers:
        layers[-1].final = True
    return ModelGraph(layers, "weights", notes=["layers read from the state dict alone (no architecture given)"])


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
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:  # any tracing failure: fall back to runtime discovery
        trace_error = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
        gm = None
    if gm is not None:
        layers, probes = _instrument(gm, exported=False)
        called = {lay.name for lay in layers}
        unsupported = [
            {"name": n, "reason": "never called as a module in the traced graph (e.g. used by "
                                  "nn.MultiheadAttention through functional calls), so it cannot be hooked"}
            for n, m in model.named_modules() if n and isinstance(m, LAYER_TYPES) and n not in called
        ]
        g = ModelGraph(layers, "fx", runner=gm, unsupported=unsupported)
        g._probes = probes
        return g
    if example is None:
        g = weight_layers(dict(model.state_dict()))
        for lay in g.layers:
            lay.point = "unknown (needs data: the model does not trace with torch.fx)"
        g.runner = model
        g.method = "runtime"
        g.notes = [f"torch.fx could not trace the model ({trace_error}); give data to find activation points"]
        return g
    g = _runtime_discover(model, example)
    g.notes.append(f"torch.fx could not trace the model ({trace_error}); activation points found at run time")
    return g


def unit_view(t: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """[batch, ..., units] or [batch, units, ...] -> [batch, units, positions]."""
    if t.dim() == 1:
        return t.reshape(1, -1, 1)
    if unit_dim == -1 or unit_dim == t.dim() - 1:
        b, u = t.shape[0], t.shape[-1]
        return t.reshape(b, -1, u).transpose(1, 2)
    return t.reshape(t.shape[0], t.shape[1], -1)


__all__ = ["Layer", "ModelGraph", "discover", "unit_view", "weight_layers"]
