"""The Python API with what a PyTorch user holds: an nn.Module, a DataLoader, a list of tensors,
dict batches, a loss function. Each report is compared with the CLI's report on the same model and
data (the CLI reads the same tensors from the shipped files), so the library and the command line
are one program."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fitcli
from fitcli.report import AuditReport

REPO = Path(__file__).resolve().parents[1]
SM = REPO / "sample_models"
TOL = 1e-6
# metrics whose value does not depend on targets or a loss
ACTIVATION_METRICS = ("act_mean", "act_var", "act_entropy", "apoz", "dormant")


def _models_module():
    spec = importlib.util.spec_from_file_location("fitcli_test_sample_models", SM / "models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _live(name: str) -> nn.Module:
    model = getattr(_models_module(), name)()
    model.load_state_dict(load_file(str(SM / f"{name}.safetensors")))
    return model


def _tensors(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    d = load_file(str(SM / f"{name}_data.safetensors"))
    return d["inputs"], d["targets"]


@pytest.fixture(scope="module")
def cli_reports() -> dict[str, dict]:
    """The CLI's JSON report of each sample model on its shipped data (default batch size 64)."""
    import subprocess
    import sys

    out = {}
    for name in ("mlp", "cnn"):
        res = subprocess.run([sys.executable, "-m", "fitcli", "score", str(SM / f"{name}.safetensors"),
                              "--arch", f"{SM / 'models.py'}:{name}", "--data", str(SM / f"{name}_data.safetensors"),
                              "--device", "cpu", "--format", "json", "--quiet"],
                             capture_output=True, text=True, timeout=300, cwd=REPO)
        assert res.returncode == 0, res.stderr
        out[name] = json.loads(res.stdout)
    return out


def _assert_same(report: AuditReport, cli: dict, metrics: tuple[str, ...] | None = None) -> None:
    """Every value of every layer equal to the CLI's to 1e-6 (relative), nulls in the same places."""
    cli_layers = {lay["name"]: lay for lay in cli["layers"]}
    assert [lay.name for lay in report.layers] == list(cli_layers)
    compared = 0
    for lay in report.layers:
        want = cli_layers[lay.name]["metrics"]
        names = metrics or tuple(want)
        for m in names:
            got = lay.metrics[m]
            exp = want[m]
            assert got.shape == (len(exp),), (lay.name, m)
            for i, e in enumerate(exp):
                g = float(got[i])
                if e is None:
                    assert not math.isfinite(g), (lay.name, m, i)
                else:
                    assert abs(g - e) <= TOL * max(1.0, abs(e)), (lay.name, m, i, g, e)
                compared += 1
        assert lay.dead == cli_layers[lay.name]["dead"]
    assert compared > 100


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_module_and_dataloader_equal_the_cli(name, cli_reports):
    x, y = _tensors(name)
    loader = DataLoader(TensorDataset(x, y), batch_size=64)  # the CLI's batches
    report = fitcli.audit(_live(name), loader, device="cpu")
    assert isinstance(report, AuditReport)
    assert report.settings["loss"] == "cross_entropy"
    _assert_same(report, cli_reports[name])
    assert report.summary["dead"] == cli_reports[name]["summary"]["dead"]


def test_list_of_tensors_gives_the_activation_metrics(cli_reports):
    x, _ = _tensors("mlp")
    batches = [x[i : i + 64] for i in range(0, x.shape[0], 64)]
    report = fitcli.audit(_live("mlp"), batches, device="cpu")
    _assert_same(report, cli_reports["mlp"], ACTIVATION_METRICS)
    skipped = {s["metric"]: s["reason"] for s in report.skipped}
    assert "taylor" in skipped and "targets" in skipped["taylor"]  # no targets: no loss, said so


def test_input_target_pairs_and_a_tensor_of_inputs(cli_reports):
    x, y = _tensors("mlp")
    pairs = [(x[i : i + 64], y[i : i + 64]) for i in range(0, x.shape[0], 64)]
    _assert_same(fitcli.audit(_live("mlp"), pairs, device="cpu"), cli_reports["mlp"])
    _assert_same(fitcli.audit(_live("mlp"), x, device="cpu"), cli_reports["mlp"], ACTIVATION_METRICS)


