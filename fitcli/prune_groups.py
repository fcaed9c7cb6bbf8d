"""Residual-stream channels as coupled groups (``prune(..., kinds=["hidden"])``).

In a ResNet the stem and every block add their outputs into one stream, so a stream channel is
the same channel of several layers (the stem conv, each block's last conv, a downsample conv),
with their BatchNorms: Torch-Pruning's ``DependencyGraph.get_pruning_group`` on any of them
gives the whole group. Here such a group is a ``Stream``: its writers (the layers whose outputs
are added together), checked to be removable exactly (removal = the stream channel is 0 at every
consumer = every writer's unit zeroed at its activation point), scored per channel by the sum
of its writers' per-unit scores, and cut by Torch-Pruning's group pruning, so every coupled
layer loses the same channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from fitcli.errors import InputError, UsageError

KINDS = ("channels", "hidden")  # per-layer channels; residual-stream channels (coupled groups)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def torch_pruning():
    """The ``torch_pruning`` module, or InputError naming the extra."""
    try:
        import torch_pruning as tp
    except ImportError as e:
        raise InputError("pruning needs the 'prune' extra (pip install 'fitcli[prune]': torch-pruning, "
                         "for the dependency graph)") from e
    return tp


def out_fn(tp, mod: nn.Module):
    """Torch-Pruning's output-channel pruner for a Linear or an ungrouped ConvNd, else None."""
    if isinstance(mod, nn.Linear):
        return tp.prune_linear_out_channels
    if isinstance(mod, _CONVS) and mod.groups == 1:
        return tp.prune_conv_out_channels
    return None


def check_kinds(kinds: Any) -> tuple[str, ...]:
    """``kinds`` (a comma-separated string or a list) -> a tuple of known kinds."""
    if kinds is None:
        return ("channels",)
    items = [k.strip() for k in kinds.split(",")] if isinstance(kinds, str) else list(kinds)
    out = tuple(dict.fromkeys(k for k in items if k))
    for k in out:
        if k not in KINDS:
            raise UsageError(f"unknown kind {k!r} in {{kinds}}: use channels (each layer's own units) and/or "
                             "hidden (residual-stream channels)", setting="kinds")
    if not out:
        raise UsageError("{kinds} is empty: use channels and/or hidden", setting="kinds")
    return out


@dataclass
class Stream:
    """One residual stream: ``writers`` (layers whose outputs are summed into it, in model order),
    ``width`` channels, and why it cannot lose channels (``reason``, None when it can)."""

    writers: list[str]
    width: int
    reason: str | None = None

    @property
    def label(self) -> str:
        return "+".join(self.writers)


def _members(dg, tp, mod, names: dict[nn.Module, str]) -> tuple[list[str], list[tuple[str, nn.Module]]]:
    """(the layers writing the group's channel, every named module the group cuts)."""
    group = dg.get_pruning_group(mod, out_fn(tp, mod), idxs=[0])
    writers, touched = [], []
    for dep, _ in group:
        target = dep.target.module
        name = names.get(target)
        handler = getattr(dep.handler, "__name__", str(dep.handler))
        if name is None:
            if not type(target).__module__.startswith("torch_pruning"):
                touched.append((f"a {type(target).__name__}", target))  # e.g. an unwrapped nn.Parameter
            continue
        touched.append((name, target))
        if "out_channels" in handler and isinstance(target, (nn.Linear, *_CONVS)):
            writers.append(name)
    return list(dict.fromkeys(writers)), touched


def _stream_reason(writers: list[str], touched, lays: dict[str, Any], candidates: set[str]) -> str | None:
    """Why a stream cannot lose a channel exactly (removal equal to zeroing every writer), or None."""
    chains = {m for w in writers if w in lays for m in (lays[w].chain_modules or [])}
    for w in writers:
        if w in lays and lays[w].final:
            return f"the final layer {w} writes to it: its channels are the model's outputs"
        if w not in candidates:
            return f"{w} writes to it and is not a layer whose units fitcli can zero"
    for name, mod in touched:
        if isinstance(mod, (nn.Linear, *_CONVS)) and getattr(mod, "groups", 1) == 1:
            continue
        if isinstance(mod, NORMS) and name in chains:
            continue
        what = f"{type(mod).__name__} {name}" if isinstance(mod, nn.Module) and not name.startswith("a ") else name
        return (f"the stream passes through {what}: there a removed channel is not the same as a zeroed one "
                "(supported: Linear, ungrouped ConvNd, and the BatchNorm right after a writer)")
    return None


def find_streams(dg, module: nn.Module, graph, candidates: list[str]) -> list[Stream]:
    """Every residual stream of ``module``: the coupled groups of several writers."""
    tp = torch_pruning()
    mods = dict(module.named_modules())
    names = {m: n for n, m in mods.items()}
    lays = {lay.name: lay for lay in graph.layers}
    order = {lay.name: i for i, lay in enumerate(graph.layers)}
    seen: set[frozenset[str]] = set()
    out: list[Stream] = []
    for lay in graph.layers:
        mod = mods.get(lay.name)
        if mod is None or out_fn(tp, mod) is None or lay.final:
            continue
        try:
            writers, touched = _members(dg, tp, mod, names)
        except Exception:  # noqa: BLE001 - a layer the graph does not hold is simply no stream writer
            continue
        if len(writers) < 2 or frozenset(writers) in seen:
            continue
        seen.add(frozenset(writers))
        writers.sort(key=lambda w: order.get(w, len(order)))
        width = int(mod.weight.shape[0])
        out.append(Stream(writers, width, _stream_reason(writers, touched, lays, set(candidates))))
    return out


