"""Residual blocks: which whole modules can be replaced by the identity.

A block is a module whose output has its input's shape and whose input is added back to its
output (``x + f(x)``, ``out += identity``: ResNet blocks, transformer layers), wherever it sits (an
item of a list, a plain attribute); an item of an ``nn.ModuleList`` or ``nn.Sequential`` made of
modules that keeps its input's shape is one too (the stacks blocks live in). Outermost only: a
block inside a block belongs to it. One example forward decides (``find_blocks``);
``candidates`` are the stack items, known without a forward (offloading groups by them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from fitcli.errors import guarded

ADD_NAMES = {"add", "add_", "__add__", "__radd__", "__iadd__"}


def first_tensor(x: Any) -> torch.Tensor | None:
    """A module's main output: the tensor, or the first item of a tuple or list."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    return None


def input_of(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A module's main input: its first positional tensor, or ``hidden_states=`` (Hugging Face)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return kwargs.get("hidden_states") if isinstance(kwargs.get("hidden_states"), torch.Tensor) else None


def candidates(model: nn.Module) -> list[str]:
    """Items of every ModuleList / Sequential (the stacks blocks live in) that are themselves
    made of modules (a lone BatchNorm or activation in a Sequential is not a block)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)):
            out.extend(f"{name}.{k}" if name else k for k, c in m.named_children() if any(True for _ in c.children()))
    return out


def outermost(names: list[str]) -> list[str]:
    """Drop every name inside another one of ``names``."""
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


@contextlib.contextmanager
def hooks(modules: dict[str, nn.Module], pre: dict[str, Any], post: dict[str, Any]) -> Iterator[None]:
    """Forward pre- and post-hooks (with keyword arguments) on named modules, always removed."""
    handles = []
    try:
        for n, fn in pre.items():
            handles.append(modules[n].register_forward_pre_hook(fn, with_kwargs=True))
        for n, fn in post.items():
            handles.append(modules[n].register_forward_hook(fn, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


class _Adds(TorchFunctionMode):
    """During one forward: the modules (innermost first) whose own input took part in an addition
    while they ran: the input added back to what the module computed."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[tuple[str, int]] = []  # running modules: (name, id of its input)
        self.residual: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in ADD_NAMES and self.open:
            ids = {id(a) for a in args if isinstance(a, torch.Tensor)}
            hit = next((n for n, i in reversed(self.open) if i in ids), None)
            if hit is not None:
                self.residual.add(hit)
        return out


def find_blocks(model: nn.Module, example: Any) -> list[str]:
    """The outermost blocks of ``model`` on one example batch (a ``Batch``): modules that ran with
    an output of their input's shape and either add their input back or are stack items."""
    modules = dict(model.named_modules())
    stack_items = set(candidates(model))
    names = [n for n, m in modules.items() if n and (n in stack_items or not isinstance(m, (nn.ModuleList, nn.Sequential)))]
    same: dict[str, bool] = {}
    inputs: dict[str, tuple | None] = {}
    adds = _Adds()

    def pre(n):
        def fn(m, args, kwargs):
            x = input_of(args, kwargs)
            same.setdefault(n, False)
            inputs[n] = tuple(x.shape) if x is not None else None
            adds.open.append((n, id(x) if x is not None else -1))
        return fn

    def post(n):
        def fn(m, args, kwargs, out):
            y = first_tensor(out)
            same[n] = same[n] or (y is not None and inputs.pop(n, None) == tuple(y.shape))
            if adds.open and adds.open[-1][0] == n:
                adds.open.pop()
        return fn

    with torch.no_grad(), hooks(modules, {n: pre(n) for n in names}, {n: post(n) for n in names}), adds:
        guarded(example, None, 0, lambda: model(*example.args, **example.kwargs))
    found = [n for n in names if same.get(n) and (n in stack_items or n in adds.residual)]
    return outermost(found)
