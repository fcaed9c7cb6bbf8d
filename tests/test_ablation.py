"""Exact ablation (``fitcli ablate`` / ``fitcli.api.ablate``) against a brute-force reference.

The reference is written here, independently of fitcli: it loads each sample model straight from
``sample_models/models.py`` + safetensors, and for one unit at a time re-runs the model with that
unit's activation (at the activation point listed in ``truth.json``) replaced by 0 (zero mode) or
by its mean over every observation of the data (mean mode), then takes the mean cross-entropy
change. Activation points are reached with forward hooks where the nonlinearity is a module
(mlp ``relu1``/``relu2``) or where the point is the raw Linear output (resmlp ``embed``,
``blocks.N.fc_out``), and with a functional re-implementation of the forward where the
nonlinearity is a function call (every cnn layer, resmlp ``blocks.N.fc_in``).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import signal
import sys
from pathlib import Path

import pytest
import strapi as api
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from fitcli import report as fitcli_report
from fitcli.cli import main as cli_main
from fitcli.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
TRUTH = json.loads((SAMPLES / "truth.json").read_text())

ABL_LAYERS = {
    "mlp": ["fc1", "fc2"],
    "cnn": ["conv1", "conv2", "fc1"],
    "resmlp": ["blocks.0.fc_in", "blocks.1.fc_in", "blocks.0.fc_out", "embed"],
}
MODES = ("zero", "mean")
ATOL = RTOL = 1e-5



@pytest.fixture(autouse=True, scope="module")
def _abl_single_thread():
    """Tiny models on a 2-core box: one intra-op thread is faster, and far faster under load."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --------------------------------------------------------------------------------------------
# the brute-force reference (no fitcli code)


