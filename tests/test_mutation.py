"""fitcli never mutates the model: not on a normal run, not when the forward raises mid-ablation,
not on Ctrl-C / SIGTERM (README.md: "The model is never modified"; docs/cli.md
exit codes 130/143 via ``Interrupted``)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import strapi as api
import torch
import torch.fx
import torch.nn.functional as F
import torch.nn.modules.module as torch_module
from safetensors.torch import load_file, save_file
from strapi import load_model
from torch import nn

from fitcli.errors import FitcliError, InputError, RuntimeAuditError
from fitcli.loading import LoadedModel

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"

MUT_LAYERS = {
    "mlp": ["fc1", "fc2"],
    "cnn": ["conv1", "conv2", "fc1"],
    "resmlp": ["embed", "blocks.0.fc_in", "blocks.0.fc_out", "blocks.1.fc_in"],
}



@pytest.fixture(autouse=True, scope="module")
def _mut_single_thread():
    """Tiny models on a 2-core box: one intra-op thread is faster, and far faster under load."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --------------------------------------------------------------------------------------------
# helpers


def _mut_model_hash(model: nn.Module) -> str:
    """sha256 over the bytes of every parameter and buffer (names, dtypes and shapes included)."""
    h = hashlib.sha256()
    items = [("p:" + n, t) for n, t in model.named_parameters()] + [("b:" + n, t) for n, t in model.named_buffers()]
    assert items, "model has no parameters"
    for name, t in sorted(items, key=lambda kv: kv[0]):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _mut_flags(model: nn.Module) -> dict:
    return {
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad_none": {n: p.grad is None for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


def _mut_file_sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _mut_assert_no_hooks(model: nn.Module) -> None:
    for name, m in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
            hooks = getattr(m, attr, None)
            assert not hooks, f"module {name or '<root>'} still has {attr}: {dict(hooks)}"
    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks"):
        assert not getattr(torch_module, attr), f"global {attr} left behind"
    assert torch._C._len_torch_function_stack() == 0, "a TorchFunctionMode is still active"
    assert torch.is_grad_enabled(), "grad mode was left disabled"


def _mut_load(name: str) -> LoadedModel:
    return load_model(str(SAMPLES / f"{name}.safetensors"), arch=f"{SAMPLES / 'models.py'}:{name}")


def _mut_example(name: str) -> torch.Tensor:
    return load_file(str(SAMPLES / f"{name}_data.safetensors"))["inputs"][:32]


# --------------------------------------------------------------------------------------------
# normal runs


@pytest.mark.parametrize("name", list(MUT_LAYERS))
def test_normal_ablate_and_score_do_not_mutate(name):
    ckpt = SAMPLES / f"{name}.safetensors"
    data = str(SAMPLES / f"{name}_data.safetensors")
    file_before = _mut_file_sha(ckpt)
    loaded = _mut_load(name)
    model = loaded.module
    x = _mut_example(name)
    with torch.no_grad():
        out_before = model(x).clone()
    h0, flags0 = _mut_model_hash(model), _mut_flags(model)
    sd_before = {k: v.detach().clone() for k, v in loaded.state_dict.items()}

    for mode in ("zero", "mean"):
        rep = api.ablate(loaded, layers=MUT_LAYERS[name], data=data, mode=mode, device="cpu", whole_layer=True,
                         max_batches=2, chunk_size=5)
        assert all(v is not None for lay in rep["layers"] for v in lay["metrics"]["ablation"])
        assert _mut_model_hash(model) == h0, f"ablate ({mode}) changed the model's parameters/buffers"
        assert _mut_flags(model) == flags0
        _mut_assert_no_hooks(model)

    rep = api.score(loaded, data=data, device="cpu", max_batches=2,
                    metrics=["weight_norm", "grad_norm", "act_mean", "act_entropy", "taylor", "taylor_delta",
                             "ablation", "composite"])
    assert rep["layers"] and all("ablation" in lay["metrics"] for lay in rep["layers"])
    assert _mut_model_hash(model) == h0, "score changed the model's parameters/buffers"
    assert _mut_flags(model) == flags0, "score left requires_grad/.grad/training changed"
    _mut_assert_no_hooks(model)
    rep = api.score(loaded, data=data, device="cpu", max_batches=2)  # the default metric set
    assert _mut_model_hash(model) == h0
    assert _mut_flags(model) == flags0
    _mut_assert_no_hooks(model)

    for k, v in sd_before.items():
        assert torch.equal(loaded.state_dict[k], v), k
    with torch.no_grad():
        assert torch.equal(model(x), out_before), "the model computes something else after the runs"
    assert _mut_file_sha(ckpt) == file_before


# --------------------------------------------------------------------------------------------
# a forward that raises mid-ablation

_MUT_BOMB: dict = {"armed": False, "rows": 0, "nth": 2, "count": 0, "exc": RuntimeError, "fired": 0, "where": None}


def _mut_bomb(t):
    """Identity; when armed, raises on the ``nth`` call that sees more than ``rows`` rows (K*B)."""
    b = _MUT_BOMB
    if b["armed"] and t.shape[0] > b["rows"]:
        b["count"] += 1
        if b["count"] == b["nth"]:
            b["fired"] += 1
            names = [f.name for f in traceback.extract_stack()]
            b["where"] = " > ".join(n for n in names if n in _MUT_PHASES) or "?"
            raise b["exc"]("simulated failure in the model's forward")
    return t


torch.fx.wrap("_mut_bomb")  # a leaf in the traced graph, so it runs (and counts) at run time


class _MutBombMLP(nn.Module):
    """The sample MLP (same parameter names) with a bomb between relu2 and fc3."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(32, 32)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(32, 4)

    def body(self, x):
        h = self.relu1(self.fc1(x))
        h = F.relu(self.fc2(h))  # a functional point: the runtime path needs its TorchFunctionMode
        # after the last layer: an identity before fc3 would be followed as part of fc2's chain
        # (it is channel-wise), and the ablation suffix would start after it
        return _mut_bomb(self.fc3(h))

    def forward(self, x):
        return self.body(x)


class _MutBombBranchy(_MutBombMLP):
    def forward(self, x):
        if bool(torch.isfinite(x).all()):  # torch.fx cannot trace this: input-expansion fallback
            return self.body(x)
        raise ValueError("non-finite input")


def _mut_bomb_loaded(cls) -> LoadedModel:
    model = cls()
    model.load_state_dict(load_file(str(SAMPLES / "mlp.safetensors")), strict=True)
    model.eval()
    return LoadedModel(path="bomb.safetensors", format="safetensors", sha256="0" * 64,
                       state_dict=model.state_dict(), module=model, arch=cls.__name__)


@pytest.fixture
def mut_bomb():
    _MUT_BOMB.update(armed=False, rows=0, nth=2, count=0, exc=RuntimeError, fired=0)
    yield _MUT_BOMB
    _MUT_BOMB.update(armed=False, count=0, fired=0)


@pytest.mark.parametrize("mode", ["zero", "mean"])
@pytest.mark.parametrize("layer", ["fc1", "fc2"])
@pytest.mark.parametrize("traceable", [True, False], ids=["graph-suffix", "input-expansion"])
def test_forward_raising_mid_chunk_leaves_model_intact(traceable, layer, mode, mut_bomb):
    loaded = _mut_bomb_loaded(_MutBombMLP if traceable else _MutBombBranchy)
    model = loaded.module
    x = _mut_example("mlp")
    with torch.no_grad():
        out_before = model(x).clone()
    h0, flags0 = _mut_model_hash(model), _mut_flags(model)
    data = str(SAMPLES / "mlp_data.safetensors")

    # the bomb is harmless until armed: the same run succeeds
    ok = api.ablate(loaded, layers=[layer], data=data, mode=mode, device="cpu", chunk_size=4, max_batches=2)
    method = ok["metric_info"]["ablation"]["method"][layer]
    assert method.startswith("graph-suffix") if traceable else method == "input-expansion"

    # armed: the second chunk of K=4 copies (4*64 rows) raises
    mut_bomb.update(armed=True, rows=64, nth=2, count=0)
    with pytest.raises(FitcliError) as exc:
        api.ablate(loaded, layers=[layer], data=data, mode=mode, device="cpu", chunk_size=4, max_batches=2)
    assert mut_bomb["fired"] == 1, "the bomb did not go off inside a chunk"
    assert isinstance(exc.value, (RuntimeAuditError, InputError)), type(exc.value)
    assert "simulated failure" in str(exc.value) or "RuntimeError" in str(exc.value)
    assert "\n" not in exc.value.message

    assert _mut_model_hash(model) == h0, "parameters changed after a failed ablation"
    assert _mut_flags(model) == flags0
    _mut_assert_no_hooks(model)
    mut_bomb.update(armed=False)
    with torch.no_grad():
        assert torch.equal(model(x), out_before)
    # and the model is still usable by fitcli: same numbers as before the failure
    again = api.ablate(loaded, layers=[layer], data=data, mode=mode, device="cpu", chunk_size=4, max_batches=2)
    lay_ok = next(lay for lay in ok["layers"] if lay["name"] == layer)
    lay_again = next(lay for lay in again["layers"] if lay["name"] == layer)
    assert lay_again["metrics"]["ablation"] == lay_ok["metrics"]["ablation"]


_MUT_PHASES = ("runtime_discover", "unit_means", "_graph_base", "_graph_rows", "_input_rows", "_whole",
               "ablate_layers")


@pytest.mark.parametrize("traceable", [True, False], ids=["graph-suffix", "input-expansion"])
def test_forward_raising_anywhere_is_a_fitcli_error(traceable, mut_bomb):
    """Wherever the model's forward raises during ``api.ablate`` (runtime discovery, the mean pass,
    the base pass, a chunk, the whole-layer pass), the caller gets a fitcli error (exit 3/4 with a
    one-line message, not 'unexpected RuntimeError'), the model is untouched and no hook is left."""
    loaded = _mut_bomb_loaded(_MutBombMLP if traceable else _MutBombBranchy)
    model = loaded.module
    h0, flags0 = _mut_model_hash(model), _mut_flags(model)
    kw = dict(layers=["fc2"], data=str(SAMPLES / "mlp_data.safetensors"), mode="mean", device="cpu",
              chunk_size=8, max_batches=2, whole_layer=True)
    # count the forwards of a normal run (the bomb sits in every forward, after fc2's point)
    # rows=2: discovery probes each channel-wise op on a 2-row input; those calls are not forwards
    mut_bomb.update(armed=True, rows=2, nth=10**9, count=0)
    api.ablate(loaded, **kw)
    total = mut_bomb["count"]
    assert total >= 12, total  # 2 mean-pass + 2 x (base + 4 chunks + whole), + discovery for the fallback
    wrong = []
    for nth in range(1, total + 1):
        mut_bomb.update(armed=True, rows=2, nth=nth, count=0, fired=0, where=None)
        try:
            api.ablate(loaded, **kw)
        except (RuntimeAuditError, InputError) as e:
            assert "\n" not in e.message, e.message
        except Exception as e:  # noqa: BLE001 - the point of the test
            wrong.append(f"forward #{nth} (in {mut_bomb['where']}): raw {type(e).__name__}: {e}")
        else:
            wrong.append(f"forward #{nth} (in {mut_bomb['where']}): no error at all")
        assert mut_bomb["fired"] == 1, nth
        assert _mut_model_hash(model) == h0, f"parameters changed after the forward #{nth} failure"
        assert _mut_flags(model) == flags0, nth
        _mut_assert_no_hooks(model)
    assert not wrong, "model errors that escaped as non-fitcli errors:\n  " + "\n  ".join(wrong)


@pytest.mark.parametrize("traceable", [True, False], ids=["graph-suffix", "input-expansion"])
def test_keyboard_interrupt_mid_chunk_leaves_model_intact(traceable, mut_bomb):
    loaded = _mut_bomb_loaded(_MutBombMLP if traceable else _MutBombBranchy)
    model = loaded.module
    h0, flags0 = _mut_model_hash(model), _mut_flags(model)
    mut_bomb.update(armed=True, rows=64, nth=3, count=0, exc=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        api.ablate(loaded, layers=["fc1"], data=str(SAMPLES / "mlp_data.safetensors"), mode="zero", device="cpu",
                   chunk_size=4, max_batches=2)
    assert mut_bomb["fired"] == 1
    assert _mut_model_hash(model) == h0
    assert _mut_flags(model) == flags0
    _mut_assert_no_hooks(model)


# --------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM in a real process

_SLOW_DATA_SRC = '''
import pathlib
import time

import torch

MARKER = pathlib.Path(__file__).with_name("started")


def batches():
    g = torch.Generator().manual_seed(0)
    for i in range(40):
        x = torch.randn(8, 16, generator=g)
        y = torch.randint(0, 4, (8,), generator=g)
        MARKER.touch()
        time.sleep(0.5)
        yield x, y
'''

_SLOW_MODEL_SRC = '''
import pathlib
import time

import torch
import torch.nn as nn

MARKER = pathlib.Path(__file__).with_name("started")
CALLS = [0]


class SlowMLP(nn.Module):
    """The sample MLP's parameter names; every forward sleeps, and forward #3 (the first ablation
    chunk: 1 = discovery, 2 = the base pass of batch 0) drops a marker file."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(32, 32)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(32, 4)

    def forward(self, x):
        if bool(torch.isfinite(x).all()):  # not traceable: the forward runs as Python every time
            CALLS[0] += 1
            if CALLS[0] >= 3:
                MARKER.touch()
            time.sleep(0.2)
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(x)))))


