"""Choosing what goes from a Hugging Face transformer: per-unit scores from one calibration pass
(the consumers' float64 Gram sums, each block's input/output similarity, the residual stream's
energy per channel), and a parameter budget split into uniform counts per kind.

Every score here is "higher = keep". The MLP channels and query heads scores (``RANKERS``):

- ``flap`` (the default: the best ranking with ridge compensation on ``bench/prune_llm.py``):
  FLAP's weighted fluctuation, Var(x_u) · ‖W_:,u‖²;
- ``output_error``: the consumer's output error E‖W_u (x_u − x̂_u)‖² when the unit
  alone is removed and compensated as asked — ridge: x̂_u is its least-squares prediction from
  the layer's other units (the conditional covariance, from the inverse of the covariance);
  mean: x̂_u is its mean (this is FLAP's fluctuation); none: x̂_u = 0 (the second moment);
- ``wanda``: Wanda-sp, Σ |W_iu| · ‖x_u‖ (root mean square over the calibration tokens);
- ``magnitude``: the ℓ2 norm of every weight of the unit (producer rows and consumer columns);
- ``redundancy``: 1 − R² of the unit regressed on the others (R² = 1: rebuilt exactly);
- ``random``: seeded uniform scores.

Blocks are ranked by their influence, 1 − cos(input, output) averaged over real tokens (ShortGPT's
block influence), hidden channels by their mean square in the residual stream summed over the
blocks' inputs; with ``random`` both are random too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from fitcli.compensate import SplitGram, columns_of, r2_from_moments
from fitcli.errors import UsageError
from fitcli.surgery.arch import Family, find_family
from fitcli.surgery.calib import collect_stats
from fitcli.surgery.hf import Plan

RANKERS = ("output_error", "wanda", "flap", "magnitude", "redundancy", "random")
DEFAULT_RANK = "flap"  # best on bench/prune_llm.py with ridge compensation (bench/README.md)
RIDGE = 1e-4  # relative ridge on the covariance before inverting it (dead, duplicate units; few tokens)


@dataclass
class Calibration:
    """What one pass over the calibration data gives: the consumers' sums, per block the mean
    1 − cos(input, output), and the residual stream's Σh² per channel summed over block inputs."""

    stats: dict[tuple[str, int], SplitGram]
    influence: list[float]
    energy: torch.Tensor
    tokens: int = 0
    extra: dict = field(default_factory=dict)


