"""Every metric on every sample model against values computed independently in the test.

The expected values never go through fitcli's engine or metric classes: the sample models are
rebuilt from ``sample_models/models.py``, the activation points (``truth.json``) are read with a
functional re-implementation of the forward (mlp, cnn) or forward hooks on the model's own
modules (resmlp), and every statistic is a plain loop / tensor expression over the data,
following ``docs/metrics.md`` literally. Per-sample gradients come from a loop over samples, each
with its own loss (float64 copy of the model).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import strapi as api
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from fitcli.metrics.activations import ActMean
from fitcli.metrics.base import Metric
from fitcli.metrics.registry import load_registry
from fitcli.testing import check_metric

REPO = Path(__file__).resolve().parents[1]
MODELS = ("mlp", "cnn", "resmlp")
RTOL = 1e-5
ATOL = 1e-7
BATCH = 64  # fitcli's default --batch-size: grad_norm is defined per batch

# consumer of each unit through elementwise ops only (weight_norm_out); absent for the others
CONSUMERS = {
    "mlp": {"fc1": "fc2", "fc2": "fc3"},
    "cnn": {"conv1": "conv2", "fc1": "fc2"},  # conv2 -> avg-pool (not elementwise): unknown
    "resmlp": {"blocks.0.fc_in": "blocks.0.fc_out", "blocks.1.fc_in": "blocks.1.fc_out"},
}
COMPOSITE_WEIGHTS = {"weight_norm": 0.4, "grad_norm": 0.4, "act_mean": 0.2}


@pytest.fixture(scope="module")
def _truth() -> dict:
    return json.loads((REPO / "sample_models" / "truth.json").read_text())


def _import_models():
    path = REPO / "sample_models" / "models.py"
    spec = importlib.util.spec_from_file_location("_sample_models_for_metric_tests", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- independent forward passes that expose every activation point -----------------------------


def _units_view(h: torch.Tensor, kind: str) -> torch.Tensor:
    """-> [batch, units, positions]."""
    if kind == "conv":
        return h.flatten(2)
    if h.dim() == 2:
        return h.unsqueeze(-1)
    return h.transpose(1, 2)  # [batch, seq, units] -> [batch, units, seq]


def _forward_mlp(model, x):
    sd = {k: v for k, v in model.named_parameters()}
    h1 = F.linear(x, sd["fc1.weight"], sd["fc1.bias"]).relu()
    h2 = F.linear(h1, sd["fc2.weight"], sd["fc2.bias"]).relu()
    out = F.linear(h2, sd["fc3.weight"], sd["fc3.bias"])
    return out, {"fc1": (h1, "lin"), "fc2": (h2, "lin"), "fc3": (out, "lin")}


def _forward_cnn(model, x):
    sd = {k: v for k, v in model.named_parameters()}
    c1 = F.conv2d(x, sd["conv1.weight"], sd["conv1.bias"], padding=1).relu()
    c2 = F.conv2d(c1, sd["conv2.weight"], sd["conv2.bias"], padding=1).relu()
    pooled = c2.mean(dim=(2, 3))
    f1 = F.linear(pooled, sd["fc1.weight"], sd["fc1.bias"]).relu()
    out = F.linear(f1, sd["fc2.weight"], sd["fc2.bias"])
    return out, {"conv1": (c1, "conv"), "conv2": (c2, "conv"), "fc1": (f1, "lin"), "fc2": (out, "lin")}


def _forward_resmlp(model, x):
    """The model's own forward; hooks read embed/fc_out/head outputs and, as the input of
    fc_out, the GELU output of fc_in (the activation point of fc_in)."""
    got: dict[str, torch.Tensor] = {}
    mods = dict(model.named_modules())
    handles = []

    def out_hook(name):
        def fn(m, i, o):
            got[name] = o
        return fn

    def in_hook(name):
        def fn(m, args):
            got[name] = args[0]
        return fn

    try:
        for name in ("embed", "blocks.0.fc_out", "blocks.1.fc_out", "head"):
            handles.append(mods[name].register_forward_hook(out_hook(name)))
        for b in (0, 1):
            handles.append(mods[f"blocks.{b}.fc_out"].register_forward_pre_hook(in_hook(f"blocks.{b}.fc_in")))
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, {k: (v, "lin") for k, v in got.items()}


FORWARD = {"mlp": _forward_mlp, "cnn": _forward_cnn, "resmlp": _forward_resmlp}


def _points(name, model, x):
    out, raw = FORWARD[name](model, x)
    return out, {k: _units_view(h, kind) for k, (h, kind) in raw.items()}


# ---- the reference: every metric straight from its definition -----------------------------------


def _rownorm(w: torch.Tensor) -> torch.Tensor:
    w = w.detach().to(torch.float64)
    return torch.stack([w[i].flatten().pow(2).sum().sqrt() for i in range(w.shape[0])])


def _entropy(h_unit: torch.Tensor, values: torch.Tensor | None = None, bins: int = 20) -> float:
    """Entropy (nats) of a 20-bin equal-width histogram over the unit's own [min, max].

    ``values``: the same observations read on a second pass (equal up to float noise). The bin
    index is computed in the tensor's dtype: pass float32 values for histc's float32 arithmetic."""
    lo, hi = float(h_unit.min()), float(h_unit.max())
    if hi == lo:
        return 0.0
    v = h_unit if values is None else values
    v = v.clamp(lo, hi)
    counts = torch.histc(v, bins=bins, min=lo, max=hi)  # the max value lands in the last bin
    assert int(counts.sum()) == h_unit.numel()
    p = counts.double() / counts.sum().double()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def _reference(name: str, truth: dict) -> dict[str, dict[str, torch.Tensor]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny ops: one thread is much faster on a busy machine
    try:
        return _reference_values(name, truth)
    finally:
        torch.set_num_threads(threads)


def _reference_values(name: str, truth: dict) -> dict[str, dict[str, torch.Tensor]]:
    info = truth[name]
    models = _import_models()
    model = getattr(models, name)()
    model.load_state_dict(load_file(str(REPO / info["checkpoint"])))
    model.eval()
    base = load_file(str(REPO / info["baseline"]))
    data = load_file(str(REPO / info["data"]))
    x, y = data["inputs"], data["targets"]
    n = x.shape[0]
    layers = list(info["layers"])
    params = dict(model.named_parameters())

    # Activations in float32, batched like the data file is read. Read twice, like an audit
    # does: with autograd on (statistics, histogram range) and off (histogram counts). For resmlp
    # nn.MultiheadAttention takes a different kernel without autograd, so the two can differ in
    # the last bits; reading both keeps the comparison exact instead of loosening tolerances.
    acts, acts_nograd, logits = {lay: [] for lay in layers}, {lay: [] for lay in layers}, []
    for i in range(0, n, BATCH):
        out, hs = _points(name, model, x[i:i + BATCH])
        logits.append(out.detach())
        for lay in layers:
            acts[lay].append(hs[lay].detach().to(torch.float64))
        with torch.no_grad():
            _, hs = _points(name, model, x[i:i + BATCH])
        for lay in layers:
            acts_nograd[lay].append(hs[lay].to(torch.float64))
    acts = {lay: torch.cat(v) for lay, v in acts.items()}  # [N, units, positions]
    acts_nograd = {lay: torch.cat(v) for lay, v in acts_nograd.items()}
    correct = torch.cat(logits).argmax(dim=1) == y

    # per-sample loss gradients at each activation point (float64 copy, one sample at a time)
    m64 = copy.deepcopy(model).double()
    hg = {lay: torch.zeros(n, info["layers"][lay], dtype=torch.float64) for lay in layers}
    for s in range(n):
        out, raw = FORWARD[name](m64, x[s:s + 1].double())
        loss = F.cross_entropy(out, y[s:s + 1])
        grads = torch.autograd.grad(loss, [raw[lay][0] for lay in layers])
        for lay, g in zip(layers, grads, strict=True):
            h, kind = raw[lay]
            hg[lay][s] = (_units_view(h.detach(), kind) * _units_view(g, kind))[0].sum(dim=-1)

    # grad_norm: mean over batches of the row norm of d(batch-mean loss)/dW
    p64 = dict(m64.named_parameters())
    gsum = {lay: torch.zeros(info["layers"][lay], dtype=torch.float64) for lay in layers}
    nb = 0
    for i in range(0, n, BATCH):
        out, _ = _points(name, m64, x[i:i + BATCH].double())
        loss = F.cross_entropy(out, y[i:i + BATCH])  # mean over the batch
        ws = torch.autograd.grad(loss, [p64[f"{lay}.weight"] for lay in layers])
        for lay, gw in zip(layers, ws, strict=True):
            gsum[lay] += _rownorm(gw)
        nb += 1

    ref: dict[str, dict[str, torch.Tensor]] = {}
    for lay in layers:
        w = params[f"{lay}.weight"].detach().to(torch.float64)
        w0 = base[f"{lay}.weight"].to(torch.float64)
        h = acts[lay]
        units = h.shape[1]
        obs = [h[:, u, :].flatten() for u in range(units)]  # every (sample, position)
        obs2 = [acts_nograd[lay][:, u, :].flatten() for u in range(units)]
        r = {
            "weight_norm": _rownorm(w),
            "weight_change": _rownorm(w - w0),
            # 0/0 -> NaN (null in JSON) for units planted with all-zero initial weights
            "weight_change_rel": _rownorm(w - w0) / _rownorm(w0),
            "grad_norm": gsum[lay] / nb,
            "act_mean": torch.tensor([o.abs().mean().item() for o in obs], dtype=torch.float64),
            "act_var": torch.tensor([((o - o.mean()) ** 2).mean().item() for o in obs], dtype=torch.float64),
            "act_entropy": torch.tensor([_entropy(o, o2) for o, o2 in zip(obs, obs2, strict=True)], dtype=torch.float64),
            # an observation within float32 rounding of a bin edge may be binned either way: the
            # same histogram with the bin index computed in float32 (torch.histc on the raw
            # activations) is accepted as well
            "_alt_act_entropy": torch.tensor([_entropy(o.float(), o2.float()) for o, o2 in zip(obs, obs2, strict=True)],
                                             dtype=torch.float64),
            "apoz": torch.tensor([(o == 0).double().mean().item() for o in obs], dtype=torch.float64),
            "taylor": hg[lay].abs().mean(dim=0),
            "taylor_delta": -hg[lay].mean(dim=0),
        }
        r["dormant"] = r["act_mean"] / r["act_mean"].mean()
        hbar = h.mean(dim=2)  # [N, units]
        r["output_corr"] = hbar[correct].mean(dim=0) - hbar[~correct].mean(dim=0)
        if lay in CONSUMERS[name]:
            wn = params[f"{CONSUMERS[name][lay]}.weight"].detach().to(torch.float64)
            r["weight_norm_out"] = torch.stack([wn[:, i].flatten().norm() for i in range(units)])
        # scales for signed quantities whose value may cancel (error is relative to the terms)
        r["_scale_taylor_delta"] = r["taylor"]
        r["_scale_output_corr"] = hbar.abs().mean(dim=0)
        ref[lay] = r
    # composite: Σ w_k m_k / mean_layer(m_k)
    for lay in layers:
        ref[lay]["composite"] = sum(
            wk * ref[lay][k] / ref[lay][k].mean() for k, wk in COMPOSITE_WEIGHTS.items())
    return ref


@pytest.fixture(scope="module")
def _scored(_truth):
    """model -> (report with baseline, independent reference)."""
    out = {}
    for name in MODELS:
        info = _truth[name]
        # every Linear/Conv layer of truth.json: for the resmlp (a transformer), its MLP channels and rows
        report = api.score(str(REPO / info["checkpoint"]), arch=str(REPO / info["arch"]),
                           data=str(REPO / info["data"]), baseline=str(REPO / info["baseline"]),
                           device="cpu", kinds=["mlp", "rows"] if name == "resmlp" else None)
        out[name] = (report, _reference(name, _truth))
    return out


SIMPLE = ["weight_norm", "weight_change", "weight_change_rel", "grad_norm", "act_mean", "act_var",
          "act_entropy", "apoz", "dormant", "taylor", "composite"]
SIGNED = ["taylor_delta", "output_corr"]


def _layer(report: dict, name: str) -> dict:
    return next(lay for lay in report["layers"] if lay["name"] == name)


def _assert_close(got: list, want: torch.Tensor, what: str, scale: torch.Tensor | None = None,
                  alt: torch.Tensor | None = None) -> None:
    assert got is not None, f"{what}: missing"
    assert len(got) == want.numel(), f"{what}: {len(got)} values for {want.numel()} units"
    expect_null = [i for i in range(len(got)) if not math.isfinite(float(want[i]))]
    got_null = [i for i, v in enumerate(got) if v is None]
    assert got_null == expect_null, f"{what}: null (non-finite) at units {got_null}, expected at {expect_null}"
    g = torch.tensor([0.0 if v is None else v for v in got], dtype=torch.float64)
    want = torch.nan_to_num(want.to(torch.float64), nan=0.0)
    if alt is not None:  # per unit, the accepted alternative closest to what fitcli reports
        alt = torch.nan_to_num(alt.to(torch.float64), nan=0.0)
        want = torch.where((g - alt).abs() < (g - want).abs(), alt, want)
    tol = ATOL + RTOL * want.abs()
    if scale is not None:
        tol = tol + RTOL * scale
    bad = [(i, float(g[i]), float(want[i])) for i in range(len(got)) if abs(g[i] - want[i]) > tol[i]]
    assert not bad, f"{what}: (unit, fitcli, expected) differ: {bad[:6]}"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("metric", SIMPLE + SIGNED + ["weight_norm_out"])
def test_metric_matches_independent_computation(_scored, _truth, model, metric):
    report, ref = _scored[model]
    assert [lay["name"] for lay in report["layers"]] == list(_truth[model]["layers"])
    for lay in report["layers"]:
        want = ref[lay["name"]]
        if metric == "weight_norm_out" and lay["name"] not in CONSUMERS[model]:
            assert metric not in lay["metrics"], f"{model} {lay['name']}: consumer is unknown, yet {metric} is reported"
            continue
        _assert_close(lay["metrics"].get(metric), want[metric], f"{model} {lay['name']} {metric}",
                      scale=want.get(f"_scale_{metric}"), alt=want.get(f"_alt_{metric}"))


@pytest.mark.parametrize("model", MODELS)
def test_activation_points_as_in_truth(_scored, _truth, model):
    report, _ = _scored[model]
    got = {lay["name"]: lay["activation_point"] for lay in report["layers"]}
    assert got == _truth[model]["activation_points"]


@pytest.mark.parametrize("model", MODELS)
def test_dead_sets_match_truth_and_final_layer_is_excluded(_scored, _truth, model):
    report, _ = _scored[model]
    info = _truth[model]
    got = {lay["name"]: lay["dead"] for lay in report["layers"] if not lay.get("final")}
    assert got == info["dead"]
    final = _layer(report, info["final"])
    assert final["final"] is True and final["dead"] == []
    hidden_units = sum(u for lay, u in info["layers"].items() if lay != info["final"])
    n_dead = sum(len(v) for v in info["dead"].values())
    assert report["summary"]["units"] == hidden_units
    assert report["summary"]["dead"] == n_dead
    assert report["summary"]["dead_fraction"] == pytest.approx(n_dead / hidden_units)
    for lay, dead in info["dead"].items():
        entry = _layer(report, lay)
        assert entry["dead_fraction"] == pytest.approx(len(dead) / info["layers"][lay])
        for u in dead:  # exactly silent: every activation statistic is exactly 0 / 1
            assert entry["metrics"]["act_mean"][u] == 0.0
            assert entry["metrics"]["apoz"][u] == 1.0
            assert entry["metrics"]["taylor"][u] == 0.0


@pytest.mark.parametrize("model", MODELS)
def test_constant_unit_has_no_variance_and_no_entropy(_scored, _truth, model):
    report, _ = _scored[model]
    c = _truth[model]["constant"]
    lay = _layer(report, c["layer"])
    assert lay["metrics"]["act_var"][c["unit"]] == pytest.approx(0.0, abs=1e-9)
    assert lay["metrics"]["act_entropy"][c["unit"]] == 0.0
    assert lay["metrics"]["act_mean"][c["unit"]] == pytest.approx(c["value"], rel=1e-5)
    assert lay["metrics"]["apoz"][c["unit"]] == 0.0
    assert c["unit"] not in lay["dead"]


@pytest.mark.parametrize("model", MODELS)
def test_dormant_layer_mean_is_one(_scored, model):
    report, _ = _scored[model]
    for lay in report["layers"]:
        d = lay["metrics"]["dormant"]  # as written: each within 2**-23 of the exact value (docs/report.md)
        assert sum(d) / len(d) == pytest.approx(1.0, rel=1.2e-7)


@pytest.mark.parametrize("model", MODELS)
def test_composite_reports_its_components(_scored, model):
    report, _ = _scored[model]
    layers_info = report["metric_info"]["composite"]["layers"]
    for lay in report["layers"]:
        assert sorted(layers_info[lay["name"]]["components"]) == sorted(COMPOSITE_WEIGHTS)


# ---- taylor_delta is exact when the loss is linear in the unit ----------------------------------

TINY = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.act = nn.ReLU()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.act(self.fc1(x)))


def tiny():
    return Tiny()


def sum_loss(outputs, targets):
    return outputs.sum(dim=1)  # per-sample loss, linear in every hidden activation
'''


def test_taylor_delta_equals_exact_ablation_for_a_linear_loss(tmp_path):
    (tmp_path / "tiny.py").write_text(TINY)
    spec = importlib.util.spec_from_file_location("_tiny_for_taylor_delta", tmp_path / "tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(3)
    model = mod.tiny()
    with torch.no_grad():
        model.fc1.bias[2] = -100.0  # one dead unit too
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "tiny.safetensors"))
    x = torch.randn(50, 4)
    save_file({"inputs": x}, str(tmp_path / "data.safetensors"))

    report = api.score(str(tmp_path / "tiny.safetensors"), arch=f"{tmp_path / 'tiny.py'}:tiny",
                       data=str(tmp_path / "data.safetensors"), loss=f"{tmp_path / 'tiny.py'}:sum_loss",
                       metrics=["taylor_delta", "ablation"], batch_size=16, device="cpu")
    hidden = _layer(report, "fc1")
    assert hidden["activation_point"] == "act"

    def mean_loss(unit: int | None) -> float:
        def zero(m, i, o):
            o = o.clone()
            o[:, unit] = 0.0
            return o
        handle = model.act.register_forward_hook(zero) if unit is not None else None
        try:
            with torch.no_grad():
                return float(model(x).double().sum(dim=1).mean())
        finally:
            if handle is not None:
                handle.remove()

    base = mean_loss(None)
    exact = torch.tensor([mean_loss(u) - base for u in range(6)], dtype=torch.float64)
    assert exact.abs().max() > 1e-2  # the check is not vacuous
    assert exact[2] == 0.0
    got = torch.tensor(hidden["metrics"]["taylor_delta"], dtype=torch.float64)
    assert torch.allclose(got, exact, rtol=1e-5, atol=1e-5), (got.tolist(), exact.tolist())
    abl = torch.tensor(hidden["metrics"]["ablation"], dtype=torch.float64)
    assert torch.allclose(abl, exact, rtol=1e-5, atol=1e-5), (abl.tolist(), exact.tolist())


# ---- batch size ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["mlp", "resmlp"])
def test_batch_size_does_not_change_metrics_except_grad_norm(_truth, model):
    info = _truth[model]
    kw = dict(arch=str(REPO / info["arch"]), data=str(REPO / info["data"]),
              baseline=str(REPO / info["baseline"]), device="cpu")
    big = api.score(str(REPO / info["checkpoint"]), batch_size=64, **kw)
    small = api.score(str(REPO / info["checkpoint"]), batch_size=7, **kw)
    assert big["data"]["batches"] == 8 and small["data"]["batches"] == math.ceil(512 / 7)
    assert big["settings"]["metrics"] == small["settings"]["metrics"]
    differs = []
    for lb, ls in zip(big["layers"], small["layers"], strict=True):
        for metric in big["settings"]["metrics"]:
            if metric in ("grad_norm", "composite"):
                continue  # grad_norm is per batch by definition; composite contains grad_norm
            if metric not in lb["metrics"]:
                assert metric not in ls["metrics"]
                continue
            assert [v is None for v in lb["metrics"][metric]] == [v is None for v in ls["metrics"][metric]]
            a = torch.tensor([0.0 if v is None else v for v in lb["metrics"][metric]], dtype=torch.float64)
            b = torch.tensor([0.0 if v is None else v for v in ls["metrics"][metric]], dtype=torch.float64)
            scale = torch.tensor(lb["metrics"]["taylor"], dtype=torch.float64) if metric == "taylor_delta" else 0
            if not ((a - b).abs() <= ATOL + RTOL * a.abs() + RTOL * scale).all():
                differs.append((lb["name"], metric))
        # grad_norm genuinely depends on the split; composite follows from the same run's parts
        assert lb["metrics"]["grad_norm"] != ls["metrics"]["grad_norm"]
        for rep_lay in (lb, ls):
            m = {k: torch.tensor(rep_lay["metrics"][k], dtype=torch.float64) for k in COMPOSITE_WEIGHTS}
            want = sum(w * m[k] / m[k].mean() for k, w in COMPOSITE_WEIGHTS.items())
            _assert_close(rep_lay["metrics"]["composite"], want, f"{model} {rep_lay['name']} composite")
    assert not differs


# ---- conformance check --------------------------------------------------------------------------

REGISTRY = sorted(load_registry())


def test_registry_has_every_spec_metric():
    spec_names = {"weight_norm", "weight_norm_out", "weight_change", "weight_change_rel", "grad_norm",
                  "act_mean", "act_var", "act_entropy", "apoz", "dormant", "taylor", "taylor_delta",
                  "ablation", "output_corr", "composite"}
    reg = load_registry()
    assert spec_names <= set(reg)
    for n in spec_names:
        assert reg[n].cls is not None, reg[n].error
        assert reg[n].cls.name == n


@pytest.mark.parametrize("name", REGISTRY)
def test_check_metric_passes_for_registered_metric(name):
    entry = load_registry()[name]
    assert entry.cls is not None, entry.error
    check_metric(entry.cls)


class _Overwrites(ActMean):
    """The classic accumulator bug: each batch replaces the state instead of adding to it."""

    def update(self, batch):
        h = batch.act.transpose(0, 1).reshape(batch.act.shape[1], -1)
        self.n = torch.tensor(float(h.shape[1]), dtype=torch.float64)
        self.abs_sum = h.abs().sum(dim=1)


class _DropsOther(ActMean):
    """merge keeps only its own state: a.merge(b) != b.merge(a) != whole."""

    def merge(self, other):
        return self


class _Subtracts(ActMean):
    """merge by subtraction: neither commutative nor equal to the whole."""

    def merge(self, other):
        self.n = self.n + other.n
        self.abs_sum = self.abs_sum - other.abs_sum
        return self


class _NoReset(ActMean):
    def reset(self):
        pass


class _BatchMean(Metric):
    """Mean of per-batch means: depends on how the data is split."""

    name = "batch_mean"
    needs = frozenset({"activations"})

    def setup(self):
        self.add_state("k", torch.zeros((), dtype=torch.float64), "sum")
        self.add_state("s", torch.zeros(self.units, dtype=torch.float64), "sum")

    def update(self, batch):
        self.k = self.k + 1
        self.s = self.s + batch.act.abs().mean(dim=(0, 2))

    def compute(self):
        return self.s / self.k


class _NaNs(ActMean):
    def compute(self):
        return torch.full((self.units,), float("nan"), dtype=torch.float64)


class _WrongShape(ActMean):
    def compute(self):
        return super().compute()[:-1]


@pytest.mark.parametrize("broken", [_Overwrites, _DropsOther, _Subtracts, _NoReset, _NaNs, _WrongShape])
def test_check_metric_rejects_broken_metrics(broken):
    with pytest.raises(AssertionError):
        check_metric(broken)


def test_batch_mean_metric_really_depends_on_the_split():
    """Premise of the next test, checked without check_metric: _BatchMean is broken."""
    g = torch.Generator().manual_seed(0)
    act = torch.rand(10, 3, 2, generator=g, dtype=torch.float64)
    from fitcli.metrics.base import UnitBatch

    w = torch.zeros(3, 4, dtype=torch.float64)
    one, two = _BatchMean(3), _BatchMean(3)
    one.update(UnitBatch(weight=w, act=act))
    two.update(UnitBatch(weight=w, act=act[:2]))
    two.update(UnitBatch(weight=w, act=act[2:]))
    assert not torch.allclose(one.compute(), two.compute())


def test_check_metric_rejects_batch_split_dependent_metric():
    """A mean of per-batch means depends on batch sizes (spec: no metric may). check_metric's
    streaming-vs-concatenation property must catch it, which needs batches of unequal size."""
    with pytest.raises(AssertionError):
        check_metric(_BatchMean)


def test_check_metric_accepts_the_unbroken_parent():
    check_metric(ActMean)  # the rejections above are about the bugs, not the base class


def test_hook_free_reference_forward_matches_model(_truth):
    """Guard for the reference itself: the functional forwards equal the real models."""
    models = _import_models()
    for name in MODELS:
        info = _truth[name]
        model = getattr(models, name)()
        model.load_state_dict(load_file(str(REPO / info["checkpoint"])))
        model.eval()
        x = load_file(str(REPO / info["data"]))["inputs"][:32]
        with torch.no_grad():
            out, hs = _points(name, model, x)
            assert torch.allclose(out, model(x), atol=1e-6)
        assert set(hs) == set(info["layers"])
        for lay, u in info["layers"].items():
            assert hs[lay].shape[:2] == (32, u)


# ---- the histogram's fast paths against a plain per-unit loop ------------------------------------


def _loop_counts(act: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int = 20) -> torch.Tensor:
    """Counts per unit from the definition, one observation at a time in Python (float32 index
    arithmetic as the docstring of ``histogram`` states, clamped into [0, bins - 1])."""
    out = torch.zeros(act.shape[1], bins, dtype=torch.float64)
    for u in range(act.shape[1]):
        span = float(hi[u] - lo[u])
        scale = torch.tensor(bins / span if span > 0 else 0.0, dtype=torch.float32)
        shift = torch.tensor(-float(lo[u]) * float(scale), dtype=torch.float32)
        for v in act[:, u, :].flatten().tolist():
            pos = float(shift + torch.tensor(v, dtype=torch.float32) * scale)
            out[u, int(min(max(pos, 0.0), bins - 1))] += 1
    return out


@pytest.mark.parametrize("batch", [6, 7])  # even, and odd (one sample left out of the pairing)
@pytest.mark.parametrize("threads", [1, 2])  # single bincount, and split over threads
def test_histogram_paired_and_threaded_paths_equal_a_plain_loop(batch, threads, monkeypatch):
    from fitcli.metrics import activations as A
    from fitcli.metrics.base import Scratch

    g = torch.Generator().manual_seed(batch)
    act = torch.randn(batch, 3, 2000, generator=g).clamp_min(-0.3)  # ReLU-like floor, many ties
    act[:, 1] = 0.5  # a constant unit: everything in bin 0
    lo = act.amin(dim=(0, 2)).double()
    hi = act.amax(dim=(0, 2)).double()
    monkeypatch.setattr(A, "PARALLEL_BINCOUNT", 1000)  # small enough that this input is split
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert act.numel() >= 8 * 3 * 20 * 20  # the paired path is the one under test
        got = A.histogram(act, lo, hi, scratch=Scratch())
        again = A.histogram(act, lo, hi)  # no scratch pool: fresh temporaries
    finally:
        torch.set_num_threads(before)
    want = _loop_counts(act, lo, hi)
    assert torch.equal(got, want)
    assert torch.equal(again, want)
    assert got[1, 0] == batch * 2000 and got[1, 1:].sum() == 0


@pytest.mark.parametrize("units", [81, 82])  # the last layer width with int16 codes (81·400 < 2^15), the first without
def test_histogram_code_widths_equal_per_unit_counts(units):
    """Per unit on its own (no pairing, no unit offsets, one torch.bincount each), in the same
    float32 arithmetic as the loop above: the narrow and the wide code paths agree with it."""
    from fitcli.metrics import activations as A
    from fitcli.metrics.base import Scratch

    g = torch.Generator().manual_seed(units)
    act = torch.randn(9, units, 400, generator=g).clamp_min(-0.3)  # odd batch: one sample unpaired
    act[:, 2] = 0.5  # a constant unit
    act[:, -1] = torch.rand(9, 400, generator=g)  # the highest codes: every bin of the last unit filled
    lo, hi = act.amin(dim=(0, 2)).double(), act.amax(dim=(0, 2)).double()
    want = torch.zeros(units, 20, dtype=torch.float64)
    for u in range(units):
        span = float(hi[u] - lo[u])
        scale = torch.tensor(20 / span if span > 0 else 0.0, dtype=torch.float32)
        shift = torch.tensor(-float(lo[u]) * float(scale), dtype=torch.float32)
        pos = shift + act[:, u].flatten() * scale
        want[u] = torch.bincount(pos.clamp(0, 19).long(), minlength=20).double()
    assert act.numel() >= 8 * units * 20 * 20  # the paired path
    assert torch.equal(A.histogram(act, lo, hi, scratch=Scratch()), want)
    assert want[2, 0] == 9 * 400


def test_histogram_with_nonfinite_range_counts_only_finite_values():
    from fitcli.metrics.activations import histogram

    act = torch.tensor([[[0.0, 1.0, float("nan"), 2.0]], [[4.0, float("inf"), 3.0, 1.5]]])
    lo = torch.tensor([float("nan")], dtype=torch.float64)
    hi = torch.tensor([4.0], dtype=torch.float64)
    counts = histogram(act, lo, hi)
    assert counts.sum() < act.numel()  # the non-finite observations are not counted
    assert bool(torch.isfinite(counts).all())


def test_zero_count_and_moments_equal_plain_loops():
    """The moment sweep's shortcuts (Σ|h| = Σh when nothing is negative, zeros as p − Σ|sign h|)
    against sums written out per unit, with and without the sample ranges known."""
    from fitcli.metrics.base import Scratch, UnitBatch

    g = torch.Generator().manual_seed(3)
    relu = torch.randn(5, 4, 33, generator=g).clamp_min(0)
    mixed = torch.randn(5, 4, 33, generator=g).clamp_min(-0.2)
    mixed[0, 0, :5] = 0.0
    positive = torch.rand(5, 4, 33, generator=g) + 0.1
    linear = torch.randn(64, 4, 1, generator=g).clamp_min(-0.1) + 3.0  # Linear layout: p = 1, |mean| ≫ std
    linear[:7, 2] = 0.0
    constant = torch.full((9, 4, 1), 0.1)  # a mean that is not exact in float32
    signed = torch.randn(5, 4, 33, generator=g)  # negative values and no exact zero
    # |mean| ≫ std with positions (a conv unit stuck near a constant): float32 sums are off by more
    # than the whole variance
    offset = torch.randn(6, 4, 256, generator=g) * torch.tensor([1e-2, 1e-1, 1.0, 0.0]).reshape(1, 4, 1) + 1000.0
    offset[:, 3] = 0.1  # constant, inexact in float32
    for act in (relu, mixed, positive, signed, offset, relu[:, :, :1], mixed[:, :, :1], signed[:, :, :1], linear, constant):
        a64 = act.double()
        want = {"abs": [sum(abs(float(v)) for v in a64[:, u].flatten()) for u in range(4)],
                "zeros": [sum(1 for v in a64[:, u].flatten() if float(v) == 0.0) for u in range(4)],
                "sumsq": [sum(float(v) ** 2 for v in a64[:, u].flatten()) for u in range(4)],
                "sum": [sum(float(v) for v in a64[:, u].flatten()) for u in range(4)]}
        for with_range in (False, True):
            ub = UnitBatch(weight=torch.zeros(4, 1), act=act, scratch=Scratch())
            if with_range:
                ub.sample_range()
            mom = ub._moments()
            for k, v in want.items():
                assert torch.allclose(mom[k], torch.tensor(v, dtype=torch.float64), rtol=1e-6, atol=1e-9), (k, with_range)
            # the variance act_var derives, against the two-pass definition (cancellation-prone)
            n = act.shape[0] * act.shape[2]
            var = mom["sumsq"] / n - (mom["sum"] / n) ** 2
            ref = torch.tensor([float(((a64[:, u] - a64[:, u].mean()) ** 2).mean()) for u in range(4)], dtype=torch.float64)
            assert torch.allclose(var, ref, rtol=1e-5, atol=1e-12), (var, ref)


def test_scratch_pool_reuses_one_buffer_per_slot_and_grows_only_when_asked():
    from fitcli.metrics.base import Scratch

    pool = Scratch()
    a = pool.get("f", (4, 5), torch.float32, torch.device("cpu"))
    b = pool.get("f", (2, 3), torch.float32, torch.device("cpu"))
    assert a.data_ptr() == b.data_ptr()  # the same memory, not a fresh allocation per request
    c = pool.get("g", (2, 3), torch.float32, torch.device("cpu"))
    assert c.data_ptr() != a.data_ptr()  # another slot: both may be live at once
    d = pool.get("f", (2, 3), torch.int32, torch.device("cpu"))
    assert d.dtype == torch.int32 and d.data_ptr() != a.data_ptr()
    big = pool.get("f", (10, 10), torch.float32, torch.device("cpu"))
    assert big.shape == (10, 10) and big.is_contiguous()
    again = pool.get("f", (4, 5), torch.float32, torch.device("cpu"))
    assert again.data_ptr() == big.data_ptr()  # grown once, then reused
    assert sum(t.numel() * t.element_size() for t in pool._bufs.values()) == 100 * 4 + 6 * 4 + 6 * 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_zero_count_is_exact_in_low_precision_dtypes(dtype):
    """Counting zeros as p − Σ|sign h| is only exact where the float sum of ones is: a bfloat16
    sum stops counting at 256, so low-precision activations must take the == path."""
    from fitcli.metrics.moments import zero_count as _zero_count

    act = torch.ones(3, 2, 1000, dtype=dtype)
    act[:, 0, :700] = 0
    act[1, 1, :5] = 0
    got = _zero_count(act)
    assert got.tolist() == [3 * 700, 5]


def test_scaled_gradient_is_multiplied_only_when_read():
    """``set_grad(g, s)``: the gradient is g·s. The shared Σ_p h·g statistics fold s into their
    per-sample sums; ``grad`` itself is g·s when a metric reads it. Both against plain loops."""
    from fitcli.metrics.base import UnitBatch

    gen = torch.Generator().manual_seed(5)
    act = torch.randn(3, 2, 5, generator=gen)
    g = torch.randn(3, 2, 5, generator=gen)
    ub = UnitBatch(weight=None, act=act)
    ub.set_grad(g, 3.0)
    per = [[sum(float(act[x, u, p]) * 3.0 * float(g[x, u, p]) for p in range(5)) for u in range(2)] for x in range(3)]
    want_sum = [sum(per[x][u] for x in range(3)) for u in range(2)]
    want_abs = [sum(abs(per[x][u]) for x in range(3)) for u in range(2)]
    sums = ub.hg_sums()
    assert torch.allclose(sums["sum"], torch.tensor(want_sum, dtype=torch.float64), rtol=1e-6)
    assert torch.allclose(sums["abs"], torch.tensor(want_abs, dtype=torch.float64), rtol=1e-6)
    assert ub.has_grad() and ub.grad_parts()[1] == 3.0  # still unmultiplied
    assert torch.equal(ub.grad, g * 3.0)
    ub.grad = None
    assert not ub.has_grad()
