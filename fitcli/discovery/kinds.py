"""Unit kinds: what a unit is, as classes in a registry.

Each kind says how its units are

- **found**: ``find(name, module)`` gives the layers a module owns (``[]`` when none); kinds
  found from the whole model or from the consumer graph (heads, gated channels, blocks) say so;
- **viewed**: ``view(layer, t)``, the activation as ``[batch, units, observations]``;
- **tapped**: ``tap(modules, layers, callbacks)``, a context manager handing each layer's value to
  its callback (the walkers' activation points for the kinds whose ``at_graph_point`` is true);
- **ablated**: ``units_view(layer, t)``, a view of the activation with units at dim 1: an
  ablation writes unit i's value into it;
- **removed**: ``removal(layer)``, None when ``fitcli.prune`` can remove its units, else why not.

Built in: Linear/Conv channels, gated channels, embedding rows, recurrent units, attention heads
and residual blocks. ``register_unit_kind`` adds a kind for a user's own module (checked first, so
it can also claim a module a built-in kind would take). This module imports no torch: the report
readers ask it about the kind an entry's ``activation_point_kind`` names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from fitcli.discovery.model import Layer, unit_view
from fitcli.errors import UsageError

REQUIRED = ("name", "find", "view", "units_view", "removal")
OPTIONAL = ("opt_in", "is_head", "weight_only", "chained", "point_kinds", "supports_weight_metrics",
            "at_graph_point", "can_be_final", "tappable", "tap")
NOT_SUPPORTED = "{type} units (gated, recurrent or embedding rows) are not supported yet"


class UnitKind:
    """The base of every unit kind. A subclass sets ``name`` and defines ``find``, ``view``,
    ``units_view`` and ``removal``; the rest have defaults (tapped at the module's output)."""

    name: str = ""
    opt_in = False  # units asked for by name only (``--layer '*.heads'``), never by default
    is_head = False  # attention heads (the attention metrics read them)
    weight_only = False  # no activation: only weight metrics (embedding rows)
    chained = False  # the walkers follow its output through channel-wise operations
    point_kinds: tuple[str, ...] = ()  # the ``activation_point_kind`` values its layers write
    supports_weight_metrics = True  # the rows of ``Layer.weight`` are its units' weights

    def find(self, name: str, module: Any) -> list[Layer]:
        """The layers of this kind that ``module`` (called ``name``) owns."""
        raise NotImplementedError

    def view(self, layer: Layer, t: Any) -> Any:
        """The activation ``t`` as ``[batch, units, observations]``."""
        raise NotImplementedError

    def units_view(self, layer: Layer, t: Any) -> Any:
        """A view of ``t`` with units at dim 1: writing unit i into it ablates unit i."""
        raise NotImplementedError

    def removal(self, layer: Layer) -> str | None:
        """None when pruning can remove the layer's units, else the reason it cannot."""
        raise NotImplementedError

    def at_graph_point(self, layer: Layer) -> bool:
        """Tapped at the activation point the walker found (True), or by ``tap`` (False)."""
        return False

    def can_be_final(self, layer: Layer) -> bool:
        """Can the layer be the model's output layer (its units the outputs)."""
        return False

    def tappable(self, layer: Layer) -> bool:
        """Has the layer an activation point that was found (weight-only layers have none; a model
        that did not trace, given no data, has unknown ones)."""
        return not self.weight_only and layer.point_kind != "unknown"

    @contextlib.contextmanager
    def tap(self, modules: dict[str, Any], layers: list[Layer],
            callbacks: dict[str, Callable[[Any], Any]]) -> Iterator[None]:
        """By default: the output of the module the layer is named after goes through its callback."""
        handles = []
        try:
            for name, fn in callbacks.items():
                handles.append(modules[name].register_forward_hook(lambda m, a, out, fn=fn: fn(out)))
            yield
        finally:
            for h in handles:
                h.remove()

    def layer(self, name: str, module: Any, units: int, parts: list[tuple[str, Any, int]], *, bias: Any = None,
              unit_dim: int = -1, point_kind: str = "output") -> Layer:
        """A layer of this kind read at ``module``'s output: ``parts`` are (parameter name, tensor,
        the axis of the tensor that indexes units)."""
        return Layer(name=name, type=type(module).__name__, units=units, unit_dim=unit_dim, parts=parts, bias=bias,
                     point=name, point_kind=point_kind, chain=[name], kind=self)

    def __repr__(self) -> str:
        return f"<unit kind {self.name!r}>"


class ChannelKind(UnitKind):
    """Output features of ``nn.Linear``, ``nn.Bilinear`` and Hugging Face's ``Conv1D``, output
    channels of ``nn.ConvNd``: read where the walker's chain of channel-wise operations ends."""

    name = "channels"
    chained = True
    point_kinds = ("module", "function", "output", "unknown")

    def find(self, name: str, module: Any) -> list[Layer]:
        from fitcli.discovery import hf

        if hf.is_hf_conv1d(module):  # weight [in, out]: unit i is column i
            return [Layer(name=name, type="Conv1D", units=int(module.weight.shape[1]), unit_dim=-1,
                          parts=[(f"{name}.weight", module.weight, 1)], bias=getattr(module, "bias", None),
                          point=name, point_kind="output", chain=[name], kind=self)]
        if not hf.is_layer_module(module):
            return []
        return [self.layer(name, module, int(module.weight.shape[0]), [(f"{name}.weight", module.weight, 0)],
                           bias=getattr(module, "bias", None), unit_dim=1 if isinstance(module, hf.CONV_TYPES) else -1)]

    def from_weight(self, name: str, key: str, w: Any, bias: Any, point: str, point_kind: str) -> Layer:
        """A Linear (2 dims) or ConvNd (3-5 dims) layer from its weight alone."""
        typ = "Linear" if w.dim() == 2 else f"Conv{w.dim() - 2}d"
        return Layer(name=name, type=typ, units=int(w.shape[0]), unit_dim=-1 if w.dim() == 2 else 1,
                     parts=[(key, w, 0)], bias=bias, point=point, point_kind=point_kind, chain=[name], kind=self)

    def view(self, layer: Layer, t: Any) -> Any:
        return unit_view(t, layer.unit_dim)

    def units_view(self, layer: Layer, t: Any) -> Any:
        return t.movedim(layer.unit_dim, 1)

    def removal(self, layer: Layer) -> str | None:
        return None

    def at_graph_point(self, layer: Layer) -> bool:
        return True

    def can_be_final(self, layer: Layer) -> bool:
        return True


class GatedKind(ChannelKind):
    """``act(gate(x)) * up(x) -> down``: one unit per shared channel, owned by the rows of both
    layers, read at the product. Found in the consumer graph, not per module."""

    name = "gated"
    chained = False
    point_kinds = ("gated",)

    def find(self, name: str, module: Any) -> list[Layer]:
        return []

    def combine(self, gate: Layer, up: Layer, down: str) -> Layer:
        from fitcli.discovery.model import short

        return Layer(name=f"{down}.input", type=f"Gated{gate.type}", units=gate.units, unit_dim=gate.unit_dim,
                     parts=gate.parts + up.parts, bias=None, point=f"{gate.point} * {up.point}", point_kind="gated",
                     chain=[f"({' -> '.join(gate.chain)}) * ({' -> '.join(up.chain)})", short(down, gate.name)],
                     members=[gate.name, up.name], consumers=[down],
                     chain_modules=gate.chain_modules + up.chain_modules, kind=self)

    def removal(self, layer: Layer) -> str | None:
        return NOT_SUPPORTED.format(type=layer.type)


class EmbeddingKind(UnitKind):
    """Rows of ``nn.Embedding``: weight-only units (no activation to read)."""

    name = "embedding"
    weight_only = True
    point_kinds = ("weights",)

    def find(self, name: str, module: Any) -> list[Layer]:
        from fitcli.discovery import hf

        if not hf.is_embedding(module):
            return []
        return [Layer(name=name, type=type(module).__name__, units=int(module.weight.shape[0]), unit_dim=-1,
                      parts=[(f"{name}.weight", module.weight, 0)], bias=None, point="weights only",
                      point_kind="weights", chain=[name], weight_only=True, kind=self)]

    def view(self, layer: Layer, t: Any) -> Any:
        return unit_view(t, -1)

    def units_view(self, layer: Layer, t: Any) -> Any:
        return t.movedim(-1, 1)

    def removal(self, layer: Layer) -> str | None:
        return NOT_SUPPORTED.format(type=layer.type)


class RecurrentKind(UnitKind):
    """Hidden units of ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``, one layer per layer and direction,
    read at the hidden state of every step (``fitcli.recurrent`` runs the module layer by layer)."""

    name = "recurrent"
    point_kinds = ("recurrent",)

    def find(self, name: str, module: Any) -> list[Layer]:
        from fitcli import recurrent
        from fitcli.discovery import hf

        if not hf.is_recurrent(module):
            return []
        out = []
        for _, _, sfx in recurrent.suffixes(module):
            lname = recurrent.layer_name(name, sfx)
            parts = [(f"{name}.weight_ih{sfx}", getattr(module, f"weight_ih{sfx}"), 0),
                     (f"{name}.weight_hh{sfx}", getattr(module, f"weight_hh{sfx}"), 0)]
            out.append(Layer(name=lname, type=type(module).__name__, units=int(module.hidden_size), unit_dim=-1,
                             parts=parts, bias=None, point=f"{lname} (hidden state at every step)",
                             point_kind="recurrent", chain=[lname], chain_modules=[name],
                             gates=recurrent.gates(module), rnn=(name, sfx), kind=self))
        return out

    def view(self, layer: Layer, t: Any) -> Any:
        return unit_view(t, -1)

    def units_view(self, layer: Layer, t: Any) -> Any:
        return t.movedim(-1, 1)

    def removal(self, layer: Layer) -> str | None:
        return NOT_SUPPORTED.format(type=layer.type)

    def tap(self, modules: dict[str, Any], layers: list[Layer],
            callbacks: dict[str, Callable[[Any], Any]]) -> contextlib.AbstractContextManager:
        from fitcli import recurrent

        return recurrent.tap(modules, {lay.name: lay.rnn for lay in layers if lay.rnn is not None}, callbacks)


class HeadKind(UnitKind):
    """Attention heads: for every module that says how wide its heads are (``head_dim`` or
    ``attention_head_size``: Hugging Face, timm), the output projection whose input is the
    concatenated per-head context; head h is that input's slice h. Heads of
    ``nn.MultiheadAttention`` are read inside its forward (``fitcli.attention``). Opt-in: asked
    for by name or glob (``*.heads``). Found from the whole model (``find_in_model``)."""

    name = "heads"
    opt_in = True
    is_head = True
    point_kinds = ("heads",)

    def find(self, name: str, module: Any) -> list[Layer]:
        return []

    def find_in_model(self, model: Any) -> list[tuple[Layer, str]]:
        """(head layer, output projection name) for every attention module of ``model``."""
        from fitcli.discovery import hf

        mods = dict(model.named_modules())
        out = []
        for name, m in mods.items():
            if not name:
                continue
            if hf.is_mha(m):
                if _mha_supported(m):
                    out.append((self._mha(name, m), name))
                continue
            found = self._projected(name, m, mods)
            if found is not None:
                out.append(found)
                groups = KV_GROUPS.of(m, found[0])
                if groups is not None:
                    out.append((groups, found[1]))
        return out

    def _mha(self, name: str, m: Any) -> Layer:
        return Layer(name=f"{name}.heads", type="Heads", units=m.num_heads, unit_dim=-1,
                     parts=[(f"{name}.out_proj.weight", m.out_proj.weight, 1)], bias=None,
                     point=f"{name} (per-head context)", point_kind="heads",
                     chain=[f"{name}: {m.num_heads} heads x {m.head_dim} -> out_proj"], head_dim=m.head_dim,
                     mha=name, chain_modules=[name, f"{name}.out_proj"], attention=(name, "mha"), kind=self)

    def _projected(self, name: str, m: Any, mods: dict[str, Any]) -> tuple[Layer, str] | None:
        from fitcli.discovery import hf
        from fitcli.discovery.model import short

        d = hf.int_attr(m, hf.HEAD_DIM_NAMES)
        if d is None:
            return None
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        candidates = [f"{name}.{p}" for p in hf.PROJ_NAMES] + [f"{parent}.{p}" if parent else p for p in hf.PROJ_NAMES]
        proj = next((c for c in candidates if c in mods and hf.in_features(mods[c])), None)
        if proj is None:
            return None
        width = hf.in_features(mods[proj])
        h = hf.int_attr(m, hf.HEAD_COUNT_NAMES) or width // d
        if h * d != width:
            return None
        pm = mods[proj]
        axis = 0 if hf.is_hf_conv1d(pm) else 1  # the projection's input features
        lay = Layer(name=f"{name}.heads", type="Heads", units=h, unit_dim=-1, parts=[(f"{proj}.weight", pm.weight, axis)],
                    bias=None, point=f"{proj} (input)", point_kind="heads",
                    chain=[f"{name}: {h} heads x {d} -> {short(proj, name)}"], head_dim=d, consumers=[proj],
                    attention=(name, "output") if hf.eager(m) else None, kind=self)
        return lay, proj

    def view(self, layer: Layer, t: Any) -> Any:
        """A head's observations are its positions times its slice's features."""
        b = t.shape[0]
        return t.reshape(b, -1, layer.units, layer.head_dim).permute(0, 2, 1, 3).reshape(b, layer.units, -1)

    def units_view(self, layer: Layer, t: Any) -> Any:
        return t.unflatten(-1, (layer.units, layer.head_dim)).movedim(-2, 1)

    def removal(self, layer: Layer) -> str | None:
        return "attention heads: the surgery of in/out projections per head is not supported yet"

    def at_graph_point(self, layer: Layer) -> bool:
        return layer.mha is None

    def tap(self, modules: dict[str, Any], layers: list[Layer],
            callbacks: dict[str, Callable[[Any], Any]]) -> contextlib.AbstractContextManager:
        from fitcli import attention

        mha = {lay.name: lay.mha for lay in layers}
        return attention.tap(modules, {mha[n]: f for n, f in callbacks.items()})


class KVGroupKind(HeadKind):
    """Key-value groups of grouped-query attention (a Hugging Face module with
    ``num_key_value_groups`` > 1): group g is the query heads that share key-value head g, a
    contiguous slice of the output projection's input (``num_key_value_groups`` heads wide).
    Removing a group removes its key and value rows with its query heads."""

    name = "kv_groups"

    def of(self, m: Any, heads: Layer) -> Layer | None:
        """The key-value groups beside the query heads ``heads`` of attention module ``m``."""
        from fitcli.discovery import hf

        r = hf.int_attr(m, ("num_key_value_groups",))
        if not r or r <= 1 or heads.units % r or heads.head_dim is None:
            return None
        g = heads.units // r
        name = heads.name[: -len(".heads")] if heads.name.endswith(".heads") else heads.name
        return Layer(name=f"{name}.kv_groups", type="KVGroups", units=g, unit_dim=-1, parts=list(heads.parts),
                     bias=None, point=heads.point, point_kind="heads",
                     chain=[f"{name}: {g} key-value groups x {r} heads -> {heads.chain[0].rsplit(' -> ', 1)[-1]}"],
                     head_dim=heads.head_dim * r, consumers=list(heads.consumers or []), kind=self)

    def removal(self, layer: Layer) -> str | None:
        return "key-value groups: the surgery of in/out projections per group is not supported yet"


KV_GROUPS = KVGroupKind()


def _mha_supported(m: Any) -> bool:
    from fitcli import attention

    return attention.supported(m) is None


class BlockKind(UnitKind):
    """Residual blocks: a module whose output has its input's shape and whose input is added back
    to its output (or an item of an ``nn.ModuleList`` / ``nn.Sequential`` keeping its input's
    shape). Found by one example forward (``fitcli.discovery.blocks.find_blocks``); measured and
    ablated whole by ``fitcli.blocks`` (the block replaced by the identity), not per unit."""

    name = "blocks"
    point_kinds = ()

    def find(self, name: str, module: Any) -> list[Layer]:
        return []  # blocks are found by a forward, not per module: see find_blocks

    def view(self, layer: Layer, t: Any) -> Any:
        return unit_view(t, -1)

    def units_view(self, layer: Layer, t: Any) -> Any:
        return t.movedim(-1, 1)

    def removal(self, layer: Layer) -> str | None:
        return "a residual block is removed whole: fitcli.blocks(..., greedy=N) measures the removal curve"


CHANNELS = ChannelKind()
GATED = GatedKind()
EMBEDDING = EmbeddingKind()
RECURRENT = RecurrentKind()
HEADS = HeadKind()
BLOCKS = BlockKind()
BUILTIN: tuple[UnitKind, ...] = (RECURRENT, CHANNELS, EMBEDDING, GATED, HEADS, KV_GROUPS, BLOCKS)
_registered: list[UnitKind] = []


def add_builtin(kind: UnitKind) -> UnitKind:
    """A built-in kind defined in a module of its own (``fitcli.discovery.hidden``, imported with
    the package): asked after the others."""
    global BUILTIN
    BUILTIN = (*BUILTIN, kind)
    return kind


def _missing(obj: Any) -> list[str]:
    """What the registry needs that ``obj`` lacks."""
    out = []
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        out.append("name (a non-empty string)")
    for m in REQUIRED[1:]:
        own = getattr(type(obj), m, None)
        if not callable(getattr(obj, m, None)) or own is getattr(UnitKind, m):
            out.append(f"{m}()")
    if not isinstance(obj, UnitKind):
        out.extend(a for a in OPTIONAL if not hasattr(obj, a))
    return out


def register_unit_kind(kind: Any) -> Any:
    """Add a unit kind (a ``UnitKind`` subclass or instance) for a module of your own; usable as a
    class decorator. Registered kinds are asked before the built-in ones. A kind missing what the
    registry needs is refused with what is missing."""
    obj = kind() if isinstance(kind, type) else kind
    label = getattr(kind, "__name__", None) or type(kind).__name__
    missing = _missing(obj)
    if missing:
        raise UsageError(f"unit kind {label} cannot be registered: it lacks {', '.join(missing)}",
                         hint="subclass fitcli.UnitKind and define name, find, view, units_view and removal")
    if any(k.name == obj.name for k in (*BUILTIN, *_registered)):
        raise UsageError(f"unit kind {label}: a unit kind named {obj.name!r} is already registered")
    _registered.insert(0, obj)
    return kind


def unregister_unit_kind(kind: Any) -> None:
    """Remove a registered kind (by its name, its class or itself)."""
    name = kind if isinstance(kind, str) else getattr(kind, "name", None)
    _registered[:] = [k for k in _registered if k.name != name]


def unit_kinds() -> list[UnitKind]:
    """Every kind, registered ones first (the order modules are offered to them)."""
    return [*_registered, *BUILTIN]


def registered_kinds() -> list[UnitKind]:
    return list(_registered)


def layers_of(name: str, module: Any) -> list[Layer]:
    """The layers ``module`` owns: the first kind that finds any."""
    for kind in unit_kinds():
        found = kind.find(name, module)
        if found:
            return found
    return []


def claimed(name: str, module: Any) -> bool:
    """Does a registered (user) kind own ``module``: the fx tracer keeps it whole."""
    return any(k.find(name, module) for k in _registered)


def kind_of_point(point_kind: str | None) -> UnitKind:
    """The kind whose layers write ``activation_point_kind == point_kind`` in a report (a
    registered kind's layers write "output": channels-like for the report readers)."""
    for kind in BUILTIN:
        if point_kind in kind.point_kinds:
            return kind
    return CHANNELS


def entry_kind(entry: dict[str, Any]) -> UnitKind:
    """The kind of a report's layer entry (a dict of the JSON report)."""
    return kind_of_point(entry.get("activation_point_kind"))
