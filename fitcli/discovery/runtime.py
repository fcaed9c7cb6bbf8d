"""The run-time walker, for models that do not trace (Hugging Face models, data-dependent control
flow): one example forward with hooks and a ``TorchFunctionMode`` records which module or function
consumed which tensor (the consumer graph, values being recorded tensors); capture then follows
the same chains at run time (``RuntimeTap``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from fitcli.discovery import kinds
from fitcli.discovery.fx import fn_name
from fitcli.discovery.graph import MUL_NAMES, Use, consumers_of, find_gates, follow, unsupported
from fitcli.discovery.hidden import HIDDEN
from fitcli.discovery.model import Layer, ModelGraph, covered, mark_final
from fitcli.errors import InputError, first_line


def norm_name(func: Any) -> str:
    """A function's name as chains store it: ``relu_`` -> ``relu``; dunder names kept."""
    n = fn_name(func)
    return n if n.startswith("__") else n.rstrip("_")


@dataclass
class Event:
    kind: str  # "module" | "function"
    name: str  # module name, or function name (``norm_name``)
    args: tuple
    kwargs: dict
    func: Any = None  # the function (function events)
    out: Any = None  # filled when the call returns


class Recorder(TorchFunctionMode):
    """One example forward: who consumed every tensor (modules, and functions called outside
    leaf modules), which tensors were computed during the forward, and the layers in call order."""

    def __init__(self, modules: dict[str, nn.Module]):
        super().__init__()
        self.modules = modules
        self.keep: list[Any] = []  # keeps ids unique during the forward
        self.consumers: dict[int, list[Event]] = {}
        self.produced: set[int] = set()
        self.layer_out: dict[str, torch.Tensor] = {}
        self.order: list[str] = []
        self.stack: list[tuple[Event | None, bool]] = []  # open module calls: (event, is leaf)
        self.called: set[str] = set()
        self.found: dict[str, list[Layer]] = {}

    def _consume(self, t: Any, ev: Event) -> None:
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
            ev = Event("module", name, tuple(args), {})
            self._consume(args[0], ev)
        self.stack.append((ev, not any(True for _ in mod.children())))

    def post(self, name: str, mod: nn.Module, args: tuple, out: Any) -> None:
        ev, _ = self.stack.pop()
        if ev is not None:
            ev.out = out
        self._produce(out)
        if name in self.order:
            return
        layers = kinds.layers_of(name, mod)
        if not layers or (layers[0].kind.chained and not isinstance(out, torch.Tensor)):
            return
        self.order.append(name)
        self.found[name] = layers
        if isinstance(out, torch.Tensor):
            self.layer_out[name] = out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.in_leaf() and isinstance(out, torch.Tensor):
            ev = Event("function", norm_name(func), tuple(args), dict(kwargs or {}), func, out)
            seen = set()
            for a in args:
                if isinstance(a, torch.Tensor) and id(a) not in seen:
                    seen.add(id(a))
                    self._consume(a, ev)
            self._produce(out)
        return out


class RuntimeConsumers:
    """The consumer graph of a recorded forward: a value is (tensor, how many of its uses were
    already passed): a module that returned its input itself (dropout in eval) is one use, then
    the tensor's later uses follow."""

    def __init__(self, rec: Recorder, modules: dict[str, nn.Module], layer_names: set[str]):
        self.rec, self.modules, self.layer_names = rec, modules, layer_names

    def key(self, value: Any) -> Hashable:
        return id(value[0])

    def like(self, value: Any) -> torch.Tensor | None:
        return value[0]

    def uses(self, value: Any) -> list[Use]:
        t, start = value
        evs = self.rec.consumers.get(id(t), [])[start:]
        if evs and evs[0].kind == "module" and evs[0].out is t:  # the identity: one use, then the rest
            return [self._use(evs[0], t, (t, start + 1))]
        return [self._use(ev, t, (ev.out, 0)) for ev in evs]

    def _use(self, ev: Event, t: torch.Tensor, out: Any) -> Use:
        first = bool(ev.args) and ev.args[0] is t
        tensors = [a for a in ev.args if isinstance(a, torch.Tensor)]
        return Use(ev.kind, ev.name, out, first, fn=self._unary(ev) if first else None,
                   is_layer=ev.kind == "module" and ev.name in self.layer_names,
                   is_mul=ev.kind == "function" and ev.name in MUL_NAMES,
                   operands=[(a, 0) for a in tensors], n_args=len(ev.args))

    def _unary(self, ev: Event) -> Callable[[torch.Tensor], Any] | None:
        """The event as a function of its first input alone, or None (another computed tensor takes
        part: the signal is mixed; or its output is no tensor)."""
        if not isinstance(ev.out, torch.Tensor):
            return None
        if ev.kind == "module":
            mod = self.modules[ev.name]
            if kinds.layers_of(ev.name, mod) or len(ev.args) != 1:
                return None
            return lambda x: mod(x)
        rest, kwargs, func = ev.args[1:], ev.kwargs, ev.func
        if any(isinstance(a, torch.Tensor) and id(a) in self.rec.produced for a in (*rest, *kwargs.values())):
            return None
        return lambda x: func(x, *rest, **kwargs)


@dataclass
class Step:
    kind: str  # "module" | "function"
    name: str  # module name, or function name


