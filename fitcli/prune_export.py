"""Where a pruned model goes: ``OUT.pt2`` (a ``torch.export`` program whose outputs are plain
tensors, tuples and dicts, so it loads with ``torch.export.load`` alone) and ``OUT.safetensors``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fitcli.data import Batch
from fitcli.errors import InputError
from fitcli.report import check_output


def output_paths(out: str | Path) -> tuple[Path, Path]:
    """``OUT`` (or ``OUT.pt2`` / ``OUT.safetensors``) -> (``OUT.pt2``, ``OUT.safetensors``)."""
    stem = Path(out)
    if stem.suffix in (".pt2", ".safetensors"):
        stem = stem.with_suffix("")
    return Path(f"{stem}.pt2"), Path(f"{stem}.safetensors")


def check_outputs(out: str | Path, protect: list[str | Path]) -> tuple[Path, Path]:
    """The two output paths, checked: not an input file, not a folder, in a folder that exists."""
    paths = output_paths(out)
    for p in paths:
        check_output(p, protect)
    return paths


def export_program(module: nn.Module, example: Batch | None):
    """``torch.export`` of ``module`` on ``example``: the batch dimension dynamic when that
    exports, else fixed at the example's size."""
    if example is None:
        raise InputError("exporting the pruned model needs an example batch")
    module = plain_outputs(module.eval())
    args, kwargs = tuple(example.args), dict(example.kwargs)
    try:
        return torch.export.export(module, args, kwargs or None,
                                   dynamic_shapes=_dynamic(module, args, kwargs, torch.export.Dim("batch", min=1)))
    except Exception:
        pass
    try:
        return torch.export.export(module, args, kwargs or None)
    except Exception as e:
        raise InputError(f"the pruned model does not export with torch.export ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e


def plain(out: Any) -> Any:
    """``out`` with every mapping (a Hugging Face ``ModelOutput`` included) turned into a plain
    dict and every sequence into a tuple, ``None`` entries of mappings dropped: containers that
    ``torch.export.load`` rebuilds without the library that defined them."""
    if isinstance(out, torch.Tensor) or out is None:
        return out
    if isinstance(out, dict) or (hasattr(out, "keys") and hasattr(out, "__getitem__")):
        return {str(k): plain(out[k]) for k in out.keys() if out[k] is not None}
    if isinstance(out, (tuple, list)):
        return tuple(plain(v) for v in out)
    return out


def plain_outputs(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` (the same parameters and submodules, so the same state-dict
    names) whose forward returns ``plain(...)`` of the original forward's output."""
    import functools

    cls = type(module)

    @functools.wraps(cls.forward)
    def forward(self, *args, **kwargs):
        return plain(cls.forward(self, *args, **kwargs))

    flat = copy.copy(module)
    flat.__class__ = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    return flat


def _dynamic(module: nn.Module, args: tuple, kwargs: dict, dyn: Any) -> Any:
    """A dynamic first dimension for every tensor input, keyed by the forward's parameter names."""
    import inspect

    def spec(v: Any) -> Any:
        return {0: dyn} if isinstance(v, torch.Tensor) and v.dim() > 0 else None

    if not kwargs:
        return tuple(spec(a) for a in args)
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    return {k: spec(v) for k, v in bound.arguments.items()}
