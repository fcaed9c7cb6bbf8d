"""Per-sample losses. Every metric that needs a gradient uses the loss of each sample on its own,
so no value depends on the batch size.

A loss here is a callable ``(outputs, batch) -> [batch]`` per-sample losses, ``batch`` a
``fitcli.data.Batch`` (its ``targets``, ``args``, ``kwargs``). ``resolve_loss`` turns what a
caller holds into one: a name (``cross_entropy``, ``mse``), a ``torch.nn`` loss module (used with
``reduction="none"`` on a copy), a callable, or None (chosen from the targets).

A caller's callable is called in one of two forms, chosen once from its signature:

- ``(output, target)``, PyTorch's form, when its second parameter is named ``target``,
  ``targets``, ``y``, ``y_true``, ``label`` or ``labels``: it gets the batch's targets;
- ``(output, batch)`` otherwise: ``batch`` is the batch as the caller's data yielded it. It reads
  like that item (``batch[1]`` of an ``(x, y)`` pair, ``batch["labels"]`` of a dict,
  ``x, y = batch``) and is a ``fitcli.Batch`` too (``batch.targets``, ``batch.kwargs``).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fitcli.data import Batch
from fitcli.errors import InputError, UsageError, close_matches, first_line

LossFn = Callable[[Any, Batch], torch.Tensor]


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


def _per_sample(loss: torch.Tensor, batch: int, real: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's mean loss; with ``real`` ([batch, ...] bool, same shape as ``loss``) over the
    real positions only (padding and ignored targets are not part of it)."""
    if loss.dim() <= 1:
        return loss
    if real is None:
        return loss.reshape(batch, -1).mean(dim=1)
    r = real.reshape(batch, -1).to(loss.dtype)
    return (loss.reshape(batch, -1) * r).sum(dim=1) / r.sum(dim=1).clamp_min(1)


def _token_real(batch: Batch, shape: torch.Size, device) -> torch.Tensor | None:
    """For per-token losses ([batch, tokens, ...]): which positions are real tokens."""
    m = batch.mask
    if m is None or len(shape) < 2 or tuple(shape[:2]) != tuple(m.shape):
        return None
    return m.to(device).reshape(*m.shape, *([1] * (len(shape) - 2))).expand(shape)


def cross_entropy(outputs: Any, batch: Batch) -> torch.Tensor:
    targets = batch.targets
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
        valid = t != -100  # Hugging Face's "ignore" label
        if t.numel() and bool(valid.any()) and (t[valid].min() < 0 or t[valid].max() >= out.shape[1]):
            raise InputError(
                f"targets hold class ids in [{int(t[valid].min())}, {int(t[valid].max())}] but the model gives "
                f"{out.shape[1]} classes"
            )
        loss = F.cross_entropy(out.float(), t, reduction="none", ignore_index=-100)
        real = valid
        tok = _token_real(batch, t.shape, t.device)
        if tok is not None:
            real = real & tok
        return _per_sample(loss, out.shape[0], real if loss.dim() > 1 else None)
    raise InputError(
        f"targets of shape {tuple(targets.shape)} do not fit model outputs of shape {tuple(out.shape)} "
        "for cross_entropy"
    )


def mse(outputs: Any, batch: Batch) -> torch.Tensor:
    targets = batch.targets
    if targets is None:
        raise InputError("mse needs targets")
    out = primary_output(outputs)
    t = targets.to(out.device, out.dtype if out.is_floating_point() else torch.float32)
    if t.shape != out.shape:
        if t.numel() != out.numel():
            raise InputError(f"targets of shape {tuple(targets.shape)} do not fit model outputs of shape {tuple(out.shape)}")
        t = t.reshape(out.shape)
    loss = F.mse_loss(out.float(), t.float(), reduction="none")
    return _per_sample(loss, out.shape[0], _token_real(batch, loss.shape, loss.device))


