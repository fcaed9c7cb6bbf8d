"""The consumer graph both walkers produce, and what is written once on top of it.

A walker (``fitcli.discovery.fx`` on a traced graph, ``fitcli.discovery.runtime`` on one recorded
forward) gives, for any value, its *uses*: who consumed it, whether it was their first argument,
what they produced, and the use as a function of that value alone (the other arguments held) when
no other computed value takes part. On that:

- ``follow``: from a layer's output through every use that keeps channel i in channel i
  (``fitcli.elementwise``) to the activation point, naming the chain;
- ``find_gates``: ``act(gate(x)) * up(x) -> down``, one gated unit per shared channel;
- ``consumers_of``: the layers reading a value directly.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fitcli.discovery import hf, kinds
from fitcli.discovery.model import Layer, short
from fitcli.elementwise import is_channelwise, probe_shape

MUL_NAMES = {"mul", "mul_", "__mul__", "__rmul__"}


@dataclass
class Use:
    """One consumer of a value."""

    kind: str  # "module" | "function" | "output"
    name: str  # module name, or the function's name as chains show it (``relu``, ``mul``)
    out: Any  # the value it produced (a walker's value: an fx node, a recorded tensor)
    first: bool  # the consumed value is its first argument
    fn: Callable[[torch.Tensor], Any] | None = None  # of the value alone; None: mixed, or a layer
    is_layer: bool = False  # the consumer is an active layer (its input is that layer's)
    is_mul: bool = False  # an elementwise product
    operands: list[Any] = field(default_factory=list)  # the values among its arguments
    n_args: int = 0  # how many positional arguments it has


class ConsumerGraph(Protocol):
    def uses(self, value: Any) -> list[Use]:
        """Every consumer of ``value`` (in call order)."""

    def key(self, value: Any) -> Hashable:
        """A hashable identity for ``value``."""

    def like(self, value: Any) -> torch.Tensor | None:
        """An example tensor of ``value``'s shape and dtype, when known."""


def probe_for(lay: Layer, like: torch.Tensor | None = None) -> torch.Tensor:
    """A small random input shaped like the layer's output, to test ops for channel-wise-ness."""
    dtype = lay.tensors[0].dtype if lay.tensors[0].is_floating_point() else torch.float32
    if like is not None and like.dim() >= 1:
        small = like[:2] if like.dim() > 1 else like
        return torch.randn(small.shape, generator=torch.Generator().manual_seed(1), dtype=small.dtype)
    return torch.randn(probe_shape(lay.units, hf.spatial(lay.type), lay.unit_dim),
                       generator=torch.Generator().manual_seed(1), dtype=dtype)


def follow(lay: Layer, start: Any, cg: ConsumerGraph) -> tuple[Any, list[Use]]:
    """From the layer's output ``start`` through channel-wise uses; sets the layer's point, point
    kind and chain. (the value at the point, the uses passed)."""
    probe = probe_for(lay, cg.like(start))
    point, prev, steps = start, lay.name, []
    while True:
        uses = cg.uses(point)
        if len(uses) != 1:
            return point, steps
        u = uses[0]
        if u.is_layer or u.kind == "output" or not u.first or u.fn is None or not is_channelwise(u.fn, probe):
            return point, steps
        if u.kind == "module":
            lay.point, lay.point_kind = u.name, "module"
            lay.chain.append(short(u.name, lay.name))
            lay.chain_modules.append(u.name)
            prev = u.name
        else:
            lay.point, lay.point_kind = f"{u.name}({prev})", "function"
            lay.chain.append(u.name)
            prev = lay.point
        steps.append(u)
        point = u.out


def find_gates(points: list[tuple[Any, Layer]], cg: ConsumerGraph) -> list[tuple[Any, Layer, Layer, str]]:
    """``act(gate(x)) * up(x) -> down``: (product value, gate layer, up layer, down layer name)
    for every product of two layers' points read by one layer alone."""
    by_key = {cg.key(v): lay for v, lay in points}
    groups: list[tuple[Any, Layer, Layer, str]] = []
    seen: set[Hashable] = set()
    for v, _lay in points:
        uses = cg.uses(v)
        if len(uses) != 1 or not uses[0].is_mul or cg.key(uses[0].out) in seen:
            continue
        m = uses[0]
        if len(m.operands) != 2 or m.n_args != 2 or not all(cg.key(o) in by_key for o in m.operands):
            continue
        a, b = by_key[cg.key(m.operands[0])], by_key[cg.key(m.operands[1])]
        if a is b or a.units != b.units or a.unit_dim != b.unit_dim or a.weight_only or b.weight_only:
            continue
        downs = cg.uses(m.out)
        if len(downs) != 1 or not downs[0].is_layer or not downs[0].first:
            continue
        gate, up = (a, b) if len(a.chain) >= len(b.chain) else (b, a)
        groups.append((m.out, gate, up, downs[0].name))
        seen.add(cg.key(m.out))
    return groups


def consumers_of(value: Any, cg: ConsumerGraph) -> list[str] | None:
    """The layers reading ``value`` directly (as their first argument); None if any use is not one."""
    uses = cg.uses(value)
    if not uses or not all(u.is_layer and u.first for u in uses):
        return None
    return sorted({u.name for u in uses})


def unsupported(model: Any, covered: set[str], reason_missing: str) -> list[dict[str, str]]:
    """Every module with parameters of its own that no layer or chain covers, with its type."""
    out = []
    for n, m in model.named_modules():
        if n in covered or not any(True for _ in m.parameters(recurse=False)):
            continue
        if kinds.layers_of(n, m):
            out.append({"name": n, "type": type(m).__name__, "reason": reason_missing})
        else:
            out.append({"name": n, "type": type(m).__name__,
                        "reason": f"{type(m).__name__} is not an auditable layer type (not supported yet)"})
    return out
