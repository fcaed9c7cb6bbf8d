"""Half precision: the model computes in its own dtype, every statistic accumulates in
float32/float64, and losses are taken on float32 copies of the outputs. ``cast_model`` gives the
audit a model in the dtype asked for without touching the caller's."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from fitcli.data import Batch
from fitcli.errors import UsageError
from fitcli.feeder import widen
from fitcli.losses import LossFn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dtype(module: Any) -> torch.dtype | None:
    """The floating dtype of a model's first floating parameter (or buffer); None without one."""
    if module is None or not hasattr(module, "parameters"):
        return None
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _widen_outputs(outputs: Any) -> Any:
    if isinstance(outputs, torch.Tensor):
        return widen(outputs)
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(_widen_outputs(v) for v in outputs)
    if isinstance(outputs, dict) or hasattr(outputs, "keys"):
        return {k: _widen_outputs(outputs[k]) for k in outputs.keys()}
    return outputs


class Float32Loss:
    """A loss on a half-precision model's outputs, computed on their float32 copies: the
    per-sample losses (and the exact-ablation loss changes, differences of nearby losses) are
    not rounded to 8 or 11 bits. The gradient still flows into the model in its own dtype."""

    def __init__(self, fn: LossFn):
        self.fn = fn

    def __call__(self, outputs: Any, batch: Batch) -> torch.Tensor:
        return self.fn(_widen_outputs(outputs), batch)

    def change(self, outputs: Any, reference: Any, batch: Batch) -> torch.Tensor:
        return self.fn.change(_widen_outputs(outputs), _widen_outputs(reference), batch)

    def __getattr__(self, name: str) -> Any:
        if name == "fn":
            raise AttributeError(name)
        return getattr(self.fn, name)


def cast_model(loaded: Any, dtype: str | torch.dtype | None) -> Any:
    """``loaded`` with its floating weights in ``dtype`` for the audit. A live module the caller
    gave is copied first (the caller's model is never changed); a model loaded from a file is
    ours and is cast in place."""
    if dtype is None:
        return loaded
    target = DTYPES[dtype] if isinstance(dtype, str) else dtype
    module = loaded.module
    if module is None:
        sd = {k: v.to(target) if v.is_floating_point() else v for k, v in loaded.state_dict.items()}
        return dataclasses.replace(loaded, state_dict=sd)
    if model_dtype(module) == target:
        return loaded
    if loaded.format == "module":
        try:
            module = copy.deepcopy(module)
        except Exception as e:
            raise UsageError(f"dtype {dtype_name(target)}: the model cannot be copied to cast it "
                             f"({type(e).__name__}); give a model already in that dtype") from e
    module = module.to(target)
    return dataclasses.replace(loaded, module=module, state_dict=dict(module.state_dict()))
