"""The entry point: ``discover`` picks the walker (torch.fx, a torch.export program, the run-time
walker, or the weights alone) and says which in ``ModelGraph.method``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fitcli.discovery import kinds
from fitcli.discovery.fx import ProbeTap, Shapes, Tracer, instrument
from fitcli.discovery.graph import unsupported
from fitcli.discovery.hidden import traced_layers
from fitcli.discovery.model import Layer, ModelGraph, covered
from fitcli.discovery.runtime import runtime_discover
from fitcli.errors import InputError, first_line


def weight_layers(state_dict: dict[str, torch.Tensor]) -> ModelGraph:
    """Layers of a bare state dict: every ``*.weight`` of 2 (Linear) or 3-5 (ConvNd) dims."""
    layers = []
    for key, w in state_dict.items():
        if not key.endswith("weight") or w.dim() < 2 or w.dim() > 5:
            continue
        name = key[: -len(".weight")] if key.endswith(".weight") else key
        layers.append(kinds.CHANNELS.from_weight(name, key, w, state_dict.get(name + ".bias"), "n/a", "unknown"))
    # sorted key names say nothing about which layer is the output: none is guessed
    return ModelGraph(layers, "weights", notes=["layers read from the state dict alone (no architecture given): "
                                                "the output layer is unknown, so every layer is counted"])


def _shape_prop(gm: torch.fx.GraphModule, example: Any) -> None:
    """Shapes of every node from one example batch (probes then look like the real activations).
    This is a forward of the model: its failure is the data not fitting the model."""
    if example is None or example.kwargs:
        return
    if example.size > 2:  # two samples give every shape the probes need (they take two): a fraction of a forward
        try:
            with torch.no_grad():
                Shapes(gm).run(*example.select(torch.arange(2)).args)
            return
        except Exception:  # a model that needs its batch size (a fixed view): the whole batch, below
            pass
    try:
        with torch.no_grad():
            Shapes(gm).run(*example.args)
    except Exception as e:
        raise InputError(f"data batch of shape {example.describe()} does not fit the model "
                         f"({type(e).__name__}: {first_line(e)})") from e


def _module_layers(model: nn.Module) -> list[Layer]:
    """The layers of the modules themselves, in definition order (no forward seen)."""
    return [lay for n, m in model.named_modules() if n for lay in kinds.layers_of(n, m)]


def _traced(model: nn.Module, example: Any) -> tuple[ModelGraph | None, str | None]:
    try:
        gm = torch.fx.GraphModule(model, Tracer().trace(model))
    except Exception as e:  # any tracing failure: fall back to runtime discovery
        return None, f"{type(e).__name__}: {first_line(e, 160)}"
    _shape_prop(gm, example)
    layers, probes = instrument(gm, exported=False, model=model)
    reason = ("never called as a module in the traced graph (e.g. used by nn.MultiheadAttention through "
              "functional calls), so it cannot be hooked")
    missed = unsupported(model, covered(layers), reason)
    layers += traced_layers(gm, model)  # opt-in hidden channels: never the output layer
    return ModelGraph(layers, "fx", runner=gm, unsupported=missed, point_tap=probes), None


def discover(model: nn.Module | None, state_dict: dict[str, torch.Tensor] | None = None,
             example: Any = None, exported: bool = False) -> ModelGraph:
    """Find layers and activation points. ``example`` (a Batch) is needed only when fx fails."""
    if model is None:
        return weight_layers(state_dict or {})
    if exported and isinstance(model, torch.fx.GraphModule):
        layers, probes = instrument(model, exported=True)
        return ModelGraph(layers, "export", runner=model, point_tap=probes)
    g, trace_error = _traced(model, example)
    if g is not None:
        return g
    if example is None:  # the layers from the modules themselves; where each unit is read needs a forward
        layers = [lay for lay in _module_layers(model) if lay.kind.chained or lay.weight_only]
        for lay in layers:
            if lay.kind.chained:
                lay.point, lay.point_kind = "unknown (needs data: the model does not trace with torch.fx)", "unknown"
        g = ModelGraph(layers, "runtime", runner=model)
        g.notes = [f"torch.fx could not trace the model ({trace_error}); give data to find activation points"]
        return g
    g = runtime_discover(model, example)
    if getattr(getattr(model, "config", None), "model_type", None) is not None:  # the usual case, said plainly
        g.notes.append("activation points found at run time (torch.fx does not trace this Hugging Face model)")
    else:
        g.notes.append(f"torch.fx could not trace the model ({trace_error}); activation points found at run time")
    return g


__all__ = ["ProbeTap", "discover", "weight_layers"]
