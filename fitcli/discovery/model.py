"""The layer and graph model: a ``Layer`` owns units (rows of one or more parameters) read at one
activation point; a ``ModelGraph`` holds a model's layers and routes activations to callbacks
(``ModelGraph.tap``). What a unit *is* (a channel, a head, a recurrent unit...) is the layer's
``kind`` (``fitcli.discovery.kinds``): the layer asks it how to view and tap its units.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fitcli.errors import InputError

if TYPE_CHECKING:
    import torch


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
    point_kind: str  # where the point is, as the report writes it: "module" | "function" | "output" | ...
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
    kind: Any = None  # the unit kind (a ``fitcli.discovery.kinds.UnitKind``)

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
        import torch  # this module is imported without torch (the report readers ask it about kinds)

        return torch.cat([self._unit_rows(t, ax) for t, (_, _, ax) in zip(tensors, self.parts, strict=True)], dim=1)

    def _unit_rows(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        t = t.detach().movedim(axis, 0)
        if self.gates > 1:  # [gates * units, ...] -> [units, gates, ...]
            t = t.reshape(self.gates, self.units, -1).transpose(0, 1)
        return t.reshape(self.units, -1)

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """The activation as ``[batch, units, observations]`` (the kind says how)."""
        return self.kind.view(self, t)

    def units_view(self, t: torch.Tensor) -> torch.Tensor:
        """A view of ``t`` with units at dim 1 (writing into it writes into ``t``: ablation)."""
        return self.kind.units_view(self, t)

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
    """A model's layers, how they were found (``method``) and what runs them (``runner``).
    ``point_tap``: the walker's own way to hand a layer's value at its activation point to a
    callback (probes in a traced graph, or hooks following chains at run time)."""

    layers: list[Layer]
    method: str  # "fx" | "export" | "runtime" | "weights"
    runner: Any = None
    unsupported: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    point_tap: Any = field(default=None, repr=False)

    def layer(self, name: str) -> Layer:
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise KeyError(name)

    @property
    def probes(self) -> dict[str, Any]:
        """The identity probe module at each layer's point in a traced graph (empty otherwise)."""
        return dict(getattr(self.point_tap, "probes", None) or {})

    @property
    def active(self) -> list[Layer]:
        """The layers with an activation point (not weight-only)."""
        return [lay for lay in self.layers if not lay.weight_only]

    @contextlib.contextmanager
    def tap(self, callbacks: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
        """Route each named layer's activation through its callback; always undone on exit. A
        kind that taps its own units (recurrent layers, heads of nn.MultiheadAttention, a
        registered kind) does; the rest go to the walker's activation points."""
        if self.runner is None:
            raise InputError("this checkpoint has no runnable model (give its architecture)")
        by_name = {lay.name: lay for lay in self.layers}
        own: dict[Any, dict[str, Callable]] = {}
        rest: dict[str, Callable] = {}
        for name, fn in callbacks.items():
            lay = by_name.get(name)
            if lay is not None and not lay.kind.at_graph_point(lay):
                own.setdefault(lay.kind, {})[name] = fn
            else:
                rest[name] = fn
        with contextlib.ExitStack() as stack:
            if own:
                mods = dict(self.runner.named_modules())
                for kind, cbs in own.items():
                    stack.enter_context(kind.tap(mods, [x for x in self.layers if x.kind is kind], cbs))
            if rest:
                if self.point_tap is None:
                    raise KeyError(next(iter(rest)))
                stack.enter_context(self.point_tap(rest))
            yield

    def __call__(self, batch: Any) -> Any:
        assert self.runner is not None
        return self.runner(*batch.args, **batch.kwargs)


def mark_final(layers: list[Layer]) -> None:
    """The output layer: the last layer found, when its kind can be the model's output (the
    opt-in kinds, attention heads, are never the output and are passed over)."""
    order = [lay for lay in layers if not lay.kind.opt_in]
    if order and order[-1].kind.can_be_final(order[-1]):
        order[-1].final = True


def short(name: str, layer: str) -> str:
    """A module's name relative to the layer's parent (``layer1.0.bn1`` next to ``layer1.0.conv1``)."""
    parent = layer.rsplit(".", 1)[0] + "." if "." in layer else ""
    return name[len(parent):] if parent and name.startswith(parent) else name


def covered(layers: list[Layer]) -> set[str]:
    """Modules that a layer owns or that its chain passes through."""
    out: set[str] = set()
    for lay in layers:
        out.update(lay.members or [lay.name])
        out.update(lay.chain_modules)
    return out


def token_mask(t: torch.Tensor, lay: Layer, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The batch's real-token mask when ``t`` is a per-token activation ([batch, tokens, units]):
    padding positions are not observations."""
    own = getattr(lay.kind, "token_mask", None)  # a kind laying out its observations itself (hidden channels)
    if own is not None:
        return own(lay, t, mask)
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