def block_hooks(fam: Family, acc: dict) -> list:
    """Hooks accumulating each block's influence and the residual stream's energy."""
    def pre(i):
        def hook(_m, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            acc["inp"][i] = h.detach()
            e = h.detach().to(torch.float64).pow(2).reshape(-1, h.shape[-1]).sum(0)
            acc["energy"] = e if acc["energy"] is None else acc["energy"] + e
        return hook

    def post(i):
        def hook(_m, _args, _kwargs, out):
            o = (out[0] if isinstance(out, tuple) else out).detach().to(torch.float64)
            x = acc["inp"].pop(i).to(torch.float64)
            cos = nn.functional.cosine_similarity(x, o, dim=-1, eps=1e-12)
            acc["infl"][i] += float((1 - cos).sum())
            acc["rows"][i] += cos.numel()
        return hook

    hs = []
    for i, b in enumerate(fam.layers):
        hs.append(b.register_forward_pre_hook(pre(i), with_kwargs=True))
        hs.append(b.register_forward_hook(post(i), with_kwargs=True))
    return hs


def calibrate(model: nn.Module, batches: Iterable[dict]) -> Calibration:
    """One pass: Gram sums at every MLP and attention consumer, block influence, energy."""
    fam = find_family(model)
    n = len(fam.layers)
    batches = list(batches)
    acc = {"inp": {}, "infl": [0.0] * n, "rows": [0] * n, "energy": None}
    hooks = block_hooks(fam, acc)
    try:
        stats = collect_stats(model, batches, Plan(mlp={i: [] for i in range(n)}, heads={i: [] for i in range(n)}))
    finally:
        for h in hooks:
            h.remove()
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
    return Calibration(stats, [acc["infl"][i] / max(acc["rows"][i], 1) for i in range(n)],
                       acc["energy"].cpu() if acc["energy"] is not None else torch.zeros(0), tokens)


def cond_cov_blocks(cov: torch.Tensor, width: int) -> list[torch.Tensor]:
    """Per unit of ``width`` consecutive features: the covariance of its features given all the
    others (the inverse of its diagonal block of the precision matrix)."""
    d = cov.shape[0]
    scale = float(torch.diagonal(cov).mean()) or 1.0
    prec = torch.linalg.inv(cov + RIDGE * scale * torch.eye(d, dtype=cov.dtype, device=cov.device))
    out = []
    for u in range(d // width):
        s = slice(u * width, (u + 1) * width)
        out.append(torch.linalg.inv(prec[s, s]))
    return out


def unit_scores(fam: Family, kind: str, i: int, calib: Calibration, by: str, mode: str,
                gen: torch.Generator) -> torch.Tensor:
    """One block's MLP channels (``kind="mlp"``) or query heads: scores, higher = keep."""
    if kind == "mlp":
        m = fam.mlp(i)
        consumer, producers, width = m.consumer, m.producers, 1
    else:
        a = fam.attn(i)
        consumer, producers, width = a.o, a.q + ([a.fused] if a.fused is not None else []), a.head_dim
    w = consumer.weight.detach().to(torch.float64).cpu()
    units = w.shape[1] // width
    if by == "random":
        return torch.rand(units, generator=gen, dtype=torch.float64)
    g = calib.stats[(kind, i)].whole()
    cov, m2 = g.cov().cpu(), (g.xtx / max(g.n, 1)).cpu()
    per_unit = [columns_of([u], width) for u in range(units)]
    if by == "magnitude":
        return magnitude(producers, w, per_unit, width, a.heads if kind == "heads" else None)
    if by == "wanda":
        rms = torch.diagonal(m2).clamp_min(0).sqrt()
        return torch.stack([(w[:, c].abs() * rms[c]).sum() for c in per_unit])
    if by == "flap":
        return torch.stack([(w[:, c].pow(2).sum(0) * torch.diagonal(cov)[c]).sum() for c in per_unit])
    if by == "redundancy":
        r2 = r2_from_moments(g.xtx.cpu(), g.sum.cpu(), g.n)
        return torch.stack([1 - r2[c].mean() for c in per_unit])
    if by != "output_error":
        raise UsageError(f"unknown ranking {by!r}: use one of {', '.join(RANKERS)}", setting="rank_by")
    if mode == "ridge":
        blocks = cond_cov_blocks(cov, width)
    else:
        src = cov if mode == "mean" else m2
        blocks = [src[c][:, c] for c in per_unit]
    return torch.stack([(w[:, c].T @ w[:, c] * s).sum() for c, s in zip(per_unit, blocks, strict=True)])


def magnitude(producers, w: torch.Tensor, per_unit: list, width: int, heads: int | None) -> torch.Tensor:
    """ℓ2 norm of the unit's consumer columns and producer rows (a fused q/k/v: its three slices)."""
    out = []
    for c in per_unit:
        total = w[:, c].pow(2).sum()
        for p in producers:
            pw = p.weight.detach().to(torch.float64).cpu()
            rows = c
            if heads is not None and pw.shape[0] == 3 * heads * width:
                span = heads * width
                rows = torch.cat([c, c + span, c + 2 * span])
            total = total + pw[rows].pow(2).sum()
        out.append(total.sqrt())
    return torch.stack(out)


def block_scores(calib: Calibration, by: str, gen: torch.Generator) -> torch.Tensor:
    if by == "random":
        return torch.rand(len(calib.influence), generator=gen, dtype=torch.float64)
    return torch.tensor(calib.influence, dtype=torch.float64)


def hidden_scores(calib: Calibration, by: str, gen: torch.Generator) -> torch.Tensor:
    if by == "random":
        return torch.rand(calib.energy.numel(), generator=gen, dtype=torch.float64)
    return calib.energy.to(torch.float64)


__all__ = ["Calibration", "DEFAULT_RANK", "RANKERS", "block_scores", "calibrate", "hidden_scores", "unit_scores"]