class _KwargsMLP(nn.Module):
    """The sample MLP called with keyword inputs, as Hugging Face models are."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.inner(features)


def test_dict_batches_of_model_kwargs(cli_reports):
    x, y = _tensors("mlp")
    batches = [{"features": x[i : i + 64], "labels": y[i : i + 64]} for i in range(0, x.shape[0], 64)]
    report = fitcli.audit(_KwargsMLP(_live("mlp")), batches, device="cpu")
    cli = json.loads(json.dumps(cli_reports["mlp"]))
    for lay in cli["layers"]:  # the same layers, one module deeper
        lay["name"] = "inner." + lay["name"]
    _assert_same(report, cli)


@pytest.mark.parametrize("how", ["function", "module"])
def test_callable_loss_equals_the_default(how, cli_reports):
    x, y = _tensors("mlp")
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    if how == "function":
        def loss(output, batch):
            return F.cross_entropy(output, batch.targets, reduction="none")
    else:
        loss = nn.CrossEntropyLoss()  # reduction "mean": fitcli uses a copy with reduction "none"
    report = fitcli.audit(_live("mlp"), loader, loss=loss, device="cpu")
    _assert_same(report, cli_reports["mlp"])
    if how == "module":
        assert loss.reduction == "mean"  # the caller's loss module is unchanged


def test_a_different_loss_changes_the_gradient_metrics(cli_reports):
    x, y = _tensors("mlp")
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    # the sum of the logits: dL/dh is the same for every sample, so taylor differs from cross-entropy's
    report = fitcli.audit(_live("mlp"), loader, loss=lambda out, batch: out.sum(dim=1), device="cpu")
    _assert_same(report, cli_reports["mlp"], ACTIVATION_METRICS)
    got = report.layer("fc1").metrics["taylor"]
    want = torch.tensor([v if v is not None else math.nan for v in cli_reports["mlp"]["layers"][0]["metrics"]["taylor"]],
                        dtype=torch.float64)
    assert not torch.allclose(got, want)


def test_caller_rng_and_train_mode_are_untouched():
    x, y = _tensors("mlp")
    model = _live("mlp")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    # a shuffling loader draws from the global RNG; the audit must still leave the caller's state as it was
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    fitcli.audit(model, loader, device="cpu", metrics=["act_mean", "taylor"])
    assert torch.equal(torch.get_rng_state(), state)
    assert all(m.training for m in model.modules()), "the caller's train mode is restored"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_audit_is_deterministic_under_its_own_seed():
    x, y = _tensors("mlp")
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    a = fitcli.audit(_live("mlp"), loader, device="cpu", metrics=["act_entropy", "taylor"])
    torch.manual_seed(99)
    b = fitcli.audit(_live("mlp"), loader, device="cpu", metrics=["act_entropy", "taylor"])
    for la, lb in zip(a.layers, b.layers, strict=True):
        for m in la.metrics:
            assert torch.equal(la.metrics[m], lb.metrics[m])


def test_report_object_round_trips(tmp_path, cli_reports):
    x, y = _tensors("mlp")
    report = fitcli.audit(_live("mlp"), [(x, y)], device="cpu", tau=0.0)
    assert report.dead == {"fc1": [3, 17], "fc2": [5, 20]}
    path = report.save(tmp_path / "r.json")
    back = AuditReport.load(path)
    assert back.to_dict() == report.to_dict()
    assert json.loads(report.to_json()) == report.to_dict()
    fitcli.report.validate(report.to_dict())
    assert back.layer("fc2").metrics["act_mean"].dtype == torch.float64
    with pytest.raises(KeyError):
        back.layer("fc9")
    rows = back.ranked(by="act_mean", top=4)
    assert {(r["layer"], r["unit"]) for r in rows} == {("fc1", 3), ("fc1", 17), ("fc2", 5), ("fc2", 20)}
    with pytest.raises(fitcli.UsageError):
        back.ranked(by="nosuch")


def test_to_pandas_has_a_row_per_unit():
    pd = pytest.importorskip("pandas")  # a dev dependency: installed by make test
    x, y = _tensors("mlp")
    report = fitcli.audit(_live("mlp"), [(x, y)], device="cpu", metrics=["act_mean", "dormant"])
    df = report.to_pandas()
    assert isinstance(df, pd.DataFrame)
    assert len(df) == 32 + 32 + 4
    assert list(df.columns[:4]) == ["layer", "unit", "final", "dead"]
    assert set(df[df["dead"]].apply(lambda r: (r["layer"], r["unit"]), axis=1)) == {
        ("fc1", 3), ("fc1", 17), ("fc2", 5), ("fc2", 20)}
    assert df[(df.layer == "fc2") & (df.unit == 5)]["act_mean"].item() == 0.0


def test_ablate_inspect_and_gate_take_live_objects():
    x, y = _tensors("mlp")
    model = _live("mlp")
    info = fitcli.inspect(model)
    assert [(lay["name"], lay["activation_point"]) for lay in info.layers] == [("fc1", "relu1"), ("fc2", "relu2"),
                                                                               ("fc3", "fc3")]
    ab = fitcli.ablate(model, [(x[:128], y[:128])], layers=["fc2"], units=[5, 9, 20], device="cpu")
    vals = ab.layer("fc2").metrics["ablation"]
    assert float(vals[5]) == 0.0 and float(vals[20]) == 0.0  # dead: removing them changes nothing
    assert float(vals[9]) != 0.0  # the constant unit (5.0) matters under zero ablation
    assert math.isnan(float(vals[0]))  # not asked for
    assert ab.removable == {"fc2": [5, 20]}
    report = fitcli.audit(model, [(x, y)], device="cpu", metrics=["dormant"])
    assert fitcli.gate(report, max_dead=10).passed  # 4/64 = 6.25 %
    verdict = fitcli.gate(report, max_dead=5)
    assert not verdict.passed and "max_dead 5%" in verdict.failures[0]
    assert report.gate_result is not None and not report.gate_result.passed


def test_settings_object_and_bad_settings_fail_before_loading(monkeypatch):
    import fitcli.api as api

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(api, "load", boom)
    for bad in (dict(tau=-1), dict(rank_by="nosuch"), dict(metrics=["nosuch"]), dict(ablation_mode="half"),
                dict(top=-1), dict(batch_size=0), dict(validate_units=1), dict(rank_by="auto")):
        with pytest.raises(fitcli.UsageError):
            fitcli.audit("never-loaded.pt", None, **bad)
    with pytest.raises(TypeError, match="nosuch"):  # the settings are typed keywords: Python names the unknown one
        fitcli.audit("never-loaded.pt", None, nosuch=1)
    with pytest.raises(fitcli.UsageError):
        fitcli.audit("never-loaded.pt", None, loss="nosuch")
    with pytest.raises(fitcli.UsageError):
        fitcli.audit("never-loaded.pt", None, settings=fitcli.Settings(tau=float("nan")))


def test_one_shot_iterators_and_odd_objects_are_refused_with_a_message():
    model = _live("mlp")
    x, _ = _tensors("mlp")
    with pytest.raises(fitcli.UsageError, match="one-shot"):
        fitcli.audit(model, (x[i : i + 8] for i in range(0, 32, 8)))
    with pytest.raises(fitcli.UsageError, match="iterable"):
        fitcli.audit(model, 3.5)
    with pytest.raises(fitcli.UsageError, match="nn.Module"):
        fitcli.audit(42, [x])
    # a function returning a fresh iterator is fine
    report = fitcli.audit(model, lambda: (x[i : i + 64] for i in range(0, 128, 64)), device="cpu",
                          metrics=["act_mean"])
    assert report["data"]["samples"] == 128


def test_library_errors_never_name_a_flag():
    """The library is called from Python: its messages name settings, not command-line flags."""
    import ast
    import re

    flag = re.compile(r"(^|[\s(`'\"])--[a-z][a-z-]+")
    offenders = []
    for path in sorted((REPO / "fitcli").rglob("*.py")):
        if path.name in ("cli.py", "clikit.py") or path.name.startswith("cmd_") or "render" in path.parts:
            continue  # the command line and its renderers speak in flags
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                    "UsageError", "InputError", "RuntimeAuditError", "FitcliError", "UnsafeCheckpointError"):
                text = ast.unparse(node)
                if flag.search(text):
                    offenders.append(f"{path.name}:{node.lineno}: {text[:100]}")
    assert not offenders, "\n".join(offenders)


def test_ablation_accuracy_is_a_registered_metric_that_audit_and_ablate_agree_on():
    """Exact ablation runs through the metric contract: ``ablation_accuracy`` is registered like
    ``ablation``, ``audit`` computes both through the engine, ``ablate`` gives the same numbers,
    and both equal a brute-force loop (a forward hook zeroing one unit at a time)."""
    from fitcli.metrics.registry import get_metric

    cls = get_metric("ablation_accuracy")
    assert cls.opt_in and "ablation" in cls.needs and "labels" in cls.needs
    model = _live("mlp")
    x, y = _tensors("mlp")
    x, y = x[:128], y[:128]
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    via_audit = fitcli.audit(model, loader, metrics=["ablation", "ablation_accuracy"], layers=["fc2"], device="cpu")
    via_ablate = fitcli.ablate(model, loader, layers=["fc2"], device="cpu")
    with torch.no_grad():
        base_out = model(x)
        base_loss = F.cross_entropy(base_out, y, reduction="none")
        base_ok = (base_out.argmax(1) == y).double()
        d_loss, d_acc = [], []
        for u in range(32):
            h = model.fc2.register_forward_hook(lambda m, i, o, u=u: o.index_fill(1, torch.tensor([u]), 0.0))
            out = model(x)
            h.remove()
            d_loss.append(float((F.cross_entropy(out, y, reduction="none") - base_loss).double().mean()))
            d_acc.append(float(((out.argmax(1) == y).double() - base_ok).mean()))
    for r in (via_audit, via_ablate):
        lay = r.layer("fc2")
        assert torch.allclose(lay.metrics["ablation"], torch.tensor(d_loss, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(lay.metrics["ablation_accuracy"], torch.tensor(d_acc, dtype=torch.float64), atol=1e-12)
        assert r.metric_info["ablation_accuracy"]["needs"] == sorted(cls.needs)
    assert via_ablate.removable["fc2"] == via_audit.removable["fc2"]