class RuntimeTap:
    """At run time, follow each tapped layer's chain (module hooks for module steps, a
    TorchFunctionMode for function steps and gated products) and hand the value at its point to
    the callback (``ModelGraph.point_tap``)."""

    def __init__(self, model: nn.Module, layers: list[Layer], steps: dict[str, list[Step]]):
        self.model = model
        self.layers = {lay.name: lay for lay in layers}
        self.modules = dict(model.named_modules())
        self.steps = steps

    @contextlib.contextmanager
    def __call__(self, callbacks: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
        heads = {n: f for n, f in callbacks.items() if self.layers[n].kind.is_head}
        state = TapState(self, {n: f for n, f in callbacks.items() if n not in heads})
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
                with TapMode(state):
                    yield
            else:
                yield
        finally:
            for h in handles:
                h.remove()
            state.current.clear()


class TapState:
    """Where each tapped chain stands during one forward: the id of its current tensor."""

    def __init__(self, tap: RuntimeTap, callbacks: dict[str, Callable[[torch.Tensor], torch.Tensor]]):
        self.tap, self.callbacks = tap, callbacks
        self.current: dict[str, tuple[int, int]] = {}  # chain key -> (tensor id, next step index)
        self.chains: dict[str, list[Step]] = {}
        self.gates: dict[str, tuple[str, str]] = {}  # gated layer -> (gate chain key, up chain key)
        self.inside: list[str] = []
        for name in callbacks:
            lay = tap.layers[name]
            if lay.members:  # a gated unit: read at the product of its members' points
                gate, up = lay.members
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

    def _advance(self, key: str, out: Any) -> Any:
        idx = self.current[key][1]
        if idx >= len(self.chains[key]) and key in self.callbacks:  # the chain reached its point
            out = self.callbacks[key](out)
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

    def _step(self, kind: str, name: str, first: Any, out: Any) -> Any:
        """``first`` went through a step (a module or function) and gave ``out``: advance every
        chain standing at ``first`` whose next step this is."""
        for key, chain in self.chains.items():
            cur = self.current.get(key)
            if cur is None or cur[0] != id(first) or cur[1] >= len(chain):
                continue
            step = chain[cur[1]]
            if step.kind == kind and step.name == name:
                self.current[key] = (id(out), cur[1] + 1)
                out = self._advance(key, out)
        return out

    def _module_post(self, mod_name: str):
        def post(m, args, out):
            if self.inside and self.inside[-1] == mod_name:
                self.inside.pop()
            if not args or not isinstance(out, torch.Tensor):
                return out
            return self._step("module", mod_name, args[0], out)
        return post

    def in_leaf(self) -> bool:
        return bool(self.inside) and self.inside[-1] in self.leaf

    def on_function(self, name: str, args: tuple, out: Any) -> Any:
        if not isinstance(out, torch.Tensor) or self.in_leaf():
            return out
        if args and isinstance(args[0], torch.Tensor):
            out = self._step("function", name, args[0], out)
        if name in MUL_NAMES and self.gates:
            ids = {id(a) for a in args if isinstance(a, torch.Tensor)}
            for gname, (gate, up) in self.gates.items():
                g, u = self.current.get(gate), self.current.get(up)
                if g and u and g[1] >= len(self.chains[gate]) and u[1] >= len(self.chains[up]) \
                        and {g[0], u[0]} == ids:
                    out = self.callbacks[gname](out)
                    self.current.pop(gate, None)
                    self.current.pop(up, None)
        return out


class TapMode(TorchFunctionMode):
    def __init__(self, state: TapState):
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        return self.state.on_function(norm_name(func), tuple(args), out)


def record(model: nn.Module, modules: dict[str, nn.Module], example: Any) -> Recorder:
    """One example forward under the recorder (an ``InputError`` when the batch does not fit)."""
    rec = Recorder(modules)
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


def _chains(rec: Recorder, cg: RuntimeConsumers, layers: list[Layer]
            ) -> tuple[dict[str, list[Step]], list[tuple[Any, Layer]]]:
    """Each chained layer's steps from its output, and the value at its point."""
    steps: dict[str, list[Step]] = {}
    points: list[tuple[Any, Layer]] = []
    for lay in layers:
        t = rec.layer_out.get(lay.name)
        if t is None or not lay.kind.chained:
            continue
        end, uses = follow(lay, (t, 0), cg)
        steps[lay.name] = [Step(u.kind, u.name) for u in uses]
        # the point's tensor with all its uses: one that passed an identity module (dropout in eval)
        # still counts that module among its consumers, as reports have always said
        points.append(((end[0], 0), lay))
    return steps, points


def runtime_discover(model: nn.Module, example: Any) -> ModelGraph:
    """Layers and activation points from one example forward (a ``Batch``)."""
    modules = dict(model.named_modules())
    rec = record(model, modules, example)
    layers = [lay for n in rec.order for lay in rec.found[n]]
    cg = RuntimeConsumers(rec, modules, {lay.name for lay in layers if lay.kind.chained})
    steps, points = _chains(rec, cg, layers)
    for lay, proj in kinds.HEADS.find_in_model(model):
        if proj in rec.called:  # after the layers called before it (then marking the final layer passes it over)
            at = next((i for i, x in enumerate(layers) if x.name == proj), len(layers))
            layers.insert(at, lay)
    for _m, gate, up, down in find_gates(points, cg):
        layers[layers.index(gate)] = kinds.GATED.combine(gate, up, down)
        layers.remove(up)
    kept = {id(lay) for lay in layers}
    for end, lay in points:
        if id(lay) in kept:
            lay.consumers = lay.consumers or consumers_of(end, cg)
    mark_final(layers)
    layers.extend(HIDDEN.find_in_model(model, rec.called))  # opt-in: never the output layer
    reason = "never called as a module during the forward pass, so it cannot be hooked"
    g = ModelGraph(layers, "runtime", runner=model, unsupported=unsupported(model, covered(layers), reason))
    g.point_tap = RuntimeTap(model, layers, steps)
    return g
