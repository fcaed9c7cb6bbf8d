"""``score --validate``: rank agreement of every metric with exact ablation, ``--rank-by auto``.

Every correlation in the report is recomputed here independently: the oracle comes from
``fitcli.api.ablate`` (zero mode, the same data) and the statistics from ``scipy.stats``
(``spearmanr``, ``kendalltau`` tau-b) and numpy, never from ``fitcli.validate``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import strapi as api
import torch
from scipy import stats

from fitcli import report as rep
from fitcli import validate as fv
from fitcli.errors import UsageError

TOL = 1e-9
EXCLUDE = {"ablation", "ablation_accuracy"}


# ---- helpers (independent re-implementations) ------------------------------------------------

def _kw(repo, truth, name: str) -> dict:
    t = truth[name]
    file, _, attr = t["arch"].rpartition(":")
    return {"arch": f"{repo / file}:{attr}", "data": str(repo / t["data"]), "device": "cpu"}


def _ckpt(repo, truth, name: str) -> str:
    return str(repo / truth[name]["checkpoint"])


def _arr(vals) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in vals], dtype=np.float64)


def _constant(x: np.ndarray) -> bool:
    return bool(np.all(x == x[0]))


def _overlap(m: np.ndarray, o: np.ndarray) -> float | None:
    n = len(m)
    if n < 2:
        return None
    k = max(1, round(0.1 * n))
    a = set(np.argsort(m, kind="stable")[:k].tolist())
    b = set(np.argsort(o, kind="stable")[:k].tolist())
    return len(a & b) / k


# which way is fit, from the metric spec (not from the code): APoZ and redundancy (R² of a unit
# rebuilt from the others: 1 = the least needed) are the "lower is fit" metrics
LOWER_IS_FIT = {"apoz", "redundancy"}


def _expected(metric: np.ndarray, oracle: np.ndarray) -> dict:
    ok = np.isfinite(metric) & np.isfinite(oracle)
    m, o = metric[ok], oracle[ok]
    n = len(m)
    if n < 2 or _constant(m) or _constant(o):
        sp = kt = None
    else:
        sp = float(stats.spearmanr(m, o).statistic)
        kt = float(stats.kendalltau(m, o, variant="b").statistic)
    return {"spearman": sp, "kendall": kt, "bottom10_overlap": _overlap(m, o), "units": int(n)}


def _close(got, want, what: str) -> None:
    if want is None or (isinstance(want, float) and math.isnan(want)):
        assert got is None, f"{what}: expected null (undefined), got {got}"
    else:
        assert got is not None, f"{what}: got null, expected {want}"
        assert abs(got - want) <= TOL, f"{what}: report {got!r} vs independent {want!r}"


def _check_corr(got: dict, want: dict, what: str) -> None:
    _close(got["spearman"], want["spearman"], f"{what} spearman")
    _close(got["kendall"], want["kendall"], f"{what} kendall")
    _close(got.get("bottom10_overlap"), want["bottom10_overlap"], f"{what} bottom10_overlap")
    assert got.get("units") == want["units"], f"{what} units {got.get('units')} != {want['units']}"


def _oracle_from_ablate(repo, truth, name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """|Δloss| per unit for every non-final layer, from a separate ``api.ablate`` run."""
    t = truth[name]
    layers = [n for n in t["layers"] if n != t["final"]]
    ab = api.ablate(_ckpt(repo, truth, name), layers=layers, mode="zero", seed=seed, **_kw(repo, truth, name))
    return {lay["name"]: np.abs(_arr(lay["metrics"]["ablation"])) for lay in ab["layers"]}


def _check_validation(report: dict, oracle: dict[str, np.ndarray], final: str) -> None:
    """Recompute every per-layer and across-layer number of report['validation']."""
    v = report["validation"]
    layers = [lay for lay in report["layers"] if lay["name"] in v["layers"]]
    assert [lay["name"] for lay in layers] == list(v["layers"])
    assert final not in v["layers"]
    assert set(v["layers"]) == set(oracle), "every non-final layer is validated"

    per_metric: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for lay in layers:
        name = lay["name"]
        vl = v["layers"][name]
        units = vl["units"]
        assert units == sorted(set(units)) and all(0 <= u < lay["units"] for u in units)
        assert set(vl["metrics"]) == set(lay["metrics"]) - EXCLUDE
        o = oracle[name][units]
        best_rho = None
        for m, vals in lay["metrics"].items():
            if m in EXCLUDE:
                continue
            x = _fit(report, m, vals)[units]  # the metric in its fitness orientation
            want = _expected(x, o)
            _check_corr(vl["metrics"][m], want, f"{name}/{m}")
            if want["spearman"] is not None:
                best_rho = want["spearman"] if best_rho is None else max(best_rho, want["spearman"])
            per_metric.setdefault(m, []).append((x, o))
        if best_rho is None:
            assert vl["best"] is None
        else:
            assert vl["best"] in vl["metrics"]
            assert abs(vl["metrics"][vl["best"]]["spearman"] - best_rho) <= TOL, f"{name}: best is not the max"

    # across layers: metric ℓ2-normalised per layer over the sampled (finite) units, oracle raw
    assert set(v["across_layers"]) == set(per_metric)
    best_rho = None
    for m, parts in per_metric.items():
        xs, os_ = [], []
        for x, o in parts:
            ok = np.isfinite(x) & np.isfinite(o)
            norm = float(np.sqrt(np.sum(x[ok] ** 2)))
            xs.append(np.where(ok, x / norm if norm > 0 else x * 0, np.nan))
            os_.append(o)
        want = _expected(np.concatenate(xs), np.concatenate(os_))
        _check_corr(v["across_layers"][m], want, f"across/{m}")
        if want["spearman"] is not None:
            best_rho = want["spearman"] if best_rho is None else max(best_rho, want["spearman"])
    assert best_rho is not None
    assert v["best"] in v["across_layers"]
    assert abs(v["across_layers"][v["best"]]["spearman"] - best_rho) <= TOL
    assert v["recommendation"] == (f"for this model, rank by {v['best']}: Spearman {best_rho:.2f} "
                                   "with exact ablation across layers")


def _fit(report: dict, metric: str, vals: list) -> np.ndarray:
    """A lower-is-fit metric reflected at its largest value over the non-final layers (max − m):
    higher is fit and the worst value is 0 in every layer. Others as they are."""
    x = _arr(vals)
    if metric not in LOWER_IS_FIT:
        return x
    top = max(v for lay in report["layers"] if not lay.get("final") and metric in lay["metrics"]
              for v in lay["metrics"][metric] if v is not None)
    return top - x


def _expected_ranked(report: dict, metric: str) -> list[tuple[str, int, float]]:
    rows = []
    for lay in report["layers"]:
        if lay.get("final") or metric not in lay["metrics"]:
            continue
        vals = [None if not np.isfinite(v) else float(v) for v in _fit(report, metric, lay["metrics"][metric])]
        norm = math.sqrt(sum(x * x for x in vals if x is not None))
        for i, x in enumerate(vals):
            if x is not None:
                rows.append((x / norm if norm > 0 else 0.0, lay["name"], i))
    rows.sort()
    return [(name, i, nv) for nv, name, i in rows]


# ---- module-scoped runs (the expensive part, done once) --------------------------------------

@pytest.fixture(scope="module")
def cnn_full(repo, truth):
    r = api.score(_ckpt(repo, truth, "cnn"), validate=True, **_kw(repo, truth, "cnn"))
    return r, _oracle_from_ablate(repo, truth, "cnn")


@pytest.fixture(scope="module")
def mlp_full(repo, truth):
    r = api.score(_ckpt(repo, truth, "mlp"), validate=True, **_kw(repo, truth, "mlp"))
    return r, _oracle_from_ablate(repo, truth, "mlp")


@pytest.fixture(scope="module")
def mlp_sampled(repo, truth):
    kw = _kw(repo, truth, "mlp")
    ck = _ckpt(repo, truth, "mlp")
    a = api.score(ck, validate=True, validate_units=8, seed=3, **kw)
    b = api.score(ck, validate=True, validate_units=8, seed=3, **kw)
    c = api.score(ck, validate=True, validate_units=8, seed=4, **kw)
    return a, b, c, _oracle_from_ablate(repo, truth, "mlp", seed=3)


# ---- 1. the validation section of real reports -----------------------------------------------

@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_validation_section_schema_and_shape(name, cnn_full, mlp_full, truth):
    report, _ = cnn_full if name == "cnn" else mlp_full
    assert "validation" in report
    rep.validate(report)  # the shipped JSON schema
    rep.validate(json.loads(rep.dumps(report)))  # and it survives strict JSON (no NaN)
    v = report["validation"]
    t = truth[name]
    assert set(v["layers"]) == {n for n in t["layers"] if n != t["final"]}
    for lname, vl in v["layers"].items():
        assert vl["units"] == list(range(t["layers"][lname])), "no --validate-units: every unit is ablated"
    assert v["seed"] == 0
    assert v["oracle"] == "|ablation| (zero mode, exact)"
    assert v["best"] is not None
    # without --rank-by auto the ranking metric is left alone
    assert report["settings"]["rank_by"] == "taylor"


def test_redundancy_is_validated_lower_is_fit(mlp_full, repo, truth):
    """With the default metrics, validation computes the opt-in redundancy too and ranks it in its
    declared direction: a unit the layer rebuilds (R² near 1) is the least needed, so per layer its
    Spearman is minus that of the raw R² with |Δloss|. A metric list asked for is kept as it is."""
    report, oracle = mlp_full
    assert "redundancy" in report["settings"]["metrics"]
    v = report["validation"]
    assert v["across_layers"]["redundancy"]["spearman"] is not None
    for lay in report["layers"]:
        if lay["name"] not in v["layers"]:
            continue
        r2 = _arr(lay["metrics"]["redundancy"])
        assert np.all((r2 >= -1e-9) & (r2 <= 1 + 1e-9))
        got = v["layers"][lay["name"]]["metrics"]["redundancy"]["spearman"]
        want = stats.spearmanr(r2, oracle[lay["name"]]).statistic
        assert abs(got + want) <= TOL, lay["name"]
    asked = api.score(_ckpt(repo, truth, "mlp"), validate=True, metrics=["act_mean"], **_kw(repo, truth, "mlp"))
    assert set(asked["validation"]["across_layers"]) == {"act_mean"}


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_correlations_match_scipy_and_independent_ablation(name, cnn_full, mlp_full, truth):
    report, oracle = cnn_full if name == "cnn" else mlp_full
    _check_validation(report, oracle, truth[name]["final"])


def test_sampled_units_correlations_match_full_ablation(mlp_sampled, truth):
    """With --validate-units the oracle of the sampled units equals full ablation at those units."""
    a, _, _, oracle = mlp_sampled
    rep.validate(a)
    for vl in a["validation"]["layers"].values():
        assert len(vl["units"]) == 8
    _check_validation(a, oracle, truth["mlp"]["final"])


def _brute_force_oracle(repo, truth, checkpoint: str) -> dict[str, np.ndarray]:
    """|Δ mean cross-entropy| when one unit of fc1/fc2 of the sample MLP is zeroed, one at a time,
    in float64, with a plain forward hook: no fitcli code involved."""
    import importlib.util

    from safetensors.torch import load_file

    spec = importlib.util.spec_from_file_location("_validate_models", repo / "sample_models" / "models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.mlp()
    model.load_state_dict(load_file(str(repo / checkpoint)))
    model = model.double().eval()
    d = load_file(str(repo / truth["mlp"]["data"]))
    x, y = d["inputs"].double(), d["targets"]
    with torch.no_grad():
        base = float(torch.nn.functional.cross_entropy(model(x), y))
        out = {}
        for name in ("fc1", "fc2"):
            layer = getattr(model, name)
            deltas = []
            for u in range(layer.out_features):
                def zero(_m, _i, o, u=u):
                    o = o.clone()
                    o[:, u] = 0.0  # relu(0) = 0: zeroing before the ReLU zeroes the activation point
                    return o
                h = layer.register_forward_hook(zero)
                try:
                    deltas.append(float(torch.nn.functional.cross_entropy(model(x), y)) - base)
                finally:
                    h.remove()
            out[name] = np.array(deltas)
    return out


def test_signed_oracle_brute_force_untrained_mlp(repo, truth):
    """Untrained weights: many units *lower* the loss when removed, so the oracle must be |Δloss|
    (not Δloss). Oracle from a brute-force loop written here."""
    ck = truth["mlp"]["baseline"]  # mlp_init.safetensors
    signed = _brute_force_oracle(repo, truth, ck)
    assert all((v < -1e-6).sum() >= 3 for v in signed.values()), "the case needs negative Δloss"
    ab = api.ablate(str(repo / ck), layers=["fc1", "fc2"], **_kw(repo, truth, "mlp"))
    for lay in ab["layers"]:  # fitcli's engine agrees with the brute force (float32 vs float64)
        np.testing.assert_allclose(_arr(lay["metrics"]["ablation"]), signed[lay["name"]], rtol=1e-4, atol=1e-6)
    report = api.score(str(repo / ck), validate=True, **_kw(repo, truth, "mlp"))
    rep.validate(report)
    _check_validation(report, {n: np.abs(v) for n, v in signed.items()}, truth["mlp"]["final"])


# ---- 2. pure functions of fitcli.validate ----------------------------------------------------

def test_identical_metric_scores_one():
    g = torch.Generator().manual_seed(0)
    o = torch.rand(200, generator=g, dtype=torch.float64)
    assert fv.spearman(o, o) == pytest.approx(1.0, abs=1e-12)
    assert fv.kendall(o, o) == pytest.approx(1.0, abs=1e-12)
    assert fv.bottom_overlap(o, o) == 1.0
    # a monotone transform is the same ranking
    assert fv.spearman(o * 3 + 7, o) == pytest.approx(1.0, abs=1e-12)
    assert fv.kendall(torch.exp(o), o) == pytest.approx(1.0, abs=1e-12)


def test_negated_metric_scores_minus_one():
    g = torch.Generator().manual_seed(1)
    o = torch.rand(200, generator=g, dtype=torch.float64)
    assert fv.spearman(-o, o) == pytest.approx(-1.0, abs=1e-12)
    assert fv.kendall(-o, o) == pytest.approx(-1.0, abs=1e-12)
    assert fv.bottom_overlap(-o, o) == 0.0  # bottom 10% of -o is the top 10% of o


def test_random_metric_scores_near_zero():
    g = torch.Generator().manual_seed(1234)
    o = torch.rand(5000, generator=g, dtype=torch.float64)
    m = torch.rand(5000, generator=g, dtype=torch.float64)
    rho, tau = fv.spearman(m, o), fv.kendall(m, o)
    assert abs(rho) < 0.05
    assert abs(tau) < 0.05
    assert abs(rho - stats.spearmanr(m.numpy(), o.numpy()).statistic) < 1e-12
    assert abs(tau - stats.kendalltau(m.numpy(), o.numpy()).statistic) < 1e-12
    assert fv.bottom_overlap(m, o) < 0.2  # chance level is 0.1


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("n", [2, 3, 7, 50, 601])
def test_spearman_kendall_match_scipy_with_ties(n, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 6, n).astype(np.float64)
    b = rng.integers(0, 6, n).astype(np.float64)
    if _constant(a) or _constant(b):
        a[0], a[-1], b[0], b[-1] = 0.0, 5.0, 5.0, 0.0
    sp = fv.spearman(torch.from_numpy(a), torch.from_numpy(b))
    kt = fv.kendall(torch.from_numpy(a), torch.from_numpy(b))
    assert abs(sp - stats.spearmanr(a, b).statistic) <= 1e-12
    assert abs(kt - stats.kendalltau(a, b, variant="b").statistic) <= 1e-12
    # mixed: ties only in one variable
    c = rng.standard_normal(n)
    kt2 = fv.kendall(torch.from_numpy(a), torch.from_numpy(c))
    assert abs(kt2 - stats.kendalltau(a, c, variant="b").statistic) <= 1e-12
    assert abs(fv.spearman(torch.from_numpy(c), torch.from_numpy(b)) - stats.spearmanr(c, b).statistic) <= 1e-12


def test_kendall_large_n_chunked_matches_scipy():
    """n above the 2e6/n chunk boundary: the chunked pair count must still be exact."""
    rng = np.random.default_rng(7)
    a = rng.integers(0, 20, 2100).astype(np.float64)
    b = a + rng.integers(0, 10, 2100)
    kt = fv.kendall(torch.from_numpy(a), torch.from_numpy(b))
    assert abs(kt - stats.kendalltau(a, b, variant="b").statistic) <= 1e-12


def test_undefined_correlations_are_none():
    c = torch.full((10,), 3.0, dtype=torch.float64)
    x = torch.arange(10, dtype=torch.float64)
    assert fv.spearman(c, x) is None and fv.kendall(c, x) is None
    assert fv.spearman(x, c) is None and fv.kendall(x, c) is None
    one = torch.tensor([1.0])
    assert fv.spearman(one, one) is None and fv.kendall(one, one) is None
    assert fv.bottom_overlap(one, one) is None


@pytest.mark.parametrize("seed", [0, 5])
def test_rankdata_matches_scipy_average(seed):
    rng = np.random.default_rng(seed)
    for x in (rng.integers(0, 6, 300).astype(np.float64), rng.standard_normal(100),
              np.array([2.0, 2.0, 2.0]), np.array([1.0]), np.array([-0.0, 0.0, 1.0, -1.0, 1.0])):
        got = fv.rankdata(torch.from_numpy(x)).numpy()
        np.testing.assert_array_equal(got, stats.rankdata(x, method="average"))


def test_bottom_overlap_k_and_ties():
    # n = 30 -> k = 3; metric bottom-3 = {0,1,2}; oracle bottom-3 = {0,1,5}
    m = torch.arange(30, dtype=torch.float64)
    o = torch.arange(30, dtype=torch.float64)
    o[2], o[5] = 100.0, 1.5
    assert fv.bottom_overlap(m, o) == pytest.approx(2 / 3)
    # n = 4 -> k = max(1, round(0.4)) = 1; ties broken by stable order (unit 0 first)
    assert fv.bottom_overlap(torch.zeros(4), torch.tensor([0.0, 1.0, 2.0, 3.0])) == 1.0
    assert fv.bottom_overlap(torch.zeros(4), torch.tensor([3.0, 0.0, 2.0, 1.0])) == 0.0


def test_correlations_across_layers_normalises_per_layer():
    """Two layers on very different scales: per-layer ℓ2 normalisation changes the pooled ranking."""
    g = torch.Generator().manual_seed(3)
    o1, o2 = torch.rand(20, generator=g, dtype=torch.float64), torch.rand(30, generator=g, dtype=torch.float64)
    m1, m2 = o1 * 1000 + torch.rand(20, generator=g, dtype=torch.float64), o2 * 0.001
    out = fv.correlations({"a": {"m": m1, "id": o1}, "b": {"m": m2, "id": o2}}, {"a": o1, "b": o2})
    x = np.concatenate([(m1 / m1.norm()).numpy(), (m2 / m2.norm()).numpy()])
    o = np.concatenate([o1.numpy(), o2.numpy()])
    assert abs(out["across_layers"]["m"]["spearman"] - stats.spearmanr(x, o).statistic) <= 1e-12
    assert abs(out["across_layers"]["m"]["kendall"] - stats.kendalltau(x, o).statistic) <= 1e-12
    assert out["layers"]["b"]["metrics"]["m"]["spearman"] == pytest.approx(1.0)
    assert out["layers"]["a"]["best"] in ("id", "m")
    top = max(c["spearman"] for c in out["across_layers"].values())
    assert out["across_layers"][out["best"]]["spearman"] == top
    # pooling the raw values (no per-layer normalisation) would rank far worse
    raw = stats.spearmanr(np.concatenate([m1.numpy(), m2.numpy()]), o).statistic
    assert out["across_layers"]["m"]["spearman"] > raw + 0.3


def test_correlations_constant_and_nan_metrics():
    """A constant metric has no rank correlation (null), NaN units are left out, and neither is best."""
    o = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2], dtype=torch.float64)
    const = torch.full((6,), 2.0, dtype=torch.float64)
    holes = torch.tensor([1.0, float("nan"), 3.0, 2.0, float("nan"), 0.5], dtype=torch.float64)
    out = fv.correlations({"a": {"const": const, "holes": holes}}, {"a": o})
    c = out["layers"]["a"]["metrics"]["const"]
    assert c["spearman"] is None and c["kendall"] is None and c["units"] == 6
    h = out["layers"]["a"]["metrics"]["holes"]
    keep = [0, 2, 3, 5]
    assert h["units"] == 4
    assert abs(h["spearman"] - stats.spearmanr(holes[keep].numpy(), o[keep].numpy()).statistic) <= 1e-12
    assert abs(h["kendall"] - stats.kendalltau(holes[keep].numpy(), o[keep].numpy()).statistic) <= 1e-12
    assert out["layers"]["a"]["best"] == "holes" and out["best"] == "holes"
    assert out["across_layers"]["const"]["spearman"] is None
    none = fv.correlations({"a": {"const": const}}, {"a": o})
    assert none["best"] is None and none["layers"]["a"]["best"] is None


# ---- 3. stratified sampling ------------------------------------------------------------------

def test_stratified_units_reproducible_distinct_sorted():
    vals = torch.randperm(100, generator=torch.Generator().manual_seed(0)).double().tolist()
    a = fv.stratified_units(vals, 10, seed=7)
    b = fv.stratified_units(vals, 10, seed=7)
    c = fv.stratified_units(vals, 10, seed=8)
    assert a == b
    assert a != c
    for s in (a, c):
        assert len(s) == 10 and len(set(s)) == 10 and s == sorted(s)
        assert all(0 <= i < 100 for i in s)


@pytest.mark.parametrize("n,k", [(100, 10), (37, 5), (16, 8), (9, 8), (50, 2)])
def test_stratified_units_one_per_stratum(n, k):
    g = torch.Generator().manual_seed(n * 31 + k)
    vals = (torch.randperm(n, generator=g).double() * 0.37 - 5).tolist()  # distinct values
    order = sorted(range(n), key=lambda i: vals[i])
    for seed in range(5):
        picks = fv.stratified_units(vals, k, seed)
        assert len(picks) == k and len(set(picks)) == k and picks == sorted(picks)
        for s in range(k):
            stratum = set(order[(s * n) // k: ((s + 1) * n) // k])
            assert len(stratum & set(picks)) == 1, f"stratum {s} of {k} (n={n}, seed={seed})"


def test_stratified_units_all_when_k_at_least_n():
    vals = [3.0, 1.0, None, 2.0, float("nan")]
    assert fv.stratified_units(vals, 5, 0) == [0, 1, 2, 3, 4]
    assert fv.stratified_units(vals, 50, 9) == [0, 1, 2, 3, 4]


def test_stratified_units_nonfinite_values_sort_last():
    vals = [None, float("nan"), 0.5, 0.1, 0.9, 0.3]
    picks = fv.stratified_units(vals, 3, 0)
    # strata over the order [3, 5, 2, 4, 0, 1]: {3,5}, {2,4}, {0,1}
    assert len(picks) == 3
    assert len({3, 5} & set(picks)) == 1 and len({2, 4} & set(picks)) == 1 and len({0, 1} & set(picks)) == 1


def test_api_validate_units_seeded(mlp_sampled, truth):
    a, b, c, _ = mlp_sampled
    va, vb, vc = a["validation"], b["validation"], c["validation"]
    assert va["seed"] == 3 and vc["seed"] == 4
    assert {n: x["units"] for n, x in va["layers"].items()} == {n: x["units"] for n, x in vb["layers"].items()}
    assert va["layers"] == vb["layers"]
    assert va["across_layers"] == vb["across_layers"]
    assert va["best"] == vb["best"]
    big = [n for n, u in truth["mlp"]["layers"].items() if n != truth["mlp"]["final"] and u > 8]
    assert big
    assert any(va["layers"][n]["units"] != vc["layers"][n]["units"] for n in big)
    for n in big:
        for v, r in ((va, a), (vc, c)):
            units = v["layers"][n]["units"]
            assert len(units) == 8 and len(set(units)) == 8 and units == sorted(units)
            # the sample is stratified over the report's ranking metric
            lay = next(x for x in r["layers"] if x["name"] == n)
            basis = lay["metrics"][r["settings"]["rank_by"]]
            assert units == fv.stratified_units(basis, 8, v["seed"])
            for m in v["layers"][n]["metrics"].values():
                assert m["units"] <= 8


# ---- 4. the CLI ------------------------------------------------------------------------------

def _cli_args(truth, name: str) -> list[str]:
    t = truth[name]
    return ["score", t["checkpoint"], "--arch", t["arch"], "--data", t["data"], "--device", "cpu"]


def test_cli_rank_by_auto_json(run_cli, in_repo, truth):
    res = run_cli(_cli_args(truth, "cnn") + ["--validate", "--rank-by", "auto", "--format", "json",
                                              "--top", "200", "--quiet"])
    assert res.code == 0, res.stderr
    report = json.loads(res.stdout)
    rep.validate(report)
    best = report["validation"]["best"]
    assert best is not None
    assert report["settings"]["rank_by"] == best
    want = _expected_ranked(report, best)
    got = report["ranked"]
    assert len(got) == len(want) > 0
    assert [(r["layer"], r["unit"]) for r in got] == [(n, i) for n, i, _ in want]
    for r, (_, _, nv) in zip(got, want, strict=False):
        assert r["normalized"] == pytest.approx(nv, abs=1e-12)
    norms = [r["normalized"] for r in got]
    assert norms == sorted(norms)
    assert report["validation"]["recommendation"].startswith(f"for this model, rank by {best}:")


def test_api_rank_by_auto_changes_ranking(cnn_full, repo, truth):
    """--rank-by auto re-ranks by the validated best, not by the default metric."""
    report = api.score(_ckpt(repo, truth, "cnn"), validate=True, rank_by="auto", top=500, **_kw(repo, truth, "cnn"))
    best = report["validation"]["best"]
    assert best == cnn_full[0]["validation"]["best"]
    assert report["settings"]["rank_by"] == best
    assert [(r["layer"], r["unit"]) for r in report["ranked"]] == [(n, i) for n, i, _ in _expected_ranked(report, best)]


def test_cli_rank_by_auto_needs_validate(run_cli, in_repo, truth):
    res = run_cli(_cli_args(truth, "mlp") + ["--rank-by", "auto", "--format", "json"])
    assert res.code == 2
    assert res.stdout == ""
    assert "--validate" in res.stderr


def test_api_rank_by_auto_needs_validate(repo, truth):
    with pytest.raises(UsageError):
        api.score(_ckpt(repo, truth, "mlp"), rank_by="auto", **_kw(repo, truth, "mlp"))


def test_cli_validate_table_has_recommendation(run_cli, in_repo, truth):
    res = run_cli(_cli_args(truth, "mlp") + ["--validate", "--quiet"])
    assert res.code == 0, res.stderr
    lines = res.stdout.splitlines()
    rec = [ln for ln in lines if ln.startswith("for this model, rank by")]
    assert len(rec) == 1, res.stdout
    assert "Spearman" in rec[0] and "exact ablation" in rec[0]
    assert any("Validation: Spearman rank correlation with |ablation|" in ln for ln in lines)
    assert any("across layers" in ln for ln in lines)


def test_cli_validate_markdown_table(run_cli, in_repo, truth):
    res = run_cli(_cli_args(truth, "mlp") + ["--validate", "--format", "markdown", "--quiet"])
    assert res.code == 0, res.stderr
    md = res.stdout
    assert "Validation (Spearman with |ablation| (zero mode, exact)):" in md
    lines = md.splitlines()
    head = "| metric | fc1 | fc2 | across layers |"
    assert head in lines
    i = lines.index(head)
    assert lines[i + 1] == "|---|---:|---:|---:|"
    rows = {}
    for ln in lines[i + 2:]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    # cross-check the cells against the JSON report of the same run
    res_j = run_cli(_cli_args(truth, "mlp") + ["--validate", "--format", "json", "--quiet"])
    v = json.loads(res_j.stdout)["validation"]
    assert set(rows) == set(v["across_layers"])
    for m, cells in rows.items():
        a = v["across_layers"][m]["spearman"]
        want = "n/a" if a is None else f"{a:+.2f}"
        assert cells[-1].strip("*") == want
        assert cells[-1].startswith("**") == (m == v["best"])
        for name, cell in zip(["fc1", "fc2"], cells[:2], strict=False):
            s = v["layers"][name]["metrics"][m]["spearman"]
            assert cell.strip("*") == ("n/a" if s is None else f"{s:+.2f}")
    assert any(ln.startswith("for this model, rank by") for ln in lines)


# ---- per unit kind, on a transformer -----------------------------------------------------------

def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    m = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=32,
                                                 max_position_embeddings=32, num_labels=3,
                                                 initializer_range=0.3)).eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 50, (8, 7), generator=g)
    data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 3, (8,), generator=g)}]
    heads = [f"bert.encoder.layer.{i}.attention.self.heads" for i in range(2)]
    mlp = [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(2)]
    return m, data, heads, mlp


def test_validation_per_kind_on_a_transformer():
    """Heads and MLP channels validated together: one summary per kind, each metric's correlation
    over the kind's layers only (values ℓ2-normalised per layer), recomputed here with scipy from
    the report's metrics and a separate exact ablation, beside a random order on the same units."""
    pytest.importorskip("transformers")
    import fitcli

    m, data, heads, mlp = _tiny_bert()
    report = fitcli.audit(m, data, device="cpu", layers=heads + mlp, validate=True).to_dict()
    rep.validate(json.loads(rep.dumps(report)))  # the shipped JSON schema, strict JSON
    ab = fitcli.ablate(m, data, layers=heads + mlp, device="cpu").to_dict()
    oracle = {lay["name"]: np.abs(_arr(lay["metrics"]["ablation"])) for lay in ab["layers"]}
    kinds = report["validation"]["kinds"]
    assert set(kinds) == {"heads", "mlp"}  # the kinds of the tables: heads and MLP channels
    by_name = {lay["name"]: lay for lay in report["layers"]}
    for kind, names in (("heads", heads), ("mlp", mlp)):
        k = kinds[kind]
        assert k["layers"] == names
        assert set(k["metrics"]) == set(by_name[names[0]]["metrics"]) - EXCLUDE
        best = None
        for metric, got in k["metrics"].items():
            xs, os_ = [], []
            for n in names:
                x = _fit(report, metric, by_name[n]["metrics"][metric])
                ok = np.isfinite(x) & np.isfinite(oracle[n])
                norm = float(np.sqrt(np.sum(x[ok] ** 2)))
                xs.append(np.where(ok, x / norm if norm > 0 else x * 0, np.nan))
                os_.append(oracle[n])
            want = _expected(np.concatenate(xs), np.concatenate(os_))
            _check_corr(got, want, f"{kind}/{metric}")
            if want["spearman"] is not None and (best is None or want["spearman"] > best):
                best = want["spearman"]
        assert abs(k["metrics"][k["best"]]["spearman"] - best) <= TOL
        units = sum(by_name[n]["units"] for n in names)
        assert k["random"]["units"] == units and k["random"]["draws"] == fv.RANDOM_DRAWS
        assert abs(k["random"]["spearman"]) < 0.5  # a random order: near 0 (200 draws over few units)
    assert kinds["heads"]["random"]["units"] == 8 and kinds["mlp"]["random"]["units"] == 64


def test_validation_of_one_kind_has_no_per_kind_block(cnn_full):
    """A CNN's validation is as before: no per-kind block (its JSON keeps its bytes)."""
    report, _ = cnn_full
    assert "kinds" not in report["validation"]
