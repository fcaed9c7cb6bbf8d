"""Which modules own units, and the Hugging Face specifics: ``transformers``' ``Conv1D`` (GPT-2's
layers, a Linear stored in x out), the attributes attention modules give their head width and
count under, the names of their output projections, and eager attention (the only mode that
returns the attention probabilities)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fitcli import recurrent

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, *CONV_TYPES, nn.Bilinear)
PROJ_NAMES = ("o_proj", "out_proj", "c_proj", "proj", "dense", "output.dense", "out")
HEAD_DIM_NAMES = ("head_dim", "attention_head_size")
HEAD_COUNT_NAMES = ("num_heads", "num_attention_heads", "n_head", "n_heads")


def is_hf_conv1d(mod: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D (GPT-2's layers): a Linear whose weight is in x out."""
    t = type(mod)
    return t.__name__ == "Conv1D" and t.__module__.startswith("transformers") and \
        isinstance(getattr(mod, "weight", None), torch.Tensor) and mod.weight.dim() == 2


def is_layer_module(mod: nn.Module) -> bool:
    """A module whose output features (or channels) are units."""
    return isinstance(mod, LAYER_TYPES) or is_hf_conv1d(mod)


def is_embedding(mod: Any) -> bool:
    return isinstance(mod, nn.Embedding)


def is_recurrent(mod: Any) -> bool:
    return isinstance(mod, recurrent.RECURRENT_TYPES) and recurrent.supported(mod) is None


def is_mha(mod: Any) -> bool:
    return isinstance(mod, nn.MultiheadAttention)


def int_attr(m: Any, names: tuple[str, ...]) -> int | None:
    for n in names:
        v = getattr(m, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def in_features(mod: nn.Module) -> int | None:
    if is_hf_conv1d(mod):
        return int(mod.weight.shape[0])
    return int(mod.weight.shape[1]) if isinstance(mod, nn.Linear) else None


def eager(m: nn.Module) -> bool:
    """A Hugging Face attention module that returns its attention probabilities (eager mode)."""
    return getattr(getattr(m, "config", None), "_attn_implementation", None) == "eager"


def spatial(type_name: str) -> int:
    """Spatial dimensions of a layer type's output (2 for Conv2d)."""
    return int(type_name[4]) if type_name in ("Conv1d", "Conv2d", "Conv3d") else 0