@functools.cache
def _abl_models_module():
    spec = importlib.util.spec_from_file_location("abl_ref_sample_models", SAMPLES / "models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@functools.cache
def _abl_ref_model(name: str) -> nn.Module:
    model = getattr(_abl_models_module(), name)()
    model.load_state_dict(load_file(str(SAMPLES / f"{name}.safetensors")), strict=True)
    model.eval()
    return model


@functools.cache
def _abl_ref_data(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    d = load_file(str(SAMPLES / f"{name}_data.safetensors"))
    return d["inputs"], d["targets"]


def _unit_dim(model_name: str, layer: str) -> int:
    return 1 if (model_name == "cnn" and layer.startswith("conv")) else -1


def _hooked_module(model_name: str, layer: str) -> str | None:
    """Module whose forward output *is* the activation point (None: functional point)."""
    point = TRUTH[model_name]["activation_points"][layer]
    if model_name == "mlp":
        return point  # relu1 / relu2 modules
    if model_name == "resmlp" and point == layer:  # raw Linear output (embed, fc_out)
        return layer
    return None


def _cnn_forward(m, x, layer, fn):
    a = F.relu(m.conv1(x))
    if layer == "conv1":
        a = fn(a)
    a = torch.relu(m.conv2(a))
    if layer == "conv2":
        a = fn(a)
    a = F.adaptive_avg_pool2d(a, 1).flatten(1)
    a = m.fc1(a).relu()
    if layer == "fc1":
        a = fn(a)
    return m.fc2(a)


def _resmlp_forward(m, x, layer, fn):
    """The model's own submodules, Block.forward spelled out so gelu(fc_in) can be edited."""
    x = m.embed(x)
    for i, b in enumerate(m.blocks):
        h = b.ln1(x)
        x = x + b.attn(h, h, h, need_weights=False)[0]
        a = F.gelu(b.fc_in(b.ln2(x)))
        if layer == f"blocks.{i}.fc_in":
            a = fn(a)
        x = x + b.fc_out(a)
    return m.head(m.norm(x).mean(dim=1))


def _ref_forward(model_name: str, x: torch.Tensor, layer: str | None, fn) -> torch.Tensor:
    """Logits with ``fn`` applied to ``layer``'s activation at its activation point."""
    m = _abl_ref_model(model_name)
    with torch.no_grad():
        if layer is None:
            return m(x)
        hooked = _hooked_module(model_name, layer)
        if hooked is not None:
            handle = m.get_submodule(hooked).register_forward_hook(lambda mod, i, o: fn(o))
            try:
                return m(x)
            finally:
                handle.remove()
        if model_name == "cnn":
            return _cnn_forward(m, x, layer, fn)
        if model_name == "resmlp":
            return _resmlp_forward(m, x, layer, fn)
        raise AssertionError(f"no reference route for {model_name}.{layer}")


@functools.cache
def _ref_activation(model_name: str, layer: str) -> torch.Tensor:
    x, _ = _abl_ref_data(model_name)
    box = {}

    def grab(t):
        box["h"] = t.detach().clone()
        return t

    _ref_forward(model_name, x, layer, grab)
    return box["h"]


@functools.cache
def _ref_mean(model_name: str, layer: str) -> torch.Tensor:
    """E[h_i] over every observation (samples x positions)."""
    h = _ref_activation(model_name, layer).to(torch.float64)
    ud = _unit_dim(model_name, layer) % h.dim()
    dims = tuple(d for d in range(h.dim()) if d != ud)
    return h.mean(dim=dims)


@functools.cache
def _ref_base(model_name: str):
    x, t = _abl_ref_data(model_name)
    logits = _ref_forward(model_name, x, None, None)
    return (F.cross_entropy(logits, t, reduction="none").to(torch.float64),
            (logits.argmax(-1) == t).to(torch.float64))


def _index(model_name, layer, h, units):
    ud = _unit_dim(model_name, layer) % h.dim()
    idx = [slice(None)] * h.dim()
    idx[ud] = units
    return tuple(idx)


def _masker(model_name: str, layer: str, mode: str, units):
    """fn replacing ``units`` (an int or a list) of the activation by 0 or their mean."""
    mean = _ref_mean(model_name, layer) if mode == "mean" else None

    def fn(h):
        h = h.clone()
        ix = _index(model_name, layer, h, units)
        if mode == "zero":
            h[ix] = 0.0
        else:
            v = mean[units].to(h.dtype)
            if isinstance(units, list):
                shape = [1] * h.dim()
                shape[_unit_dim(model_name, layer) % h.dim()] = len(units)
                v = v.reshape(shape)
            h[ix] = v
        return h

    return fn


def _ref_ablate(model_name: str, layer: str, mode: str, units) -> tuple[float, float]:
    """(mean loss change, accuracy change) with ``units`` masked (brute force, one forward)."""
    x, t = _abl_ref_data(model_name)
    base_l, base_c = _ref_base(model_name)
    logits = _ref_forward(model_name, x, layer, _masker(model_name, layer, mode, units))
    losses = F.cross_entropy(logits, t, reduction="none").to(torch.float64)
    correct = (logits.argmax(-1) == t).to(torch.float64)
    return float((losses - base_l).mean()), float((correct - base_c).mean())


@functools.cache
def _ref_units(model_name: str, layer: str, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The single-unit brute-force loop: per-unit loss and accuracy change."""
    n = TRUTH[model_name]["layers"][layer]
    dl, da = [], []
    for u in range(n):
        a, b = _ref_ablate(model_name, layer, mode, u)
        dl.append(a)
        da.append(b)
    return torch.tensor(dl, dtype=torch.float64), torch.tensor(da, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# fitcli runs (cached: each is used by several tests)


def _paths(model_name: str) -> dict[str, str]:
    return {"checkpoint": str(SAMPLES / f"{model_name}.safetensors"),
            "arch": f"{SAMPLES / 'models.py'}:{model_name}",
            "data": str(SAMPLES / f"{model_name}_data.safetensors")}


@functools.cache
def _abl_fitcli(model_name: str, mode: str, chunk_size: int | None = None, whole_layer: bool = True,
                max_batches: int | None = None) -> dict:
    p = _paths(model_name)
    return api.ablate(p["checkpoint"], layers=list(ABL_LAYERS[model_name]), arch=p["arch"], data=p["data"],
                      mode=mode, device="cpu", chunk_size=chunk_size, whole_layer=whole_layer,
                      max_batches=max_batches)


def _layer(report: dict, name: str) -> dict:
    hits = [lay for lay in report["layers"] if lay["name"] == name]
    assert len(hits) == 1, f"layer {name} not in report: {[lay['name'] for lay in report['layers']]}"
    return hits[0]


def _vals(report: dict, layer: str, metric: str = "ablation") -> torch.Tensor:
    v = _layer(report, layer)["metrics"][metric]
    assert all(x is not None for x in v), f"{layer}.{metric} has nulls: {v}"
    return torch.tensor(v, dtype=torch.float64)


def _close(got: torch.Tensor, ref: torch.Tensor, what: str, atol=ATOL, rtol=RTOL) -> None:
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if not torch.allclose(got, ref, atol=atol, rtol=rtol):
        err = (got - ref).abs()
        i = int(err.argmax())
        raise AssertionError(f"{what}: max |diff| {float(err.max()):.3g} at unit {i} "
                             f"(fitcli {float(got.flatten()[i])!r}, brute force {float(ref.flatten()[i])!r})")


MODEL_LAYER_PARAMS = [(m, lay) for m, lays in ABL_LAYERS.items() for lay in lays]


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    old_term = signal.getsignal(signal.SIGTERM)  # main() installs its own SIGTERM handler
    try:
        with pytest.raises(SystemExit) as exc:
            cli_main(argv)
    finally:
        signal.signal(signal.SIGTERM, old_term)
    code = exc.value.code
    cap = capsys.readouterr()
    return (0 if code is None else code), cap.out, cap.err


# --------------------------------------------------------------------------------------------
# the reference itself is the model


@pytest.mark.parametrize("model_name", list(ABL_LAYERS))
def test_reference_forward_reproduces_model(model_name):
    """Guard for the brute force: identity edits at every point give the model's own logits."""
    x, _ = _abl_ref_data(model_name)
    base = _ref_forward(model_name, x, None, None)
    for layer in ABL_LAYERS[model_name]:
        out = _ref_forward(model_name, x, layer, lambda t: t)
        assert torch.allclose(out, base, atol=1e-6, rtol=1e-6), layer
    # the planted facts are where truth.json says: dead units read exactly 0
    for layer, dead in TRUTH[model_name]["dead"].items():
        if layer in ABL_LAYERS[model_name] and dead:
            h = _ref_activation(model_name, layer)
            assert torch.count_nonzero(h[_index(model_name, layer, h, dead)]) == 0


# --------------------------------------------------------------------------------------------
# per-unit ablation == brute force


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_name,layer", MODEL_LAYER_PARAMS)
def test_unit_ablation_matches_brute_force(model_name, layer, mode):
    report = _abl_fitcli(model_name, mode)
    got = _vals(report, layer)
    ref, _ = _ref_units(model_name, layer, mode)
    assert got.shape == (TRUTH[model_name]["layers"][layer],)
    _close(got, ref, f"{model_name}.{layer} {mode}-mode ablation")
    lay = _layer(report, layer)
    assert lay["activation_point"] == TRUTH[model_name]["activation_points"][layer]
    assert report["settings"]["ablation_mode"] == mode
    assert report["data"]["samples"] == 512
    # a non-trivial layer: ablation must actually change something
    assert float(ref.abs().max()) > 1e-3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_name,layer", MODEL_LAYER_PARAMS)
def test_whole_layer_ablation_matches_brute_force(model_name, layer, mode):
    report = _abl_fitcli(model_name, mode)
    got = _layer(report, layer)["layer_ablation"]
    assert isinstance(got, float) and math.isfinite(got)
    n = TRUTH[model_name]["layers"][layer]
    ref, ref_acc = _ref_ablate(model_name, layer, mode, list(range(n)))
    assert math.isclose(got, ref, rel_tol=RTOL, abs_tol=ATOL), (got, ref)
    acc = _layer(report, layer).get("layer_ablation_accuracy")
    assert acc is not None and math.isclose(acc, ref_acc, abs_tol=1e-9), (acc, ref_acc)
    # a whole layer always matters on these models (guards against a no-op whole-layer pass)
    assert abs(got) > 1e-3


# --------------------------------------------------------------------------------------------
# chunking does not change the numbers


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_name", list(ABL_LAYERS))
def test_chunk_sizes_agree(model_name, mode):
    biggest = max(TRUTH[model_name]["layers"][lay] for lay in ABL_LAYERS[model_name])
    # one batch of 64 samples: chunk size 1 is one suffix pass per unit
    runs = {k: _abl_fitcli(model_name, mode, chunk_size=k, whole_layer=True, max_batches=1)
            for k in (1, 7, biggest)}
    for r in runs.values():
        assert r["data"]["samples"] == 64
    for layer in ABL_LAYERS[model_name]:
        ref = _vals(runs[biggest], layer)
        assert float(ref.abs().max()) > 1e-3
        for k in (1, 7):
            got = _vals(runs[k], layer)
            assert torch.allclose(got, ref, atol=1e-6, rtol=0), (layer, k, (got - ref).abs().max())
            a, b = _layer(runs[k], layer)["layer_ablation"], _layer(runs[biggest], layer)["layer_ablation"]
            assert math.isclose(a, b, abs_tol=1e-6), (layer, k, a, b)
            acc_k, acc_all = _vals(runs[k], layer, "ablation_accuracy"), _vals(runs[biggest], layer, "ablation_accuracy")
            assert torch.equal(acc_k, acc_all), (layer, k)


# --------------------------------------------------------------------------------------------
# planted units


@pytest.mark.parametrize("model_name", list(ABL_LAYERS))
def test_constant_unit_zero_large_mean_zero(model_name):
    c = TRUTH[model_name]["constant"]
    layer, unit = c["layer"], c["unit"]
    zero = _vals(_abl_fitcli(model_name, "zero"), layer)[unit]
    mean = _vals(_abl_fitcli(model_name, "mean"), layer)[unit]
    assert float(zero) > 0.05, f"zero-ablating the constant unit {layer}[{unit}] changed the loss by {float(zero)}"
    assert abs(float(mean)) < 1e-5, f"mean-ablating the constant unit {layer}[{unit}] changed the loss by {float(mean)}"
    # a constant unit is removable in mean mode, not in zero mode
    assert unit in _layer(_abl_fitcli(model_name, "mean"), layer)["removable"]
    assert unit not in _layer(_abl_fitcli(model_name, "zero"), layer)["removable"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_name", list(ABL_LAYERS))
def test_dead_units_exactly_zero_and_removable(model_name, mode):
    report = _abl_fitcli(model_name, mode)
    checked = 0
    for layer, dead in TRUTH[model_name]["dead"].items():
        if layer not in ABL_LAYERS[model_name]:
            continue
        lay = _layer(report, layer)
        vals = lay["metrics"]["ablation"]
        for u in dead:
            checked += 1
            if mode == "zero":
                assert vals[u] == 0.0, f"{model_name}.{layer}[{u}] is dead but zero-ablation gave {vals[u]!r}"
            else:
                assert abs(vals[u]) <= 1e-12, f"{model_name}.{layer}[{u}] dead, mean-ablation gave {vals[u]!r}"
            assert u in lay["removable"], (layer, u, lay["removable"])
        # nothing that matters is called removable
        ref, _ = _ref_units(model_name, layer, mode)
        for u in lay["removable"]:
            assert abs(float(ref[u])) <= 1e-5, (layer, u, float(ref[u]))
    assert checked > 0


# --------------------------------------------------------------------------------------------
# accuracy change


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_name,layer", [("mlp", "fc2"), ("cnn", "conv1"), ("resmlp", "blocks.1.fc_in")])
def test_accuracy_change_matches_brute_force(model_name, layer, mode):
    report = _abl_fitcli(model_name, mode)
    assert "ablation_accuracy" in report["metric_info"]
    acc = _vals(report, layer, "ablation_accuracy")
    assert acc.shape == (TRUTH[model_name]["layers"][layer],)
    # accuracy changes are multiples of 1/N
    assert torch.allclose(acc * 512, (acc * 512).round(), atol=1e-6)
    units = [0, 1, 2]
    c = TRUTH[model_name]["constant"]
    if c["layer"] == layer:
        units.append(c["unit"])
    for u in units:
        _, ref = _ref_ablate(model_name, layer, mode, u)
        assert math.isclose(float(acc[u]), ref, abs_tol=1e-9), (u, float(acc[u]), ref)
    # the whole vector too (the brute-force loop is cached anyway)
    _, ref_all = _ref_units(model_name, layer, mode)
    assert torch.allclose(acc, ref_all, atol=1e-9)
    if mode == "zero":
        assert float(acc.abs().max()) > 0  # some unit changes some prediction


def test_no_accuracy_change_for_float_targets(tmp_path):
    """Float targets (mse) -> no accuracy metric, but the ablation still runs."""
    x, t = _abl_ref_data("mlp")
    data = tmp_path / "float_targets.safetensors"
    save_file({"inputs": x[:128].contiguous(), "targets": F.one_hot(t[:128], 4).float().contiguous()}, str(data))
    p = _paths("mlp")
    report = api.ablate(p["checkpoint"], layers=["fc2"], arch=p["arch"], data=str(data), device="cpu")
    lay = _layer(report, "fc2")
    assert "ablation_accuracy" not in lay["metrics"]
    assert "ablation_accuracy" not in report["metric_info"]
    assert report["settings"]["loss"] == "mse"
    assert all(v is not None for v in lay["metrics"]["ablation"])


# --------------------------------------------------------------------------------------------
# --units


def _cli_base(model_name="mlp"):
    m = TRUTH[model_name]
    return ["ablate", m["checkpoint"], "--arch", m["arch"], "--data", m["data"], "--device", "cpu"]


def test_units_subset_cli(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    code, out, err = _cli(_cli_base() + ["--layer", "fc2", "--units", "0,3,7-9", "--format", "json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    fitcli_report.validate(report)
    lay = _layer(report, "fc2")
    vals = lay["metrics"]["ablation"]
    assert len(vals) == 32
    chosen = [0, 3, 7, 8, 9]
    assert [i for i, v in enumerate(vals) if v is not None] == chosen
    assert lay.get("ablated_units") == chosen
    full = _vals(_abl_fitcli("mlp", "zero"), "fc2")
    for u in chosen:
        assert math.isclose(vals[u], float(full[u]), rel_tol=1e-9, abs_tol=1e-12), u
    acc = lay["metrics"]["ablation_accuracy"]
    assert [i for i, v in enumerate(acc) if v is not None] == chosen
    assert {(r["layer"], r["unit"]) for r in report["ranked"]} <= {("fc2", u) for u in chosen}
    assert lay["nonfinite"] == []
    assert set(lay["removable"]) <= set(chosen)


@pytest.mark.parametrize("bad", ["5-2", "x", "999", "0,,3", "-1", "32"])
def test_units_invalid_exit_2(bad, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    code, out, err = _cli(_cli_base() + ["--layer", "fc2", "--units", bad, "--format", "json"], capsys)
    assert code == 2, (bad, code, err)
    assert out == ""
    assert "Traceback" not in err and "units" in err


def test_units_invalid_api_usage_error():
    p = _paths("mlp")
    with pytest.raises(UsageError):
        api.ablate(p["checkpoint"], layers=["fc2"], arch=p["arch"], data=p["data"], units="5-2", device="cpu")


# --------------------------------------------------------------------------------------------
# the CLI


def test_cli_ablate_json_report(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    code, out, err = _cli(["ablate", "sample_models/mlp.safetensors", "--arch", "sample_models/models.py:mlp",
                           "--data", "sample_models/mlp_data.safetensors", "--layer", "fc2", "--format", "json",
                           "--device", "cpu"], capsys)
    assert code == 0, err
    report = json.loads(out)
    fitcli_report.validate(report)
    assert report["schema"] == "fitcli.report/1"
    assert report["settings"]["ablation_mode"] == "zero"
    assert [lay["name"] for lay in report["layers"]] == ["fc2"]
    got = _vals(report, "fc2")
    _close(got, _ref_units("mlp", "fc2", "zero")[0], "CLI mlp.fc2")
    assert "ablation" in report["settings"]["metrics"]
    assert report["metric_info"]["ablation"]["method"]["fc2"].startswith("graph-suffix")
    # ranked least fit first: ablation's direction is "higher is fit", so the smallest loss change leads
    vals = [r["value"] for r in report["ranked"]]
    assert vals == sorted(vals) and vals[0] == float(got.min())


def test_cli_score_metric_ablation_same_numbers(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    common = ["sample_models/mlp.safetensors", "--arch", "sample_models/models.py:mlp",
              "--data", "sample_models/mlp_data.safetensors", "--layer", "fc2", "--format", "json",
              "--device", "cpu", "--mode", "mean"]
    code, out, err = _cli(["ablate"] + common, capsys)
    assert code == 0, err
    ab = json.loads(out)
    code, out, err = _cli(["score"] + common + ["--metric", "ablation"], capsys)
    assert code == 0, err
    sc = json.loads(out)
    fitcli_report.validate(sc)
    assert sc["settings"]["ablation_mode"] == "mean"
    a, s = _vals(ab, "fc2"), _vals(sc, "fc2")
    assert torch.allclose(a, s, atol=1e-9, rtol=0), (a - s).abs().max()
    _close(s, _ref_units("mlp", "fc2", "mean")[0], "score --metric ablation")
    assert _layer(sc, "fc2")["removable"] == _layer(ab, "fc2")["removable"]


def test_cli_ablate_missing_layer_exit_2(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    code, out, err = _cli(_cli_base() + ["--format", "json"], capsys)
    assert code == 2, err
    assert out == "" and "Traceback" not in err and "--layer" in err


def test_cli_ablate_bad_mode_exit_2(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    code, out, err = _cli(_cli_base() + ["--layer", "fc2", "--mode", "bogus", "--format", "json"], capsys)
    assert code == 2, err
    assert out == "" and "Traceback" not in err


def test_api_ablate_bad_mode_usage_error():
    p = _paths("mlp")
    with pytest.raises(UsageError):
        api.ablate(p["checkpoint"], layers=["fc2"], arch=p["arch"], data=p["data"], mode="bogus", device="cpu")


@pytest.mark.parametrize("mode", MODES)
def test_cli_mismatched_data_is_input_error_exit_3(mode, monkeypatch, capsys):
    """Data of the wrong shape is an input error (exit 3) in both modes; mean mode streams the data
    once for E[h] before ablating, and a shape error there must not become 'unexpected RuntimeError'."""
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("FITCLI_VERBOSE", raising=False)
    code, out, err = _cli(["ablate", "sample_models/mlp.safetensors", "--arch", "sample_models/models.py:mlp",
                           "--data", "sample_models/cnn_data.safetensors", "--layer", "fc2", "--mode", mode,
                           "--device", "cpu", "--format", "json"], capsys)
    assert code == 3, f"exit {code}; stderr:\n{err}"
    assert out == "" and "Traceback" not in err and "unexpected" not in err, err


def test_cli_ablate_unknown_layer_exit_2(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    code, out, err = _cli(_cli_base() + ["--layer", "fc9", "--format", "json"], capsys)
    assert code == 2, err
    assert "fc" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------
# non-traceable fallback (input expansion) == traceable twin (graph suffix)

_TWIN_SRC = '''
import torch
import torch.nn as nn
import torch.nn.functional as F


class MLPTwin(nn.Module):
    """Same weights as sample_models MLP; fc1 uses a *functional* relu, fc2 the relu2 module."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(32, 32)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(32, 4)

    def body(self, x):
        return self.fc3(self.relu2(self.fc2(F.relu(self.fc1(x)))))

    def forward(self, x):
        return self.body(x)


class MLPBranchy(MLPTwin):
    def forward(self, x):
        if bool(torch.isfinite(x).all()):  # data-dependent control flow: torch.fx cannot trace this
            return self.body(x)
        raise ValueError("non-finite input")


class CNNTwin(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, classes)

    def body(self, x):
        x = F.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        x = self.fc1(x).relu()
        return self.fc2(x)

    def forward(self, x):
        return self.body(x)


class CNNBranchy(CNNTwin):
    def forward(self, x):
        if x.abs().sum() >= 0:
            return self.body(x)
        return self.body(x) * 0


def mlp_twin():
    return MLPTwin()


def mlp_branchy():
    return MLPBranchy()


def cnn_twin():
    return CNNTwin()


def cnn_branchy():
    return CNNBranchy()
'''


@pytest.fixture
def abl_twin_models(tmp_path):
    f = tmp_path / "abl_twin_models.py"
    f.write_text(_TWIN_SRC)
    return f


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_non_traceable_fallback_same_results(model_name, mode, abl_twin_models, tmp_path):
    p = _paths(model_name)
    # a 2-batch subset keeps the (slower) input expansion quick
    x, t = _abl_ref_data(model_name)
    data = tmp_path / "subset.safetensors"
    save_file({"inputs": x[:96].contiguous(), "targets": t[:96].contiguous()}, str(data))
    layers = ABL_LAYERS[model_name]
    kw = dict(layers=layers, data=str(data), mode=mode, device="cpu", batch_size=48, whole_layer=True,
              chunk_size=5)
    twin = api.ablate(p["checkpoint"], arch=f"{abl_twin_models}:{model_name}_twin", **kw)
    branchy = api.ablate(p["checkpoint"], arch=f"{abl_twin_models}:{model_name}_branchy", **kw)
    assert twin["discovery"]["method"] == "fx"
    assert branchy["discovery"]["method"] == "runtime"
    for layer in layers:
        assert twin["metric_info"]["ablation"]["method"][layer].startswith("graph-suffix")
        assert branchy["metric_info"]["ablation"]["method"][layer] == "input-expansion"
        lt, lb = _layer(twin, layer), _layer(branchy, layer)
        assert lt["activation_point"] == lb["activation_point"], (lt["activation_point"], lb["activation_point"])
        a, b = _vals(twin, layer), _vals(branchy, layer)
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-6), (layer, (a - b).abs().max())
        assert torch.allclose(_vals(twin, layer, "ablation_accuracy"), _vals(branchy, layer, "ablation_accuracy"))
        assert math.isclose(lt["layer_ablation"], lb["layer_ablation"], rel_tol=1e-6, abs_tol=1e-6)
        assert float(a.abs().max()) > 1e-3
    # the twin is the sample model: its activation points are the ones truth.json lists
    if model_name == "cnn":
        for layer in layers:
            assert _layer(branchy, layer)["activation_point"] == TRUTH["cnn"]["activation_points"][layer]
    else:
        assert _layer(branchy, "fc1")["activation_point"] == "relu(fc1)"
        assert _layer(branchy, "fc2")["activation_point"] == "relu2"
    assert any("expanded" in n for n in branchy["discovery"]["notes"]), branchy["discovery"]["notes"]


def test_non_traceable_matches_brute_force(abl_twin_models, tmp_path):
    """The fallback's numbers are the exact ablation, not merely the twin's (mlp, full data, both modes)."""
    p = _paths("mlp")
    for mode in MODES:
        r = api.ablate(p["checkpoint"], arch=f"{abl_twin_models}:mlp_branchy", layers=["fc2"], data=p["data"],
                       mode=mode, device="cpu")
        assert r["metric_info"]["ablation"]["method"]["fc2"] == "input-expansion"
        _close(_vals(r, "fc2"), _ref_units("mlp", "fc2", mode)[0], f"input-expansion mlp.fc2 {mode}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
