"""Is an operation channel-wise? Recognised by what it does, not by a list of classes.

An operation keeps unit i in unit i when its output has its input's shape and changing one input
element changes at most the output element at the same place: BatchNorm in eval mode, bias adds,
per-channel or scalar scaling, dropout in eval mode, identity, casts, and every elementwise
nonlinearity (ReLU, GELU, Hugging Face's ``GELUActivation``, timm's and user-written ones...).
A small probe decides: a few single-element perturbations of a random input. This module imports
nothing of fitcli's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

PERTURBATIONS = 5


def probe_shape(units: int, spatial: int, unit_dim: int) -> tuple[int, ...]:
    """A small input shaped like a layer's output: [2, units] (features last), or
    [2, units, 7, ...] with ``spatial`` dimensions for convolutions."""
    if unit_dim == -1 or spatial == 0:
        return (2, units)
    side = 7 if units != 7 else 5
    return (2, units, *([side] * spatial))


def is_channelwise(fn: Callable[[torch.Tensor], object], probe: torch.Tensor, seed: int = 0) -> bool:
    """Does ``fn`` keep every element of ``probe`` in place (same shape out; a change of one input
    element changes no other output element)? Any exception means no. ``fn`` gets fresh copies,
    so in-place operations are probed safely."""
    try:
        with torch.no_grad():
            base = fn(probe.clone())
            if not isinstance(base, torch.Tensor) or base.shape != probe.shape:
                return False
            g = torch.Generator().manual_seed(seed)
            flat = probe.reshape(-1)
            for k in range(min(PERTURBATIONS, flat.numel())):
                i = int(torch.randint(0, flat.numel(), (1,), generator=g))
                x = flat.clone()
                x[i] = x[i] + (1.5 + k) * (1 if k % 2 == 0 else -1)
                out = fn(x.reshape(probe.shape))
                if not isinstance(out, torch.Tensor) or out.shape != probe.shape:
                    return False
                changed = (out != base) & ~(torch.isnan(out) & torch.isnan(base))
                changed = changed.reshape(-1)
                changed[i] = False
                if bool(changed.any()):
                    return False
    except Exception:
        return False
    return True


__all__ = ["is_channelwise", "probe_shape"]
