"""The torch.fx walker: layers and activation points on a traced graph (``torch.fx`` or a
``torch.export`` program's aten graph). A GraphModule sharing the model's parameters gets an
identity ``Probe`` module after each activation point; ``ModelGraph.tap`` sets their callbacks."""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch
from torch import nn

from fitcli.discovery import hf, kinds
from fitcli.discovery.graph import MUL_NAMES, Use, consumers_of, find_gates, follow
from fitcli.discovery.model import Layer, mark_final

EXPORT_LAYER_OPS = {"linear", "conv1d", "conv2d", "conv3d", "convolution"}


def fn_name(target: Any) -> str:
    name = getattr(target, "__name__", None) or str(target)
    # aten overloads: torch.ops.aten.relu.default -> "relu"
    if hasattr(target, "_schema"):
        name = target._schema.name.split("::")[-1]
    return name


def getattr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class Probe(nn.Module):
    """Identity inserted after an activation point in a traced copy of the graph."""

    def __init__(self, layer: str):
        super().__init__()
        self.layer = layer
        self.fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.fn is None else self.fn(x)


class ProbeTap:
    """Hands each activation point's value to a callback through the probes (``ModelGraph.point_tap``)."""

    def __init__(self, probes: dict[str, Probe]):
        self.probes = probes

    @contextlib.contextmanager
    def __call__(self, callbacks: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
        try:
            for name, fn in callbacks.items():
                self.probes[name].fn = fn  # KeyError for a layer without a point
            yield
        finally:
            for p in self.probes.values():
                p.fn = None


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


class FxConsumers:
    """The consumer graph of a traced graph: values are nodes."""

    def __init__(self, gm: torch.fx.GraphModule, layer_nodes: dict[torch.fx.Node, str]):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.layer_nodes = layer_nodes

    def key(self, value: Any) -> Hashable:
        return value

    def like(self, value: Any) -> torch.Tensor | None:
        return value.meta.get("fitcli_like")

    def uses(self, value: Any) -> list[Use]:
        return [self._use(u, value) for u in value.users]

    def _use(self, u: torch.fx.Node, value: torch.fx.Node) -> Use:
        first = bool(u.args) and u.args[0] is value
        if u.op == "output":
            return Use("output", "output", u, first)
        kind = "module" if u.op == "call_module" else "function"
        if u in self.layer_nodes:  # a layer's own name (an exported graph's layers are aten calls)
            name = self.layer_nodes[u]
        elif kind == "module":
            name = str(u.target)
        else:
            name = (str(u.target) if u.op == "call_method" else fn_name(u.target)).rstrip("_")
        return Use(kind, name, u, first, fn=self._unary(u) if first else None, is_layer=u in self.layer_nodes,
                   is_mul=_is_mul(u), operands=[a for a in u.args if isinstance(a, torch.fx.Node)], n_args=len(u.args))

    def _unary(self, u: torch.fx.Node) -> Callable[[torch.Tensor], Any] | None:
        """``u`` as a function of its first argument, the others held constant; None when another
        argument is computed per batch (a product of two activations, a residual add...)."""
        ok, rest = _resolve(list(u.args[1:]), self.gm)
        ok_kw, kwargs = _resolve(dict(u.kwargs), self.gm) if u.kwargs else (True, {})
        if not ok or not ok_kw:
            return None
        if u.op == "call_module":
            mod = self.modules.get(str(u.target))
            if mod is None or rest or kwargs or kinds.layers_of(str(u.target), mod):
                return None
            return lambda t: mod(t)
        if u.op == "call_function":
            return lambda t: u.target(t, *rest, **kwargs)
        if u.op == "call_method":
            return lambda t: getattr(t, str(u.target))(*rest, **kwargs)
        return None


def _is_mul(n: torch.fx.Node) -> bool:
    if n.op == "call_function":
        return n.target in (operator.mul, torch.mul) or fn_name(n.target) in MUL_NAMES
    return n.op == "call_method" and str(n.target) in MUL_NAMES


def _exported_layer(node: torch.fx.Node, gm: torch.fx.GraphModule) -> Layer | None:
    w = node.args[1] if len(node.args) > 1 else None
    if not isinstance(w, torch.fx.Node) or w.op != "get_attr":
        return None
    wname = str(w.target)
    name = wname[: -len(".weight")] if wname.endswith(".weight") else wname
    b = node.args[2] if len(node.args) > 2 else None
    bias = getattr_path(gm, str(b.target)) if isinstance(b, torch.fx.Node) and b.op == "get_attr" else None
    return kinds.CHANNELS.from_weight(name, wname, getattr_path(gm, wname), bias, name, "output")


def _graph_layers(gm: torch.fx.GraphModule, exported: bool) -> list[tuple[torch.fx.Node, Layer]]:
    modules = dict(gm.named_modules())
    found = []
    for node in gm.graph.nodes:
        if not exported and node.op == "call_module":
            mod = modules.get(str(node.target))
            if mod is not None:
                found.extend((node, lay) for lay in kinds.layers_of(str(node.target), mod))
        elif exported and node.op == "call_function" and fn_name(node.target) in EXPORT_LAYER_OPS:
            lay = _exported_layer(node, gm)
            if lay is not None:
                found.append((node, lay))
    return found


def _head_probes(gm: torch.fx.GraphModule, model: nn.Module | None, order: list[Layer]
                 ) -> list[tuple[torch.fx.Node, Layer]]:
    """Head layers whose output projection is called as a module in the graph: their point is
    that call's input. Inserted in ``order`` before the projection."""
    if model is None:
        return []
    calls = {str(n.target): n for n in gm.graph.nodes if n.op == "call_module"}
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    layer_at = {str(n.target): index[n] for n in gm.graph.nodes if n.op == "call_module"}
    found = []
    for lay, proj in kinds.HEADS.find_in_model(model):
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


def _add_probes(gm: torch.fx.GraphModule, points: list[tuple[torch.fx.Node, Layer]],
                heads: list[tuple[torch.fx.Node, Layer]]) -> dict[str, Probe]:
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
    return probes


def instrument(gm: torch.fx.GraphModule, exported: bool, model: nn.Module | None = None
               ) -> tuple[list[Layer], ProbeTap]:
    """The layers of a traced graph in call order, and the probes at their activation points
    (added to ``gm``)."""
    found = _graph_layers(gm, exported)
    layer_nodes = {node: lay.name for node, lay in found if lay.kind.chained}
    cg = FxConsumers(gm, layer_nodes)
    points = [(follow(lay, node, cg)[0], lay) for node, lay in found if lay.kind.chained]
    order = [lay for _, lay in found]
    for m, gate, up, down in find_gates(points, cg):
        g = kinds.GATED.combine(gate, up, down)
        points = [(p, lay) for p, lay in points if lay is not gate and lay is not up] + [(m, g)]
        order[order.index(gate)] = g
        order.remove(up)
    for p, lay in points:  # consumers before probes change the graph
        lay.consumers = lay.consumers or consumers_of(p, cg)
    heads = _head_probes(gm, model, order) if not exported else []
    probes = _add_probes(gm, points, heads)
    mark_final(order)
    return order, ProbeTap(probes)


class Shapes(torch.fx.Interpreter):
    """One example forward through the traced graph, keeping each node's output as an empty
    tensor of its shape and dtype (``node.meta["fitcli_like"]``)."""

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            n.meta["fitcli_like"] = torch.empty(out.shape, dtype=out.dtype)
        return out


class Tracer(torch.fx.Tracer):
    """torch.fx's tracer with ``torch.nn`` containers opened: its default keeps every ``torch.nn``
    module a leaf, so the layers inside ``nn.TransformerEncoderLayer`` and the like would never be
    seen. Leaves are modules without children (layers, norms, activations), attention modules
    (their heads are sliced by functional calls, not submodules) and the modules a registered
    unit kind owns."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if hf.is_mha(m) or kinds.claimed(module_qualified_name, m):
            return True
        if any(True for _ in m.children()):
            return False
        return super().is_leaf_module(m, module_qualified_name)
