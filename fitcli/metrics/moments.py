"""The per-batch moment statistics of an activation ``[batch, units, positions]`` (Σh, Σh², Σ|h|
and the zero count per unit, float64), in as few passes over the activation as each case allows,
and the pool of temporaries they use. ``UnitBatch`` (``fitcli.metrics.base``) calls them once per
layer and batch, during the forward."""

from __future__ import annotations

import math

import torch


class Scratch:
    """Reusable temporaries for the per-batch statistics: one flat buffer per (slot, dtype,
    device), grown to the largest request and handed out as views.

    On CPU a fresh tensor the size of an activation is fresh memory from the OS on most batches,
    and its page faults cost more than the arithmetic (an int32 copy of a 16 MiB activation:
    ~15 ms fresh, ~0.4 ms into a reused buffer). Memory stays bounded by the largest layer.
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, slot: str, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = math.prod(shape)
        key = (slot, dtype, torch.device(device))
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = self._bufs[key] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)


def scratch_like(scratch: Scratch | None, slot: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A temporary shaped like ``t`` (contiguous): from the pool when there is one."""
    dtype = dtype or t.dtype
    if scratch is None:
        return torch.empty(t.shape, dtype=dtype, device=t.device)
    return scratch.get(slot, t.shape, dtype, t.device)


def flat_moments(a: torch.Tensor, scratch: Scratch | None, low_of) -> dict[str, torch.Tensor]:
    """The moments of ``a`` ([batch, units, 1]: the samples are the observations)."""
    v = a[:, :, 0]
    if v.dtype not in (torch.float32, torch.float64):
        v = v.to(torch.float32)
    b = v.shape[0]
    # centred on the batch mean, in the activation's dtype (no float64 copy): the centred squares
    # keep their precision, the exact identities restore the sums
    m = v.mean(dim=0)
    low = low_of(m)
    nonneg, positive = low >= 0, low > 0  # then Σ|h| = Σh; then nothing is zero (NaN: neither)
    c = torch.sub(v, m, out=scratch_like(scratch, "f", v))
    q2 = c.sum(dim=0).to(torch.float64)
    q1 = c.square_().sum(dim=0).to(torch.float64)  # (vector_norm over dim 0 is ~10x slower)
    m64 = m.to(torch.float64)
    total = b * m64 + q2  # Σh = Σ(h − m) + b·m
    ab = total if nonneg else torch.abs(v, out=c).sum(dim=0).to(torch.float64)
    if positive or (not nonneg and none_zero(c)):  # c holds |h|
        z = torch.zeros_like(total)
    else:
        z = zero_count(v.unsqueeze(2), c.unsqueeze(2), nonneg=nonneg)
    return {"abs": ab, "sumsq": q1 + 2 * m64 * q2 + b * m64.square(), "zeros": z, "sum": total}


def position_moments(a: torch.Tensor, scratch: Scratch | None, low_of, quick: bool = False) -> dict[str, torch.Tensor]:
    """The moments of ``a`` ([batch, units, positions]): per sample over positions, then summed.

    Σh per sample and Σh² per unit from values centred on each sample's mean (one temporary),
    then for a signed activation |h| and its sum (a zero count only when some |h| is 0), for a
    non-negative one (ReLU) its minimum and a zero count (Σ|h| is the sum already taken).
    ``quick``: Σh² in one read of ``a`` instead (no centring pass), unless a unit's |mean| is
    large against its spread (mean² > 4·variance in this batch), which would lose its variance to
    float32 rounding of Σh²; relative error ≲ 1e-7·(1 + 3·4) on the variance."""
    s = a.sum(dim=2)  # [batch, units]
    c = scratch_like(scratch, "f", a, torch.promote_types(a.dtype, s.dtype))  # the one temporary
    out = quick_sums(a, s) if quick else None
    if out is None:
        out = centred_sums(a, s, c)
    # Σ|h| = Σh when non-negative: the quick totals have it, else the same per-sample sums bit for bit
    out.update(abs_and_zeros(a, c if c.dtype == a.dtype else None, low_of(s),
                             lambda: out["sum"] if "sum" in out else s.to(torch.float64).sum(0),
                             lambda absolute: absolute.sum(dim=2).to(torch.float64).sum(0)))
    return out


SHORT_POSITIONS = 16  # at most this many positions per sample: the tracker reduces over the batch first


def short_moments(a: torch.Tensor, scratch: Scratch | None, low_of) -> dict[str, torch.Tensor] | None:
    """The quick moments (see ``position_moments``) of an activation with few positions per
    sample (a late conv stage's 4x4 or 2x2 maps): a reduction over 4 or 16 values per sample is
    mostly overhead, so the batch is reduced first (contiguous rows, vectorised) and the positions
    after; no per-sample sums are kept (``hbar`` takes them from the activation). None where the
    mean dominates the spread, as ``quick_sums``."""
    c = scratch_like(scratch, "f", a)
    tot = torch.stack([a.sum(dim=0), torch.mul(a, a, out=c).sum(dim=0)]).sum(dim=2, dtype=torch.float64)
    if not spread_holds(tot[0], tot[1], a.shape[0] * a.shape[2]):
        return None
    # a negative total settles a signed activation, a finite one a ReLU's
    return {"sum": tot[0], "sumsq": tot[1],
            **abs_and_zeros(a, c, low_of(tot[0]), lambda: tot[0],
                            lambda absolute: absolute.sum(dim=0).sum(dim=1, dtype=torch.float64))}


