"""Least-squares compensation for removed units (after SlimGPT / CORP, and FLAP's bias).

A consumer layer computes ``y = W x + b``. Removing the input features ``R`` (the units of the
layer that feeds it) and keeping ``K`` loses ``W_R x_R``. Over calibration data, regress the
removed features on the kept ones, ``x_R ≈ B x_K + c`` (``B``: ``[|R|, |K|]``), and fold it in:

    y = W_K x_K + W_R x_R + b ≈ (W_K + W_R B) x_K + (b + W_R c)

Everything is computed from mergeable sums accumulated in float64 (``Gram``: Σxxᵀ, Σx, count),
so calibration streams in one pass and shards merge in any order. The fit is exact (λ = 0) for
removed features that are dead, constant, duplicates of kept ones or linear combinations of
them. ``mean`` mode is FLAP's bias compensation (``B = 0``, ``c = mean(x_R)``); ``none`` drops the
contribution. In ``ridge`` mode λ (relative to the mean variance of the kept features) is chosen
from a small grid by the consumer's output error on held-out calibration rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fitcli.errors import UsageError

MODES = ("ridge", "mean", "none")
LAMBDAS = (0.0, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
PINV_RCOND = 1e-11  # eigenvalues below this fraction of the largest are treated as exact zeros
JITTER = 1e-10  # λ = 0 is solved as this (relative to the mean variance): exact to ~1e-10


class Gram:
    """Σ xxᵀ, Σ x and the row count of a stream of feature vectors, float64 (all "sum" states)."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.dim = int(dim)
        self.xtx = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)
        self.sum = torch.zeros(self.dim, dtype=torch.float64, device=device)
        self.n = 0

    def update(self, x: torch.Tensor) -> Gram:
        """Add the rows of ``x`` (``[rows, dim]``, any float dtype)."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected rows of {self.dim} features, got shape {tuple(x.shape)}")
        x = x.detach().to(self.xtx.device, torch.float64)
        self.xtx += x.T @ x
        self.sum += x.sum(dim=0)
        self.n += int(x.shape[0])
        return self

    def merge(self, other: Gram) -> Gram:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge a Gram of {other.dim} features into one of {self.dim}")
        self.xtx += other.xtx.to(self.xtx.device)
        self.sum += other.sum.to(self.sum.device)
        self.n += other.n
        return self

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)

    def cov(self) -> torch.Tensor:
        """Population covariance (divided by n), symmetrised."""
        mu = self.mean()
        c = self.xtx / max(self.n, 1) - torch.outer(mu, mu)
        return (c + c.T) / 2


class SplitGram:
    """Two ``Gram``s over the same features: fitting rows and held-out rows. Row ``i`` of every
    update is held out when ``i % every == every - 1``: the split depends only on the batch, so
    shards merge to the same sums in any order. ``every=0`` holds nothing out."""

    def __init__(self, dim: int, every: int = 5, device: torch.device | str = "cpu"):
        self.fit, self.held, self.every = Gram(dim, device), Gram(dim, device), int(every)

    def update(self, x: torch.Tensor) -> SplitGram:
        if self.every <= 1:
            self.fit.update(x)
            return self
        held = torch.arange(x.shape[0], device=x.device) % self.every == self.every - 1
        self.fit.update(x[~held])
        self.held.update(x[held])
        return self

    def merge(self, other: SplitGram) -> SplitGram:
        self.fit.merge(other.fit)
        self.held.merge(other.held)
        return self

    def whole(self) -> Gram:
        g = Gram(self.fit.dim, self.fit.xtx.device)
        return g.merge(self.fit).merge(self.held)


def pinv_psd(a: torch.Tensor, rcond: float = PINV_RCOND) -> torch.Tensor:
    """Pseudo-inverse of a symmetric positive semi-definite matrix (eigenvalues below
    ``rcond × max`` are zero)."""
    if a.numel() == 0:
        return a.clone()
    w, v = torch.linalg.eigh(a)
    cut = rcond * float(w.abs().max()) if w.numel() else 0.0
    inv = torch.where(w > cut, 1.0 / torch.where(w > cut, w, torch.ones_like(w)), torch.zeros_like(w))
    return (v * inv) @ v.T


def regress(gram: Gram, removed: torch.Tensor, kept: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge least squares with an intercept: ``x_R ≈ B x_K + c``. ``lam`` is relative to the mean
    variance of the kept features. λ = 0 is least squares, solved with a jitter of ``JITTER``
    (relative) so that a singular covariance (dead, constant or dependent kept features) costs a
    Cholesky factorisation, not an eigendecomposition; the pseudo-inverse is the fallback."""
    cov, mu = gram.cov(), gram.mean()
    s_kk = cov[kept][:, kept]
    s_rk = cov[removed][:, kept]
    if kept.numel():
        scale = float(torch.diagonal(s_kk).mean())
        scale = scale if scale > 0 else 1.0
        a = s_kk + max(lam, JITTER) * scale * torch.eye(kept.numel(), dtype=s_kk.dtype, device=s_kk.device)
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            b = torch.cholesky_solve(s_rk.T, chol).T
        else:
            b = s_rk @ pinv_psd(s_kk)
    else:
        b = s_rk[:, :0]
    c = mu[removed] - b @ mu[kept]
    return b, c


