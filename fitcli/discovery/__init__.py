"""Graph discovery: the auditable layers of a model, their units, and each unit's activation point.

A layer owns units of one kind (``fitcli.discovery.kinds``): ``nn.Linear`` and Hugging Face's
``Conv1D`` (output features), ``nn.ConvNd`` (output channels), ``nn.Bilinear`` (output features);
``nn.Embedding`` rows (weight-only units); recurrent hidden units; attention heads; and, where two
layers' outputs meet in an elementwise product (``act(gate(x)) * up(x) -> down``), the shared
channel, owned by both rows and read at the product: one *gated* layer. A user registers a kind
for a module of their own with ``register_unit_kind``.

The activation point follows the unit from the layer's output through every operation that keeps
channel i in channel i (BatchNorm in eval mode, bias and scale, dropout, casts, elementwise
nonlinearities of any class or function, recognised by a probe: ``fitcli.elementwise``) and stops
where the signal is mixed or used twice. ``Layer.chain`` shows the path.

Three discovery methods, and the report says which:

- ``fx``: the model traces with ``torch.fx.symbolic_trace``; a GraphModule sharing the model's
  parameters gets an identity ``Probe`` module after each activation point (``discovery.fx``).
- ``export``: a ``torch.export`` program; the same, on its aten graph.
- ``runtime``: the model does not trace (Hugging Face models, data-dependent control flow); one
  example forward with hooks and a ``TorchFunctionMode`` records which module or function
  consumed which tensor, and capture follows the same chains at run time (``discovery.runtime``).

Both walkers produce one consumer graph (``discovery.graph``) on which following chains, finding
gates and reading consumers are written once; ``model.mark_final`` marks the output layer.
``ModelGraph.tap({layer: fn})`` is the single capture/ablation mechanism: inside it, ``fn`` gets
the activation tensor of that layer on every forward and returns the tensor to pass on.
Residual blocks are found by ``find_blocks`` (``discovery.blocks``).

Names are imported on first use (``fitcli.discovery.kinds`` imports no torch).
"""

from __future__ import annotations

import importlib
from typing import Any

# the built-in kinds, the one in a module of its own (hidden channels) registered with them
from fitcli.discovery import hidden as hidden

_PUBLIC = {
    "Layer": "model", "ModelGraph": "model", "unit_view": "model", "token_mask": "model", "mark_final": "model",
    "UnitKind": "kinds", "register_unit_kind": "kinds", "unregister_unit_kind": "kinds", "unit_kinds": "kinds",
    "kind_of_point": "kinds", "layers_of": "kinds",
    "discover": "find", "weight_layers": "find",
    "runtime_discover": "runtime",
    "Probe": "fx", "getattr_path": "fx",
    "is_hf_conv1d": "hf", "is_layer_module": "hf", "CONV_TYPES": "hf", "LAYER_TYPES": "hf", "PROJ_NAMES": "hf",
    "find_blocks": "blocks", "block_candidates": "blocks",
    "HiddenKind": "hidden", "HiddenLayer": "hidden",
}
_RENAMED = {"block_candidates": "candidates"}


def gated_layer(gate: Any, up: Any, down: str) -> Any:
    """One unit per shared channel of ``act(gate) * up``, read at the product (down's input)."""
    from fitcli.discovery.kinds import GATED

    return GATED.combine(gate, up, down)


def head_layers(model: Any) -> list[tuple[Any, str]]:
    """Attention heads of ``model`` as layers: (head layer, output projection name)."""
    from fitcli.discovery.kinds import HEADS

    return HEADS.find_in_model(model)


def hidden_layers(model: Any, called: set[str] | None = None) -> list[Any]:
    """The hidden-channel layer of a pre-norm transformer (``[]`` when it has none)."""
    from fitcli.discovery.hidden import HIDDEN

    return HIDDEN.find_in_model(model, called)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f"fitcli.discovery.{_PUBLIC[name]}"), _RENAMED.get(name, name))
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fitcli.discovery' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


__all__ = ["Layer", "ModelGraph", "discover", "unit_view", "weight_layers", "gated_layer", "is_hf_conv1d",
           "runtime_discover", "token_mask", "getattr_path", "head_layers", "UnitKind", "register_unit_kind",
           "unregister_unit_kind", "unit_kinds", "kind_of_point", "find_blocks", "block_candidates",
           "hidden_layers", "HiddenKind", "HiddenLayer"]
