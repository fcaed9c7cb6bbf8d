"""``score --validate``: how well does each cheap metric rank units, for *this* model?

For every audited non-final layer, exact ablation (the ablate engine) on all units or on a
seeded stratified sample of K units, then Spearman and Kendall rank correlation of each computed
metric with the oracle ``|Δloss|`` (Molchanov et al. 2017), per layer and across layers (metric
values ℓ2-normalised per layer), plus the overlap of the bottom 10% by metric and by oracle.

Every metric is taken in its fitness orientation (its declared ``higher_is_better``): a metric
where lower is fit (APoZ) is reflected first (``max − m``, as the rankings do), so a positive
correlation and a high bottom-10% overlap always mean "this metric finds the units whose removal
costs least".
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from fitcli.discovery.kinds import kind_of_point
from fitcli.report import direction, fitness_values
from fitcli.report_types import (
    BlockValidation,
    Correlation,
    KindValidation,
    LayerReport,
    LayerValidation,
    RandomBaseline,
    RandomStats,
    Validation,
    floats,
    tensor,
)

if TYPE_CHECKING:
    from fitcli.report import AuditReport

def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n with ties given their average rank (as scipy.stats.rankdata)."""
    x = x.to(torch.float64)
    n = x.numel()
    order = torch.argsort(x, stable=True)
    xs = x[order]
    ranks = torch.empty(n, dtype=torch.float64)
    i = 0
    vals = xs.tolist()
    while i < n:
        j = i
        while j + 1 < n and vals[j + 1] == vals[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    a, b = a.to(torch.float64), b.to(torch.float64)
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return None if den == 0 else float((a * b).sum()) / den


def spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    if a.numel() < 2:
        return None
    return pearson(rankdata(a), rankdata(b))


def kendall(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Kendall's tau-b (ties in either variable accounted for)."""
    n = a.numel()
    if n < 2:
        return None
    a, b = a.to(torch.float64), b.to(torch.float64)
    conc = disc = ties_a = ties_b = 0.0
    step = max(1, 2_000_000 // max(n, 1))
    for s in range(0, n, step):
        da = torch.sign(a[s : s + step, None] - a[None, :])
        db = torch.sign(b[s : s + step, None] - b[None, :])
        prod = da * db
        conc += float((prod > 0).sum())
        disc += float((prod < 0).sum())
        ties_a += float(((da == 0) & (db != 0)).sum())
        ties_b += float(((db == 0) & (da != 0)).sum())
    # every unordered pair was counted twice (i<j and j>i)
    conc, disc, ties_a, ties_b = conc / 2, disc / 2, ties_a / 2, ties_b / 2
    den = math.sqrt((conc + disc + ties_a) * (conc + disc + ties_b))
    return None if den == 0 else (conc - disc) / den


def bottom_overlap(metric: torch.Tensor, oracle: torch.Tensor, frac: float = 0.1) -> float | None:
    """|bottom-10% by metric ∩ bottom-10% by oracle| / size of that set."""
    n = metric.numel()
    k = max(1, int(round(frac * n)))
    if n < 2:
        return None
    a = set(torch.argsort(metric.to(torch.float64), stable=True)[:k].tolist())
    b = set(torch.argsort(oracle.to(torch.float64), stable=True)[:k].tolist())
    return len(a & b) / k


def stratified_units(values: list[float | None], k: int, seed: int) -> list[int]:
    """k units spread over the range of ``values``: sort, cut into k strata, one seeded pick each."""
    n = len(values)
    if k >= n:
        return list(range(n))
    key = [(v if v is not None and math.isfinite(v) else math.inf, i) for i, v in enumerate(values)]
    order = [i for _, i in sorted(key)]
    g = torch.Generator().manual_seed(seed)
    picks = []
    for s in range(k):
        lo, hi = (s * n) // k, ((s + 1) * n) // k
        picks.append(order[lo + int(torch.randint(0, hi - lo, (1,), generator=g))])
    return sorted(picks)


def correlation(metric: torch.Tensor, oracle: torch.Tensor) -> dict[str, Any]:
    """Spearman, Kendall and bottom-10% overlap of ``metric`` with ``oracle`` over the units where both are finite."""
    ok = torch.isfinite(metric) & torch.isfinite(oracle)
    m, o = metric[ok], oracle[ok]
    return {"spearman": spearman(m, o), "kendall": kendall(m, o), "bottom10_overlap": bottom_overlap(m, o),
            "units": int(ok.sum())}


def correlations(layers: dict[str, dict[str, torch.Tensor]], oracle: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per layer and across layers. ``layers[name][metric]`` and ``oracle[name]`` on the same units."""
    per_layer: dict[str, Any] = {}
    for name, d in layers.items():
        per_layer[name] = {"metrics": {m: correlation(v, oracle[name]) for m, v in sorted(d.items())}}
        scored = [(c["spearman"], m) for m, c in per_layer[name]["metrics"].items() if c["spearman"] is not None]
        per_layer[name]["best"] = max(scored)[1] if scored else None
    across, best = across_layers(layers, oracle)
    return {"layers": per_layer, "across_layers": across, "best": best, "random": random_baseline(oracle)}


def across_layers(layers: dict[str, dict[str, torch.Tensor]],
                  oracle: dict[str, torch.Tensor]) -> tuple[dict[str, Any], str | None]:
    """Each metric's correlation with the oracle over the units of every layer together (the
    metric's values ℓ2-normalised per layer), and the metric with the highest Spearman."""
    metrics = sorted({m for d in layers.values() for m in d})
    across: dict[str, Any] = {}
    for m in metrics:
        xs, os_ = [], []
        for name, d in layers.items():
            if m not in d:
                continue
            v = d[m].to(torch.float64)
            ok = torch.isfinite(v) & torch.isfinite(oracle[name])
            norm = float(v[ok].norm()) if ok.any() else 0.0
            xs.append(torch.where(ok, v / norm if norm > 0 else v * 0, torch.full_like(v, float("nan"))))
            os_.append(oracle[name].to(torch.float64))
        if xs:
            across[m] = correlation(torch.cat(xs), torch.cat(os_))
    scored = [(c["spearman"], m) for m, c in across.items() if c["spearman"] is not None]
    return across, (max(scored)[1] if scored else None)


def kind_correlations(layers: dict[str, dict[str, torch.Tensor]], oracle: dict[str, torch.Tensor],
                      kinds: dict[str, str]) -> dict[str, Any]:
    """Per unit kind (``kinds[layer]``: its kind's name): which metric ranks the kind's units like
    the oracle across the kind's layers (``across_layers`` on them), beside a random order's score
    on the same units. A head is never ranked against an MLP channel."""
    by: dict[str, list[str]] = {}
    for name in layers:
        by.setdefault(kinds[name], []).append(name)
    out: dict[str, Any] = {}
    for kind, names in sorted(by.items()):
        across, best = across_layers({n: layers[n] for n in names}, {n: oracle[n] for n in names})
        rnd = random_baseline({kind: torch.cat([oracle[n] for n in names])})["layers"][kind]
        out[kind] = {"layers": names, "metrics": across, "best": best, "random": rnd}
    return out


def wants_kinds(kinds: dict[str, str]) -> bool:
    """The per-kind summary is added when attention heads are validated beside another kind (a
    transformer's units); other reports keep their validation unchanged."""
    return "heads" in kinds.values() and len(set(kinds.values())) > 1


RANDOM_DRAWS = 200


def random_baseline(oracle: dict[str, torch.Tensor], draws: int = RANDOM_DRAWS, seed: int = 0) -> dict[str, Any]:
    """What ranking units in a random order scores against the oracle (Budhraja et al. 2020: random
    pruning is a strong baseline): the mean Spearman and bottom-10% overlap over ``draws`` seeded
    random orders, per layer and across layers. A metric worth using beats it."""
    g = torch.Generator().manual_seed(seed)

    def stats(o: torch.Tensor) -> dict[str, Any]:
        o = o.to(torch.float64)
        o = o[torch.isfinite(o)]
        if o.numel() < 2:
            return {"spearman": None, "bottom10_overlap": None, "units": int(o.numel()), "draws": draws}
        rho, overlap = [], []
        for _ in range(draws):
            r = torch.rand(o.numel(), generator=g, dtype=torch.float64)
            rho.append(spearman(r, o))
            overlap.append(bottom_overlap(r, o))
        rho = [x for x in rho if x is not None]
        return {"spearman": sum(rho) / len(rho) if rho else None, "bottom10_overlap": sum(overlap) / len(overlap),
                "units": int(o.numel()), "draws": draws}

    per = {name: stats(o) for name, o in oracle.items()}
    return {"layers": per, "across_layers": stats(torch.cat([o for o in oracle.values()])) if oracle else None}


def _selection(layers: list[LayerReport], rank_metric: str | None, units: int | None,
               seed: int) -> dict[str, list[int] | None]:
    """The units validated per non-final activation layer: all (None), or ``units`` of them spread
    over the range of the ranking metric (else the first metric)."""
    sel: dict[str, list[int] | None] = {}
    for lay in layers:
        if lay.final or kind_of_point(lay.activation_point_kind).weight_only:
            continue
        basis = lay.metrics.get(rank_metric) if rank_metric else None
        values = floats(basis) if basis is not None else []
        if not values:
            first = next(iter(lay.metrics.values()), None)
            values = floats(first) if first is not None else [0.0] * lay.units
        sel[lay.name] = stratified_units(values, units, seed) if units else None
    return sel


def _layer_validations(v: dict[str, Any], chosen: dict[str, list[int]],
                       signed: dict[str, list[float | None]]) -> dict[str, LayerValidation]:
    return {name: LayerValidation(metrics={m: Correlation.from_dict(c) for m, c in entry["metrics"].items()},
                                  best=entry["best"], units=chosen[name], ablation=signed[name])
            for name, entry in v["layers"].items()}


def measure_validation(report: AuditReport, *, graph, data, loss_fn, units: int | None, seed: int, device,
                       chunk_size: int | None, progress=None, group=None) -> Validation:
    """Each metric's rank agreement with exact ablation on ``report``'s layers. ``group``: a process
    group; the exact ablation is sharded over its ranks (every rank gets the same validation)."""
    from fitcli.ablation import ablate_layers
    from fitcli.errors import InputError
    from fitcli.progress import NO_PROGRESS

    if data is None or graph.runner is None:
        raise InputError("validation needs a runnable model and data")
    if loss_fn is None:
        raise InputError("validation needs a loss: the data has no targets and no loss was given")
    info = report.metric_info or {}
    exclude = {m for m, i in info.items() if "ablation" in i.get("needs", [])} | {"ablation_accuracy"}
    sel = _selection(report.layers, report.settings.get("rank_by"), units, seed)
    if not sel:
        raise InputError("validation: no non-final layer to validate")
    mode = report.settings.get("ablation_mode", "zero")
    ab = ablate_layers(graph, list(sel), data, loss_fn, mode=mode, device=device, chunk_size=chunk_size,
                       progress=progress or NO_PROGRESS, units=sel, group=group)
    dicts = [lay.to_dict() for lay in report.layers]
    seen = {m for lay in report.layers if lay.name in sel for m in lay.metrics} - exclude
    fit = {m: fitness_values(dicts, m, direction(m, info)) for m in seen}  # each metric as fitness
    per_metric: dict[str, dict[str, torch.Tensor]] = {}
    oracle: dict[str, torch.Tensor] = {}
    chosen: dict[str, list[int]] = {}
    signed: dict[str, list[float | None]] = {}  # each validated unit's loss change, for plots
    for lay in report.layers:
        if lay.name not in sel:
            continue
        idx = chosen[lay.name] = sel[lay.name] if sel[lay.name] is not None else list(range(lay.units))
        full = ab.delta(lay.name)
        oracle[lay.name] = full[idx].abs()
        signed[lay.name] = floats(full[idx])
        per_metric[lay.name] = {m: tensor([fit[m][lay.name][i] for i in idx]) for m in lay.metrics if m not in exclude}
    v = correlations(per_metric, oracle)
    kinds = {lay.name: kind_of_point(lay.activation_point_kind).name for lay in report.layers if lay.name in sel}
    by_kind = kind_correlations(per_metric, oracle, kinds) if wants_kinds(kinds) else None
    best = v["best"]
    rho = v["across_layers"].get(best, {}).get("spearman") if best else None
    return Validation(
        layers=_layer_validations(v, chosen, signed),
        across_layers={m: Correlation.from_dict(c) for m, c in v["across_layers"].items()}, best=best,
        random=RandomBaseline.from_dict(v["random"]), oracle=f"|ablation| ({mode} mode, exact)", seed=int(seed),
        recommendation=(f"for this model, rank by {best}: Spearman {rho:.2f} with exact ablation across layers"
                        if best and rho is not None else "no metric could be validated (too few units?)"),
        kinds=None if by_kind is None else {k: KindValidation.from_dict(d) for k, d in by_kind.items()})


def validate_report(report: AuditReport, *, graph, data, loss_fn, units: int | None, seed: int,
                    device, chunk_size: int | None, rank_auto: bool, top: int, progress=None,
                    group=None) -> AuditReport:
    """``report`` with its validation (``measure_validation``), ranked by the best metric when the
    ranking is ``auto``. ``report`` itself is not changed."""
    v = measure_validation(report, graph=graph, data=data, loss_fn=loss_fn, units=units, seed=seed, device=device,
                           chunk_size=chunk_size, progress=progress, group=group)
    return report.with_validation(v, rerank=rank_auto, top=top)


def block_validation(first: Any, names: list[str]) -> BlockValidation:
    """How well Block Influence and angular distance rank blocks like exact removal does (``first``:
    ``residual.measure`` with every block in place), beside a random order."""
    oracle = torch.tensor([abs(first.delta[n]) for n in names], dtype=torch.float64)
    scores = {key: Correlation.from_dict(correlation(torch.tensor([src.get(n, math.nan) for n in names],
                                                                  dtype=torch.float64), oracle))
              for key, src in (("block_influence", first.influence), ("angular_distance", first.angular))}
    return BlockValidation(oracle="|Δloss| with the block replaced by the identity", metrics=scores,
                           random=RandomStats.from_dict(random_baseline({"blocks": oracle})["across_layers"]))