def output_error(gram: Gram, w_removed: torch.Tensor, removed: torch.Tensor, kept: torch.Tensor,
                 b: torch.Tensor, c: torch.Tensor) -> float:
    """Mean squared consumer-output error ``E‖W_R (x_R − B x_K − c)‖²`` over the rows in ``gram``,
    as ``tr(Q E[r rᵀ])`` with ``Q = W_Rᵀ W_R`` and the second moments of the rows."""
    if gram.n == 0:
        return float("nan")
    n = gram.n
    w = w_removed.to(torch.float64)
    q = w.T @ w
    m_kk = gram.xtx[kept][:, kept] / n
    m_rk = gram.xtx[removed][:, kept] / n
    m_rr = gram.xtx[removed][:, removed] / n
    qb = q @ b
    e = gram.sum[removed] / n - b @ (gram.sum[kept] / n)  # E[x_R − B x_K]
    err = (q * m_rr).sum() - 2 * (qb * m_rk).sum() + ((qb @ m_kk) * b).sum() - 2 * c @ (q @ e) + c @ (q @ c)
    return float(err.clamp_min(0.0))


@dataclass
class Fit:
    """The regression to fold: ``x_R ≈ B x_K + c``, what was chosen and the held-out errors."""

    mode: str
    b: torch.Tensor
    c: torch.Tensor
    lam: float | None = None
    choice: str = ""  # ridge: "lambda=…", or "mean" / "none" when they beat every λ on held-out rows
    heldout: dict[str, float] = field(default_factory=dict)  # "none", "mean", "lambda=…": output MSE

    def summary(self) -> dict:
        return {"mode": self.mode, "choice": self.choice or self.mode, "lambda": self.lam,
                "heldout_mse": dict(self.heldout)}


def fit_compensation(stats: SplitGram | Gram, removed: torch.Tensor, weight: torch.Tensor, mode: str = "ridge",
                     lambdas: tuple[float, ...] = LAMBDAS, lam: float | None = None) -> Fit:
    """The compensation of consumer ``weight`` (``[out, in]``) for removing input features
    ``removed``. In ``ridge`` mode λ is ``lam`` when given; else, with held-out rows, the grid
    value with the least held-out output error (ties: the smallest λ), or ``mean`` / ``none`` when
    one of them does better than every λ (too little calibration data to fit); without held-out
    rows, the smallest λ. The final fit uses every calibration row."""
    if mode not in MODES:
        raise UsageError(f"unknown compensation {mode!r}: use one of {', '.join(MODES)}")
    split = stats if isinstance(stats, SplitGram) else None
    whole = split.whole() if split else stats
    if whole.n == 0:
        raise UsageError("compensation needs calibration data: no activations were observed")
    dev = whole.xtx.device  # the fit runs where the sums are
    removed = torch.as_tensor(removed, dtype=torch.long).reshape(-1).to(dev)
    kept_mask = torch.ones(whole.dim, dtype=torch.bool, device=dev)
    kept_mask[removed] = False
    kept = torch.nonzero(kept_mask).reshape(-1)
    w_r = weight.detach().to(dev, torch.float64)[:, removed]
    zero_b = torch.zeros(removed.numel(), kept.numel(), dtype=torch.float64, device=dev)
    zero_c = torch.zeros(removed.numel(), dtype=torch.float64, device=dev)
    held = split.held if split and split.held.n else None
    heldout = {}
    if held is not None:
        heldout["none"] = output_error(held, w_r, removed, kept, zero_b, zero_c)
        heldout["mean"] = output_error(held, w_r, removed, kept, zero_b, split.fit.mean()[removed])
    choice = mode
    if mode == "ridge" and lam is None:
        choice = f"lambda={lambdas[0]:g}" if held is None else choose_lambda(split, w_r, removed, kept, lambdas, heldout)
        lam = float(choice.split("=")[1]) if choice.startswith("lambda=") else None
    elif mode == "ridge":
        choice = f"lambda={lam:g}"
    if choice == "none":
        return Fit(mode, zero_b, zero_c, choice=choice, heldout=heldout)
    if choice == "mean":
        return Fit(mode, zero_b, whole.mean()[removed], choice=choice, heldout=heldout)
    b, c = regress(whole, removed, kept, lam)
    return Fit(mode, b, c, lam=lam, choice=choice, heldout=heldout)


