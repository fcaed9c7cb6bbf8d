"""A third-party metric installed through the ``fitcli.metrics`` entry-point group.

The plugin is a real (if tiny) distribution: a module plus a ``*.dist-info`` folder with
``METADATA`` and ``entry_points.txt``, put on ``sys.path`` for the test only. It declares a
working metric (``max_abs``) and a broken one (``broken``, pointing at a missing class). The
registry cache is refreshed when the plugin appears and again when it is gone.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fitcli.cli import main
from fitcli.metrics.registry import load_registry
from fitcli.testing import check_metric

REPO = Path(__file__).resolve().parents[1]
SM = REPO / "sample_models"
MLP_ARGS = ["score", str(SM / "mlp.safetensors"), "--arch", f"{SM / 'models.py'}:mlp",
            "--data", str(SM / "mlp_data.safetensors"), "--device", "cpu"]

PLUGIN_SRC = '''
import torch

from fitcli.metrics.base import Metric


class MaxAbs(Metric):
    name = "max_abs"
    needs = frozenset({"activations"})
    higher_is_better = True
    cost = "1 forward"
    description = "max |h| over all observations"

    def setup(self):
        self.add_state("max", torch.zeros(self.units, dtype=torch.float64), "max")

    def update(self, batch):
        if batch.act is None:
            return
        self.max = torch.maximum(self.max, batch.act.abs().amax(dim=(0, 2)).to(self.max.device))

    def compute(self):
        return self.max.clone()


class NoDirection(MaxAbs):
    """Says nothing about which way is fit: rankings could not use it."""
    name = "nodir"
    higher_is_better = None


class OddNeed(MaxAbs):
    """Needs something no run can give."""
    name = "oddneed"
    needs = frozenset({"activations", "vibes"})
'''

ENTRY_POINTS = ("[fitcli.metrics]\nmax_abs = myplug:MaxAbs\nbroken = myplug:DoesNotExist\n"
                "nodir = myplug:NoDirection\noddneed = myplug:OddNeed\n")


def _install(where: Path) -> None:
    (where / "myplug.py").write_text(PLUGIN_SRC)
    info = where / "myplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: myplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)


@pytest.fixture
def _plugin(tmp_path, monkeypatch):
    """The plugin on sys.path and in the registry; both undone (and the registry refreshed)."""
    _install(tmp_path)
    try:
        with monkeypatch.context() as mp:
            mp.syspath_prepend(str(tmp_path))
            yield load_registry(refresh=True)
    finally:
        sys.modules.pop("myplug", None)
        importlib.invalidate_caches()
        load_registry(refresh=True)


@pytest.fixture
def _cli(capsys, monkeypatch):
    monkeypatch.delenv("FITCLI_VERBOSE", raising=False)

    def run(args: list[str]) -> tuple[int, str, str]:
        capsys.readouterr()
        old = signal.getsignal(signal.SIGTERM)
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            signal.signal(signal.SIGTERM, old)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def _independent_max_abs() -> dict[str, list[float]]:
    """max |h| per unit at each activation point of the sample MLP, with our own hooks."""
    spec = importlib.util.spec_from_file_location("_sample_models_for_plugin_test", SM / "models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.mlp()
    model.load_state_dict(load_file(str(SM / "mlp.safetensors")))
    model.eval()
    x = load_file(str(SM / "mlp_data.safetensors"))["inputs"]
    got: dict[str, torch.Tensor] = {}
    handles = [getattr(model, point).register_forward_hook(lambda m, i, o, k=layer: got.__setitem__(k, o))
               for layer, point in (("fc1", "relu1"), ("fc2", "relu2"), ("fc3", "fc3"))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {k: v.abs().amax(dim=0).double().tolist() for k, v in got.items()}


def test_registry_loads_the_plugin_and_records_the_broken_one(_plugin):
    reg = _plugin
    assert reg["max_abs"].cls is not None and reg["max_abs"].cls.__name__ == "MaxAbs"
    assert reg["max_abs"].value == "myplug:MaxAbs"
    assert reg["broken"].cls is None
    assert "DoesNotExist" in reg["broken"].error
    assert reg["taylor"].cls is not None  # built-ins unaffected
    assert list(reg) == sorted(reg)  # discovery is sorted


def test_metrics_command_lists_plugin_and_broken_entry(_plugin, _cli):
    code, out, err = _cli(["metrics", "--format", "json"])
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["max_abs"]["needs"] == ["activations"]
    assert rows["max_abs"]["description"] == "max |h| over all observations"
    assert "error" not in rows["max_abs"]
    assert rows["broken"]["entry_point"] == "myplug:DoesNotExist"
    assert "DoesNotExist" in rows["broken"]["error"]
    code, out, err = _cli(["metrics"])
    assert code == 0
    assert "max_abs" in out and "broken" in out and "failed to load" in out


def test_score_with_the_plugin_metric(_plugin, _cli):
    code, out, err = _cli(MLP_ARGS + ["--metric", "max_abs", "--format", "json"])
    assert code == 0, err
    report = json.loads(out)
    assert report["settings"]["metrics"] == ["max_abs"]
    assert report["metric_info"]["max_abs"]["description"] == "max |h| over all observations"
    want = _independent_max_abs()
    for lay in report["layers"]:
        assert lay["metrics"]["max_abs"] == pytest.approx(want[lay["name"]], rel=1e-6, abs=1e-7)
    fc1 = next(lay for lay in report["layers"] if lay["name"] == "fc1")
    assert fc1["metrics"]["max_abs"][3] == 0.0 and fc1["metrics"]["max_abs"][17] == 0.0  # dead units


def test_asking_for_the_broken_plugin_is_a_usage_error(_plugin, _cli):
    code, out, err = _cli(MLP_ARGS + ["--metric", "broken"])
    assert code == 2
    assert out == ""
    assert "broken" in err and "failed to load" in err
    assert "Traceback" not in err


def test_a_run_not_asking_for_the_broken_plugin_succeeds(_plugin, _cli):
    code, out, err = _cli(MLP_ARGS + ["--format", "json"])  # default: every loadable metric
    assert code == 0, err
    report = json.loads(out)
    assert "max_abs" in report["settings"]["metrics"]
    assert "broken" not in report["settings"]["metrics"]
    assert report["summary"]["dead"] == 4


def test_close_match_suggests_the_plugin_metric(_plugin, _cli):
    code, out, err = _cli(MLP_ARGS + ["--metric", "max_ab"])
    assert code == 2
    assert "max_abs" in err


def test_check_metric_passes_for_the_plugin(_plugin):
    check_metric(_plugin["max_abs"].cls)


def test_refresh_drops_a_plugin_that_is_gone(tmp_path, monkeypatch):
    _install(tmp_path)
    try:
        with monkeypatch.context() as mp:
            mp.syspath_prepend(str(tmp_path))
            assert "max_abs" in load_registry(refresh=True)
            assert "max_abs" in load_registry()  # cached
        assert "max_abs" in load_registry()  # still the cached view until refreshed
    finally:
        sys.modules.pop("myplug", None)
        importlib.invalidate_caches()
        reg = load_registry(refresh=True)
    assert "max_abs" not in reg and "broken" not in reg
    assert "taylor" in reg


def test_a_metric_that_raises_is_named_and_not_blamed_on_the_data(monkeypatch):
    """prepare() runs inside the model's forward, where a data/model mismatch is also caught: a
    metric's own exception must come out as that metric's failure (exit 4), naming it."""
    import torch

    from fitcli.data import Batch, DataSource
    from fitcli.engine import audit
    from fitcli.errors import RuntimeAuditError
    from fitcli.loading import LoadedModel
    from fitcli.metrics.activations import ActMean

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    batches = [Batch((torch.randn(5, 4),), {}, torch.tensor([0, 1, 0, 1, 1]))]
    data = DataSource("t", lambda: iter(batches), None)
    loaded = LoadedModel("m", "memory", "-", model.state_dict(), module=model)

    def boom(self, batch):
        raise ValueError("plugin bug")

    for hook in ("prepare", "update"):
        with monkeypatch.context() as mp:
            mp.setattr(ActMean, hook, boom)
            with pytest.raises(RuntimeAuditError, match=r"metric 'act_mean' failed on layer 0, batch 0: ValueError: plugin bug"):
                audit(loaded, data, metrics=["act_mean"], device="cpu")


def test_a_metric_without_direction_or_with_an_unknown_need_is_rejected(_plugin, _cli):
    """The contract is checked at registration (the registry records why) and by check_metric."""
    import myplug

    reg = _plugin
    assert reg["nodir"].cls is None and "higher_is_better" in reg["nodir"].error
    assert reg["oddneed"].cls is None and "vibes" in reg["oddneed"].error
    for cls, word in ((myplug.NoDirection, "direction"), (myplug.OddNeed, "vibes")):
        with pytest.raises(AssertionError, match=word):
            check_metric(cls)
    code, out, err = _cli(["metrics", "--format", "json"])
    rows = {r["name"]: r for r in json.loads(out)}
    assert "higher_is_better" in rows["nodir"]["error"] and "vibes" in rows["oddneed"]["error"]
    assert rows["max_abs"]["higher_is_better"] is True
    # asking for one is a usage error naming the contract, before any audit
    code, out, err = _cli(["score", str(SM / "mlp.safetensors"), "--arch", f"{SM / 'models.py'}:mlp",
                           "--data", str(SM / "mlp_data.safetensors"), "--metric", "nodir", "--device", "cpu"])
    assert code == 2 and "higher_is_better" in err


def test_every_builtin_metric_declares_a_direction_and_known_needs():
    from fitcli.metrics.base import NEEDS, contract_problems

    reg = load_registry(refresh=True)
    for name, entry in reg.items():
        assert entry.cls is not None, (name, entry.error)
        assert contract_problems(entry.cls) == [], name
        assert entry.cls.higher_is_better in (True, False)
        assert entry.cls.all_needs() <= set(NEEDS)
    # the spec: APoZ is the one unit metric where lower is fit; attention entropy (heads only, not in
    # the spec's unit table) counts a focused head as the fitter one
    assert sorted(n for n, e in reg.items() if not e.cls.higher_is_better) == ["apoz", "attn_entropy", "redundancy"]