def writer_streams(streams: list[Stream]) -> dict[str, Stream]:
    return {w: s for s in streams for w in s.writers}


def channel_scores(stream: Stream, rows: list[dict]) -> dict[int, float]:
    """Per channel: the sum over the stream's writers of their units' ranked scores (the
    per-layer ℓ2-normalised fitness of ``AuditReport.ranked``); a channel some writer has no
    finite score for is left out."""
    by = {(r["layer"], int(r["unit"])): float(r["normalized"]) for r in rows}
    out: dict[int, float] = {}
    for c in range(stream.width):
        vals = [by.get((w, c)) for w in stream.writers]
        if all(v is not None and math.isfinite(v) for v in vals):
            out[c] = sum(vals)  # type: ignore[arg-type]
    return out


def budget_channels(stream: Stream, budget: float, rows: list[dict]) -> list[int]:
    """The ``budget`` % least-fit channels of the stream (floor), by their summed scores."""
    k = int(math.floor(budget / 100.0 * stream.width + 1e-9))
    scores = channel_scores(stream, rows)
    return sorted(sorted(scores, key=lambda c: (scores[c], c))[:k])


def dead_channels(stream: Stream, ranges) -> list[int]:
    """Channels that are exactly 0 on all the data at every writer (so the stream channel is 0)."""
    return [c for c in range(stream.width)
            if all(w in ranges and float(ranges[w][0][c]) == 0.0 == float(ranges[w][1][c]) for w in stream.writers)]


def choose_streams(how: Any, budget: float | None, streams: list[Stream], ranges, rows: list[dict] | None
                   ) -> tuple[dict[str, list[int]], list[dict[str, Any]]]:
    """-> ({stream label: channels}, refusals). Named units of a writer are its stream's channels."""
    picked: dict[str, list[int]] = {}
    refused: list[dict[str, Any]] = []
    by_writer = writer_streams(streams)
    for s in streams:
        if isinstance(how, dict):
            chans = sorted({u for w, us in how.items() if by_writer.get(w) is s for u in us})
        elif budget is not None:
            chans = budget_channels(s, budget, rows or [])
        else:
            chans = dead_channels(s, ranges)
        if not chans:
            continue
        reason = s.reason
        if reason is None and len(chans) >= s.width:
            reason = "it would remove every channel of the residual stream"
        if reason is not None:
            refused.append({"layer": s.label, "units": chans, "reason": reason})
        else:
            picked[s.label] = chans
    return picked, refused


def check_streams(streams: list[Stream], kinds: tuple[str, ...], budget: float | None,
                  picked: dict[str, list[int]], refused: list[dict[str, Any]]) -> None:
    """With ``hidden`` the only kind: a model without a removable stream, or a budget that takes
    no channel (below one channel of every stream, or all of them), is refused rather than
    giving an unchanged model."""
    if kinds != ("hidden",):
        return
    if not streams:
        raise InputError("the model has no residual stream (no channel shared by several layers through a sum), "
                         "so {kinds} hidden finds nothing to remove; use channels", setting="kinds")
    ok = [s for s in streams if s.reason is None]
    if not ok:
        raise InputError(f"no residual stream of this model can lose channels: {streams[0].label}: "
                         f"{streams[0].reason}", setting="kinds")
    if budget is not None and budget > 0 and not picked and refused:
        raise UsageError(f"{{budget}} {budget:g} cannot be met: {refused[0]['layer']}: {refused[0]['reason']}",
                         setting="budget")
    if budget is not None and budget > 0 and not picked:
        widths = ", ".join(str(s.width) for s in ok)
        raise UsageError(f"{{budget}} {budget:g} is less than one channel of every residual stream (widths "
                         f"{widths}): nothing would be removed", setting="budget")


def stream_units(streams: list[Stream], picked: dict[str, list[int]]) -> dict[str, list[int]]:
    """{writer: channels}: the units zeroed at each writer when the picked channels go."""
    out: dict[str, list[int]] = {}
    for s in streams:
        for w in s.writers if s.label in picked else ():
            out[w] = sorted(set(out.get(w, [])) | set(picked[s.label]))
    return out


def cut_streams(dg, module: nn.Module, streams: list[Stream], picked: dict[str, list[int]]) -> None:
    """Torch-Pruning's group pruning, once per stream: every coupled layer loses the channels."""
    tp = torch_pruning()
    mods = dict(module.named_modules())
    for s in streams:
        if s.label in picked:
            mod = mods[s.writers[0]]
            dg.get_pruning_group(mod, out_fn(tp, mod), idxs=list(picked[s.label])).prune()


__all__ = ["KINDS", "NORMS", "Stream", "budget_channels", "channel_scores", "check_kinds", "check_streams",
           "choose_streams", "cut_streams", "dead_channels", "find_streams", "out_fn", "stream_units",
           "torch_pruning", "writer_streams"]