def lm(outputs: Any, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy of a causal language model, per sample: the mean over the sample's
    real target tokens. Targets are ``labels`` (Hugging Face convention: aligned with the inputs,
    -100 ignored) or else ``input_ids``, shifted by one here; padding is never a target."""
    logits = primary_output(outputs)
    labels = batch.targets if batch.targets is not None and batch.targets.dim() == 2 else batch.kwargs.get("input_ids")
    if not isinstance(labels, torch.Tensor) or logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise InputError(f"the lm loss needs logits [batch, tokens, vocab] and token ids [batch, tokens]; got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape) if isinstance(labels, torch.Tensor) else None}")
    # the targets shifted left (the last position has none), not the logits: no copy of the
    # per-position logits beyond the cross-entropy's own (a float32 model's are used as they are)
    target = torch.full(labels.shape, -100, dtype=torch.long, device=logits.device)
    target[:, :-1] = labels[:, 1:]
    if batch.mask is not None:
        target[:, :-1][~batch.mask[:, 1:].to(logits.device)] = -100
    b, t, v = logits.shape
    ce = F.cross_entropy(logits.float().reshape(-1, v), target.reshape(-1), ignore_index=-100, reduction="none").reshape(b, t)
    real = (target != -100).to(ce.dtype)
    return (ce * real).sum(dim=1) / real.sum(dim=1).clamp_min(1)


class OutputChange:
    """For models with no target (sentence-embedding models): the loss of an ablated forward is how
    far its output moved from the unablated output, 1 − cosine for an embedding per sample
    ([batch, dim]), else the mean squared change. It is 0, with a zero gradient, at the unablated
    model: it serves exact ablation only, never gradient metrics."""

    reference = True  # the ablation engine passes the unablated output

    def __init__(self) -> None:
        self.kind: str | None = None  # "1 - cosine" or "mean squared change", fixed at first use

    def change(self, outputs: Any, reference: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        out = primary_output(outputs).float()
        ref = reference.to(out.device).float()
        if self.kind is None:
            self.kind = "1 - cosine" if out.dim() == 2 else "mean squared change"
        if self.kind == "1 - cosine":
            return 1.0 - F.cosine_similarity(out, ref, dim=1)
        sq = (out - ref).square()
        return _per_sample(sq, out.shape[0], _token_real(batch, sq.shape, sq.device) if batch is not None else None)

    def __call__(self, outputs: Any, batch: Batch) -> torch.Tensor:
        return torch.zeros(primary_output(outputs).shape[0], dtype=torch.float32)


BUILTIN: dict[str, LossFn] = {"cross_entropy": cross_entropy, "mse": mse, "lm": lm}
NEEDS_NO_TARGETS = {"lm"}  # the token ids are the targets


def check_loss(loss: Any) -> None:
    """Raise UsageError for a loss that can never work (an unknown name), before any work."""
    if loss is None or callable(loss):
        return
    if isinstance(loss, str):
        if loss not in BUILTIN and loss != "output":
            raise UsageError(f"unknown loss {loss!r}" + close_matches(loss, BUILTIN)
                             + "; use cross_entropy, mse, lm, output, or a callable (output, batch) -> per-sample losses")
        return
    raise UsageError(f"loss must be a name, a callable or a torch.nn loss module, not {type(loss).__name__}")


def _module_loss(module: nn.Module) -> LossFn:
    """A torch.nn loss module, called as ``(output, targets)`` with reduction 'none' on a copy (the
    caller's module is not changed)."""
    mod = copy.copy(module)
    if hasattr(mod, "reduction"):
        mod.reduction = "none"

    def fn(outputs: Any, batch: Batch) -> torch.Tensor:
        out = primary_output(outputs)
        t = batch.targets.to(out.device) if batch.targets is not None else None
        loss = mod(out, t)
        return _per_sample(loss, out.shape[0]) if loss.dim() >= 1 else loss
    return fn


TARGET_NAMES = frozenset({"target", "targets", "y", "y_true", "label", "labels"})


def takes_target(fn: Callable[..., Any]) -> bool:
    """Is ``fn`` written in PyTorch's ``(output, target)`` form (its second parameter named
    like a target)? Otherwise it takes ``(output, batch)``."""
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):  # no signature to read (a builtin): the batch form
        return False
    return len(params) >= 2 and params[1].name in TARGET_NAMES


def _targets_of(batch: Batch, name: str) -> torch.Tensor:
    if batch.targets is None:
        raise InputError(f"loss {name} takes (output, target), and the data has no targets")
    return batch.targets


def _checked(fn: Callable[[Any, Any], Any], name: str) -> LossFn:
    """A user loss with its failures and wrong shapes turned into one-line input errors."""
    target_form = takes_target(fn)

    def user_loss(outputs: Any, batch: Batch) -> torch.Tensor:
        second = _targets_of(batch, name) if target_form else batch
        if target_form:
            second = second.to(primary_output(outputs).device)
        try:
            loss = fn(outputs, second)
        except (InputError, UsageError):
            raise
        except (Exception, SystemExit) as e:
            raise InputError(f"loss {name} raised {type(e).__name__}: {first_line(e)}") from e
        if not isinstance(loss, torch.Tensor):
            raise InputError(f"loss {name} returned {type(loss).__name__}, not a tensor")
        n = primary_output(outputs).shape[0]
        if loss.dim() != 1 or loss.shape[0] != n:
            raise InputError(f"loss {name} returned shape {tuple(loss.shape)}; it must return one loss per sample ({n},)")
        return loss
    return user_loss


def resolve_loss(loss: Any, example_targets: torch.Tensor | None, task: str | None = None
                 ) -> tuple[LossFn | None, str | None, str | None]:
    """-> (loss function, its name, reason it is unavailable). ``task``: "causal-lm" makes ``lm``
    the default."""
    check_loss(loss)
    if loss is None and task == "causal-lm":
        return lm, "lm", None
    if isinstance(loss, str) and loss in NEEDS_NO_TARGETS:
        return BUILTIN[loss], loss, None
    if loss == "output":
        return OutputChange(), "output", None
    if loss is None:
        if example_targets is None:
            return None, None, "no targets in the data (give a loss that needs none)"
        if example_targets.is_floating_point():
            return mse, "mse", None
        return cross_entropy, "cross_entropy", None
    if isinstance(loss, str):
        if example_targets is None:
            return None, loss, f"loss {loss} needs targets, and the data has none"
        return BUILTIN[loss], loss, None
    if isinstance(loss, nn.Module):
        name = type(loss).__name__
        if example_targets is None:
            return None, name, f"loss {name} needs targets, and the data has none"
        return _checked(_module_loss(loss), name), name, None
    name = getattr(loss, "fitcli_name", None) or getattr(loss, "__qualname__", None) or type(loss).__name__
    return _checked(loss, str(name)), str(name), None