def choose_lambda(split: SplitGram, w_r: torch.Tensor, removed: torch.Tensor, kept: torch.Tensor,
                  lambdas: tuple[float, ...], heldout: dict[str, float]) -> str:
    """The candidate with the least held-out output error: a grid λ (fitted on the fitting rows),
    else ``mean`` or ``none`` (already in ``heldout``) when strictly better than every λ."""
    tie = 1e-9 * max(heldout["none"], heldout["mean"])  # differences below this are round-off
    best, best_err = "", float("inf")
    for lam in sorted(lambdas):
        b, c = regress(split.fit, removed, kept, lam)
        err = output_error(split.held, w_r, removed, kept, b, c)
        heldout[f"lambda={lam:g}"] = err
        if not best or err < best_err - tie:
            best, best_err = f"lambda={lam:g}", err
    for name in ("mean", "none"):
        if heldout[name] < best_err - tie:
            best, best_err = name, heldout[name]
    return best


def fold(weight: torch.Tensor, bias: torch.Tensor | None, removed: torch.Tensor, fit: Fit) -> tuple[torch.Tensor, torch.Tensor]:
    """The consumer's new weight (kept input columns only) and bias:
    ``W_K + W_R B`` and ``b + W_R c``, in the weight's dtype. The inputs are not modified."""
    removed = torch.as_tensor(removed, dtype=torch.long).reshape(-1).cpu()
    kept_mask = torch.ones(weight.shape[1], dtype=torch.bool)
    kept_mask[removed] = False
    w = weight.detach().to(torch.float64).cpu()
    w_r = w[:, removed]
    new_w = w[:, kept_mask] + w_r @ fit.b.to("cpu", torch.float64)
    b0 = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.detach().to(torch.float64).cpu()
    new_b = b0 + w_r @ fit.c.to("cpu", torch.float64)
    return new_w.to(weight.device, weight.dtype), new_b.to(weight.device, weight.dtype)


def r2_from_moments(xtx: torch.Tensor, total: torch.Tensor, n: float, ridge: float = 1e-10) -> torch.Tensor:
    """R² of each feature regressed (least squares with an intercept) on all the others, from the
    sums Σxxᵀ, Σx and the count. A feature with no variance (relative to its mean square) is
    rebuilt exactly by the intercept: R² = 1; with no other varying feature, a varying one gets 0.

    From the correlation matrix ``P`` (a Cholesky factorisation, with a tiny ridge ``δ`` for
    singular ``P``): the residual variance of feature ``i`` is ``1/[(P + δI)⁻¹]_ii − δ``."""
    d = xtx.shape[0]
    n = max(float(n), 1.0)
    mu = total / n
    cov = xtx / n - torch.outer(mu, mu)
    cov = (cov + cov.T) / 2
    var = torch.diagonal(cov).clamp_min(0.0)
    live = var > 1e-12 * torch.diagonal(xtx / n).abs()
    out = torch.ones(d, dtype=torch.float64, device=xtx.device)
    idx = torch.nonzero(live).reshape(-1)
    if idx.numel() <= 1:
        out[idx] = 0.0  # nothing else varies: nothing to rebuild it from
        return out
    s = var[idx].sqrt()
    corr = cov[idx][:, idx] / torch.outer(s, s)
    eye = torch.eye(idx.numel(), dtype=corr.dtype, device=corr.device)
    chol, info = torch.linalg.cholesky_ex(corr + ridge * eye)
    if int(info) == 0:
        inv_diag = torch.diagonal(torch.cholesky_inverse(chol))
    else:  # not positive definite even with the ridge (round-off): eigenvalues clamped at 0
        w, v = torch.linalg.eigh(corr)
        inv_diag = (v.square() / (w.clamp_min(0.0) + ridge)).sum(dim=1)
    resid = (1.0 / inv_diag - ridge).clamp(0.0, 1.0)
    out[idx] = 1.0 - resid
    return out


def columns_of(units: torch.Tensor | list[int], width: int) -> torch.Tensor:
    """The input columns of units that are ``width`` features wide (a head: ``head_dim``)."""
    u = torch.as_tensor(units, dtype=torch.long).reshape(-1, 1)
    return (u * width + torch.arange(width).reshape(1, -1)).reshape(-1)


__all__ = ["Fit", "Gram", "LAMBDAS", "MODES", "SplitGram", "columns_of", "fit_compensation", "fold",
           "output_error", "pinv_psd", "r2_from_moments", "regress"]