def slow_mlp():
    return SlowMLP()
'''


def _mut_run_and_signal(tmp_path: Path, argv: list[str], sig: int) -> tuple[int, str, str]:
    marker = tmp_path / "started"
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    env.pop("FITCLI_VERBOSE", None)

    def child_setup():  # a parent that ignores SIGINT (background job) must not leak that into the test
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    proc = subprocess.Popen([sys.executable, "-m", "fitcli", *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=child_setup)
    try:
        deadline = time.monotonic() + 90
        while not marker.exists():
            if proc.poll() is not None:
                out, err = proc.communicate(timeout=10)
                pytest.fail(f"fitcli exited ({proc.returncode}) before it got going:\n{err}\n{out}")
            if time.monotonic() > deadline:
                pytest.fail("fitcli did not start within 90 s")
            time.sleep(0.05)
        time.sleep(0.3)
        assert proc.poll() is None, "the run finished before the signal; make it slower"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    return proc.returncode, out, err


@pytest.fixture
def mut_sig_setup(tmp_path):
    ckpt = tmp_path / "model.safetensors"
    shutil.copyfile(SAMPLES / "mlp.safetensors", ckpt)
    (tmp_path / "slow_data.py").write_text(_SLOW_DATA_SRC)
    (tmp_path / "slow_model.py").write_text(_SLOW_MODEL_SRC)
    d = load_file(str(SAMPLES / "mlp_data.safetensors"))
    data = tmp_path / "data.safetensors"
    save_file({"inputs": d["inputs"][:64].contiguous(), "targets": d["targets"][:64].contiguous()}, str(data))
    outdir = tmp_path / "out"
    outdir.mkdir()
    return {"ckpt": ckpt, "data": data, "outdir": outdir}


_MUT_SIGNALS = [pytest.param(signal.SIGINT, 130, "SIGINT", id="SIGINT-130"),
                pytest.param(signal.SIGTERM, 143, "SIGTERM", id="SIGTERM-143")]


def _mut_check_interrupted(code, out, err, expect_code, signame, setup, before):
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == expect_code, f"exit {code}, expected {expect_code}; stderr:\n{err}"
    assert len(lines) == 1, f"expected a one-line message, got:\n{err}"
    assert "interrupt" in lines[0].lower() and signame in lines[0], lines[0]
    assert not (setup["outdir"] / "report.json").exists(), "a report was written despite the interrupt"
    assert list(setup["outdir"].iterdir()) == [], f"left behind: {list(setup['outdir'].iterdir())}"
    assert _mut_file_sha(setup["ckpt"]) == before["ckpt"], "the checkpoint file changed"
    assert _mut_file_sha(setup["data"]) == before["data"], "the data file changed"


@pytest.mark.parametrize("sig,expect_code,signame", _MUT_SIGNALS)
def test_signal_while_reading_data(sig, expect_code, signame, mut_sig_setup, tmp_path):
    """The signal arrives while the user's data callable is producing a batch."""
    s = mut_sig_setup
    before = {"ckpt": _mut_file_sha(s["ckpt"]), "data": _mut_file_sha(s["data"])}
    argv = ["ablate", str(s["ckpt"]), "--arch", f"{SAMPLES / 'models.py'}:mlp", "--data", "slow_data.py:batches",
            "--layer", "fc2", "--device", "cpu", "--output", str(s["outdir"] / "report.json"), "--quiet"]
    code, out, err = _mut_run_and_signal(tmp_path, argv, sig)
    _mut_check_interrupted(code, out, err, expect_code, signame, s, before)


@pytest.mark.parametrize("sig,expect_code,signame", _MUT_SIGNALS)
def test_signal_during_ablation_forward(sig, expect_code, signame, mut_sig_setup, tmp_path):
    """The signal arrives inside the model's forward while a chunk of units is being ablated."""
    s = mut_sig_setup
    before = {"ckpt": _mut_file_sha(s["ckpt"]), "data": _mut_file_sha(s["data"])}
    argv = ["ablate", str(s["ckpt"]), "--arch", "slow_model.py:slow_mlp", "--data", str(s["data"]),
            "--layer", "fc2", "--chunk-size", "1", "--batch-size", "8", "--device", "cpu",
            "--output", str(s["outdir"] / "report.json"), "--quiet"]
    code, out, err = _mut_run_and_signal(tmp_path, argv, sig)
    _mut_check_interrupted(code, out, err, expect_code, signame, s, before)
