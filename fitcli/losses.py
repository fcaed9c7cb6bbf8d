"""Per-sample losses. Every metric that needs a gradient uses the loss of each sample on its own,
so no value depends on the batch size (``spec/metrics.md``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from fitcli.errors import InputError, UsageError

LossFn = Callable[[Any, torch.Tensor | None], torch.Tensor]


def primary_output(outputs: Any) -> torch.Tensor:
    """The tensor a loss is computed on: the output itself, ``logits``, or the first tensor."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict) or hasattr(outputs, "keys"):
        for key in ("logits", "last_hidden_state"):
            if key in outputs:
                return outputs[key]
        for v in outputs.values():
            if isinstance(v, torch.Tensor):
                return v
    if isinstance(outputs, (tuple, list)):
        for v in outputs:
            if isinstance(v, torch.Tensor):
                return v
    raise InputError(f"the model returned {type(outputs).__name__}, which holds no tensor to compute a loss on")


def _per_sample(loss: torch.Tensor, batch: int) -> torch.Tensor:
    return loss.reshape(batch, -1).mean(dim=1) if loss.dim() > 1 else loss


def cross_entropy(outputs: Any, targets: torch.Tensor | None) -> torch.Tensor:
    if targets is None:
        raise InputError("cross_entropy needs targets")
    out = primary_output(outputs)
    t = targets.to(out.device).long()
    if out.dim() == 1:
        out = out.unsqueeze(0)
    if out.dim() > 2 and t.dim() == out.dim() - 1 and out.shape[-1] != t.shape[-1]:
        # [batch, ..., classes] layout (e.g. sequences): classes last
        out = out.movedim(-1, 1)
    if t.dim() == out.dim() - 1 and t.shape[0] == out.shape[0]:
        if t.numel() and (t.min() < 0 or t.max() >= out.shape[1]):
            raise InputError(
                f"targets hold class ids in [{int(t.min())}, {int(t.max())}] but the model gives "
                f"{out.shape[1]} classes"
            )
        return _per_sample(F.cross_entropy(out.float(), t, reduction="none"), out.shape[0])
    raise InputError(
        f"targets of shape {tuple(targets.shape)} do not fit model outputs of shape {tuple(out.shape)} "
        "for cross_entropy"
    )


def mse(outputs: Any, targets: torch.Tensor | None) -> torch.Tensor:
    if targets is None:
        raise InputError("mse needs targets")
    out = primary_output(outputs)
    t = targets.to(out.device, out.dtype if out.is_floating_point() else torch.float32)
    if t.shape != out.shape:
        if t.numel() != out.numel():
            raise InputError(f"targets of shape {tuple(targets.shape)} do not fit model outputs of shape {tuple(out.shape)}")
        t = t.reshape(out.shape)
    return _per_sample(F.mse_loss(out.float(), t.float(), reduction="none"), out.shape[0])


BUILTIN: dict[str, LossFn] = {"cross_entropy": cross_entropy, "mse": mse}


def resolve_loss(spec: str | None, example_targets: torch.Tensor | None) -> tuple[LossFn | None, str | None, str | None]:
    """-> (loss function, its name, reason it is unavailable)."""
    if spec is None:
        if example_targets is None:
            return None, None, "no targets in --data (pass --loss with a loss that needs none)"
        if example_targets.is_floating_point():
            return mse, "mse", None
        return cross_entropy, "cross_entropy", None
    if spec in BUILTIN:
        if example_targets is None:
            return None, spec, f"--loss {spec} needs targets, and --data has none"
        return BUILTIN[spec], spec, None
    if ":" not in spec:
        from fitcli.errors import close_matches

        raise UsageError(f"unknown --loss {spec!r}" + close_matches(spec, BUILTIN) +
                         "; use cross_entropy, mse, or module:callable")
    from fitcli.loading import resolve_callable

    fn = resolve_callable(spec, "--loss")

    def user_loss(outputs: Any, targets: torch.Tensor | None) -> torch.Tensor:
        try:
            loss = fn(outputs, targets)
        except (Exception, SystemExit) as e:
            raise InputError(f"--loss {spec} raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from e
        if not isinstance(loss, torch.Tensor):
            raise InputError(f"--loss {spec} returned {type(loss).__name__}, not a tensor")
        n = primary_output(outputs).shape[0]
        if loss.dim() != 1 or loss.shape[0] != n:
            raise InputError(f"--loss {spec} returned shape {tuple(loss.shape)}; it must return one loss per sample ({n},)")
        return loss

    return user_loss, spec, None