def spread_holds(total: torch.Tensor, sumsq: torch.Tensor, n: int) -> bool:
    """Does every unit's variance survive Σh² taken in one float32 read? Not where its mean
    dominates its spread: mean² > 4·variance, i.e. 5·(Σh)² > 4·n·Σh² (NaN: no)."""
    return bool((total.square().mul_(5) <= sumsq * (4 * n)).all())


def abs_and_zeros(a: torch.Tensor, c: torch.Tensor | None, low: float, total, abs_total) -> dict[str, torch.Tensor]:
    """Σ|h| and the zero count per unit, float64, given the activation's smallest value ``low``:
    a non-negative activation's Σ|h| is its Σh (``total()``); a signed one's is ``abs_total(|h|)``,
    with |h| written into ``c`` when given, and counted for zeros only when some |h| is 0."""
    nonneg, positive = low >= 0, low > 0  # NaN: neither
    absolute = None
    if nonneg:
        ab = total()
    else:
        absolute = torch.abs(a, out=c) if c is not None else a.abs()
        ab = abs_total(absolute)
    if positive or (absolute is not None and none_zero(absolute)):
        z = torch.zeros(a.shape[1], dtype=torch.float64, device=a.device)
    else:
        z = zero_count(a, c, nonneg=nonneg)
    return {"abs": ab, "zeros": z}


def quick_sums(a: torch.Tensor, s: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Σh per sample, Σh and Σh² per unit, Σh² in one read of ``a`` (no temporary); None where a
    unit's mean dominates its spread, mean² > 4·variance, i.e. 5·(Σh)² > 4·n·Σh² (see
    ``position_moments``). Few operations: the tracker calls it for every layer at every step."""
    per = torch.stack([s, torch.linalg.vector_norm(a, 2, dim=2).square_()]).to(torch.float64)
    tot = per.sum(dim=1)  # [2, units]: Σh, Σh²
    if not spread_holds(tot[0], tot[1], a.shape[0] * a.shape[2]):
        return None
    return {"sum_s": per[0], "sum": tot[0], "sumsq": tot[1]}


def centred_sums(a: torch.Tensor, s: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
    """Σh per sample and Σh² per unit from values centred on each sample's own mean (into ``c``):
    Σh = Σc + p·m, Σh² = Σc² + 2mΣc + p·m². The float32 sum s is off by a few ulps of Σh, which
    the variance of a unit whose |mean| ≫ std cannot absorb when taken against an exact Σh²."""
    p = a.shape[2]
    m = s / p
    torch.sub(a, m.unsqueeze(2), out=c)
    q2 = c.sum(dim=2)
    q1 = torch.linalg.vector_norm(c, 2, dim=2).square()
    q1, q2, m64 = torch.stack([q1, q2, m]).to(torch.float64).unbind(0)
    return {"sum_s": p * m64 + q2, "sumsq": (q1 + 2 * m64 * q2 + p * m64.square()).sum(0)}


def none_zero(absolute: torch.Tensor) -> bool:
    """Is every value of ``absolute`` (|h|, already computed) above 0? One read, where counting
    zeros takes three passes; signed pre-activations rarely hold an exact 0. NaN answers no."""
    return absolute.numel() > 0 and bool(absolute.amin() > 0)


def zero_count(a: torch.Tensor, out: torch.Tensor | None = None, nonneg: bool = False) -> torch.Tensor:
    """How many observations of each unit of ``a`` ([batch, units, positions]) are exactly 0,
    float64 ``[units]``. Counted as p − Σ|sign(h)| (two light passes; a boolean ``==`` and its
    sum are several times slower on CPU), exact while float32 counts (2^24) hold; NaN rows and
    huge maps take ``==``. ``nonneg``: the caller knows no value is negative (NaN excepted)."""
    b, _, p = a.shape
    if a.dtype in (torch.float32, torch.float64) and max(b, p) < 2**24:  # exact float counts
        sign = torch.sign(a, out=out) if out is not None else torch.sign(a)
        if not nonneg:  # known ≥ 0: sign is already 0 or 1
            sign.abs_()
        # over the batch first (contiguous rows): whole numbers below 2^24, exact in any order
        nonzero = sign.sum(dim=0).sum(dim=1, dtype=torch.float64)  # NaN where a NaN was
        if bool(torch.isfinite(nonzero).all()):
            return b * p - nonzero
    return (a == 0).sum(dim=2).sum(0).to(torch.float64)
