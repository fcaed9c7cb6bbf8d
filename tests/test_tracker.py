"""fitcli.Tracker: the streaming metrics of the caller's own training steps.

Each record must equal an offline ``fitcli.audit`` of that step's batches with the weights the step
ran with (snapshotted here before the step), and a few values are also recomputed by brute force
(per-sample loops). The model, its gradients and the optimizer's state must be bitwise identical
with and without the tracker, and no hook may outlive it. ``fitcli history`` reads the file back.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import fitcli
from fitcli.errors import InputError, UsageError
from fitcli.tracker import Tracker, died_at, history_summary, read_history

REPO = Path(__file__).resolve().parents[1]
SM = REPO / "sample_models"
TOL = 1e-5


def _models():
    spec = importlib.util.spec_from_file_location("fitcli_tracker_sample_models", SM / "models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _live(name: str) -> nn.Module:
    m = getattr(_models(), name)()
    m.load_state_dict(load_file(str(SM / f"{name}.safetensors")))
    return m


def _data(name: str, n: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    d = load_file(str(SM / f"{name}_data.safetensors"))
    return [(d["inputs"][i:i + batch], d["targets"][i:i + batch]) for i in range(0, n * batch, batch)]


def _assert_record_matches(rec: dict, report: fitcli.AuditReport) -> None:
    """Every metric of every layer of the offline report, unit for unit (rel. and abs. 1e-5)."""
    assert set(rec["layers"]) == {lay.name for lay in report.layers}
    for lay in report.layers:
        got = rec["layers"][lay.name]
        assert got["units"] == lay.units and got["final"] == lay.final
        assert set(got["metrics"]) == set(lay.metrics), lay.name
        for name, want in lay.metrics.items():
            have = torch.tensor([math.nan if v is None else v for v in got["metrics"][name]], dtype=torch.float64)
            assert torch.allclose(have, want, rtol=TOL, atol=TOL, equal_nan=True), (rec["step"], lay.name, name)
        if not lay.final:
            assert got["dead"] == list(lay.dead), (rec["step"], lay.name)
    assert {n: e["dead"] for n, e in rec["layers"].items() if "dead" in e} == report.dead


def _train(model, batches, opt, tracker_kw=None, tmp=None, accumulate=1, snapshots=None):
    """A plain loop (mean cross-entropy); with ``tracker_kw`` a Tracker is attached (given the
    optimizer). Returns the tracker (closed) or None."""
    tracker = Tracker(model, tmp, optimizer=opt, **tracker_kw) if tracker_kw is not None else None
    try:
        for i in range(0, len(batches), accumulate):
            if snapshots is not None:
                snapshots.append(copy.deepcopy(model.state_dict()))
            opt.zero_grad()
            for x, y in batches[i:i + accumulate]:
                (F.cross_entropy(model(x), y) / accumulate).backward()
            opt.step()
    finally:
        if tracker is not None:
            tracker.close()
    return tracker


# --------------------------------------------------------------------------------------------
# each record = an offline audit of the step's batch with the step's weights


@pytest.mark.parametrize("name", ["cnn", "resmlp"])
def test_records_equal_offline_audit_of_each_observed_step(name, tmp_path):
    model = _live(name)
    batches = _data(name, 5, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    snaps: list[dict] = []
    tracker = _train(model, batches, opt, dict(every=2), tmp_path / "h.jsonl", snapshots=snaps)
    records = read_history(tmp_path / "h.jsonl")
    assert [r["step"] for r in records] == [0, 2, 4]
    for rec in records:
        k = rec["step"]
        offline = getattr(_models(), name)()
        offline.load_state_dict(snaps[k])
        # the tracker reads every layer; so does the audit (a transformer's: its MLP channels and rows)
        report = fitcli.audit(offline, [batches[k]], loss="cross_entropy", metrics=sorted(tracker.classes),
                              device="cpu", kinds=["mlp", "rows"] if name == "resmlp" else None)
        _assert_record_matches(rec, report)
        assert rec["batches"] == 1 and rec["samples"] == 32
    # the steps differ (the optimizer moved the weights): the records are not one value repeated
    assert records[0]["layers"] != records[2]["layers"]


def test_gradient_accumulation_and_loss_scale(tmp_path):
    """Two micro-batches per optimizer step, each loss divided by 2 (loss_scale=0.5): the step's
    record is the audit of both batches. Weight metrics (asked for) read the step's weights."""
    model = _live("mlp")
    batches = _data("mlp", 4, 16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    snaps: list[dict] = []
    asked = ["act_mean", "apoz", "dormant", "taylor", "grad_norm", "weight_norm", "weight_norm_out", "composite"]
    tracker = _train(model, batches, opt, dict(every=1, loss_scale=0.5, metrics=asked), tmp_path / "h.jsonl",
                     accumulate=2, snapshots=snaps)
    assert sorted(tracker.classes) == sorted(asked)
    records = read_history(tmp_path / "h.jsonl")
    assert [(r["step"], r["batches"], r["samples"]) for r in records] == [(0, 2, 32), (1, 2, 32)]
    for rec in records:
        k = rec["step"]
        offline = _models().mlp()
        offline.load_state_dict(snaps[k])
        report = fitcli.audit(offline, batches[2 * k:2 * k + 2], loss="cross_entropy",
                              metrics=sorted(tracker.classes), device="cpu")
        _assert_record_matches(rec, report)


def test_sum_reduction_gives_the_same_values_as_mean(tmp_path):
    model_a, model_b = _live("mlp"), _live("mlp")
    (x, y), = _data("mlp", 1, 24)
    with Tracker(model_a, loss_reduction="mean") as ta, Tracker(model_b, loss_reduction="sum") as tb:
        F.cross_entropy(model_a(x), y).backward()
        F.cross_entropy(model_b(x), y, reduction="sum").backward()
        ra, rb = ta.step(), tb.step()
    for lay in ra["layers"]:
        for m, va in ra["layers"][lay]["metrics"].items():
            vb = rb["layers"][lay]["metrics"][m]
            assert all((a is None and b is None) or abs(a - b) <= TOL * max(1.0, abs(a)) for a, b in zip(va, vb, strict=True)), (lay, m)


def test_values_by_brute_force():
    """act_mean, apoz and dormant of fc1 and Taylor of fc2 (MLP) from explicit per-sample loops."""
    model = _live("mlp")
    (x, y), = _data("mlp", 1, 12)
    with Tracker(model, metrics=["act_mean", "apoz", "dormant", "taylor", "grad_norm"]) as t:
        F.cross_entropy(model(x), y).backward()
        rec = t.step()
    w = copy.deepcopy(model)  # same weights (the tracker never changes them)
    h1 = torch.relu(w.fc1(x)).detach().double()
    act_mean = [sum(abs(float(h1[s, u])) for s in range(12)) / 12 for u in range(32)]
    apoz = [sum(float(h1[s, u]) == 0.0 for s in range(12)) / 12 for u in range(32)]
    layer_mean = sum(act_mean) / 32
    got = rec["layers"]["fc1"]["metrics"]
    assert got["act_mean"] == pytest.approx(act_mean, rel=TOL, abs=1e-9)
    assert got["apoz"] == pytest.approx(apoz, abs=1e-12)
    assert got["dormant"] == pytest.approx([m / layer_mean for m in act_mean], rel=TOL, abs=1e-9)
    assert rec["layers"]["fc1"]["dead"] == [u for u in range(32) if act_mean[u] == 0.0]
    # Taylor at fc2's point (relu2): mean over samples of |h · dL_x/dh| with each sample's own loss
    taylor = torch.zeros(32, dtype=torch.float64)
    for s in range(12):
        h = torch.relu(w.fc2(torch.relu(w.fc1(x[s:s + 1])))).detach().requires_grad_(True)
        loss = F.cross_entropy(w.fc3(h), y[s:s + 1])
        (g,) = torch.autograd.grad(loss, h)
        taylor += (h * g).detach().double().abs()[0]
    assert rec["layers"]["fc2"]["metrics"]["taylor"] == pytest.approx((taylor / 12).tolist(), rel=TOL, abs=1e-9)
    # grad_norm of fc1: the norm of each row of d(mean loss)/dW, i.e. of what backward() left in .grad
    assert rec["layers"]["fc1"]["metrics"]["grad_norm"] == pytest.approx(
        model.fc1.weight.grad.double().norm(dim=1).tolist(), rel=TOL)


# --------------------------------------------------------------------------------------------
# the caller's model, gradients, optimizer and RNG are untouched


class _Net(nn.Module):
    """BatchNorm (running statistics) and dropout (RNG draws) in training mode."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.bn = nn.BatchNorm1d(12)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc2(self.drop(F.relu(self.bn(self.fc1(x)))))


def _run_seeded(opt_name: str, track: bool, tmp: Path) -> tuple[dict, dict, list, torch.Tensor]:
    torch.manual_seed(0)
    model = _Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2) if opt_name == "adam" else \
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tracker = Tracker(model, tmp / "h.jsonl", every=1, optimizer=opt) if track else None
    try:
        for _ in range(3):
            x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        grads = [p.grad.clone() for p in model.parameters()]
    finally:
        if tracker is not None:
            tracker.close()
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), grads, torch.rand(4)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_parameters_gradients_optimizer_and_rng_bitwise_identical(opt_name, tmp_path, hook_free):
    sd0, os0, g0, r0 = _run_seeded(opt_name, False, tmp_path)
    sd1, os1, g1, r1 = _run_seeded(opt_name, True, tmp_path)
    assert sd0.keys() == sd1.keys()
    for k in sd0:  # weights and BatchNorm buffers
        assert torch.equal(sd0[k], sd1[k]), k
    for a, b in zip(g0, g1, strict=True):
        assert torch.equal(a, b)
    for i, st in os0["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(os1["state"][i][k])), (i, k)
    assert torch.equal(r0, r1)  # the caller's RNG stream went on exactly as without the tracker
    assert len(read_history(tmp_path / "h.jsonl")) == 3


def test_every_hook_removed_after_close_and_after_an_error(tmp_path, hook_free):
    model = _live("cnn")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (x, y), = _data("cnn", 1, 8)
    with Tracker(model, tmp_path / "h.jsonl", optimizer=opt):
        F.cross_entropy(model(x), y).backward()
        opt.step()
    hook_free(model)
    assert not opt._optimizer_step_post_hooks
    assert all(not p._backward_hooks for p in model.parameters() if getattr(p, "_backward_hooks", None) is not None)
    lines = (tmp_path / "h.jsonl").read_text().count("\n")
    with pytest.raises(RuntimeError, match="boom"), Tracker(model, tmp_path / "h.jsonl", optimizer=opt):
        F.cross_entropy(model(x), y).backward()
        raise RuntimeError("boom")
    hook_free(model)
    assert not opt._optimizer_step_post_hooks
    assert all(not p._backward_hooks for p in model.parameters() if getattr(p, "_backward_hooks", None) is not None)
    assert (tmp_path / "h.jsonl").read_text().count("\n") == lines  # the failed step is not recorded
    # a forward that fails inside the model: the tap is undone too
    with Tracker(model, example=x) as t:
        with pytest.raises(RuntimeError, match="channels"):
            model(torch.randn(2, 3, 8, 8))  # 3 channels: conv1 wants 1
        assert t._tap is None
    hook_free(model)


# --------------------------------------------------------------------------------------------
# what is observed


def test_every_n_steps_and_appending_never_rewrites(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_text('{"format": "fitcli.history/1", "step": 0, "layers": {}}\n')
    before = path.read_bytes()
    model = _live("mlp")
    batches = _data("mlp", 7, 8)
    with Tracker(model, path, every=3) as t:
        for x, y in batches:
            F.cross_entropy(model(x), y).backward()
            t.step()
    assert path.read_bytes().startswith(before)
    lines = path.read_text().splitlines()
    assert [json.loads(s)["step"] for s in lines] == [0, 0, 3, 6]
    assert t.steps == 7


def test_eval_forwards_and_forwards_without_backward(tmp_path):
    model = _live("mlp")
    (x, y), = _data("mlp", 1, 16)
    with Tracker(model) as t:
        model.eval()
        model(x)  # evaluation: not observed
        model.train()
        assert t.step() is None
        with torch.no_grad():
            model(x)  # training mode, no backward: activations only
        rec = t.step()
    assert rec["step"] == 1
    fc1 = rec["layers"]["fc1"]
    assert "taylor" not in fc1["metrics"] and "taylor" in fc1["skipped"]
    report = fitcli.audit(_live("mlp"), [x], metrics=["act_mean", "apoz", "dormant"], device="cpu")
    for name in ("act_mean", "apoz", "dormant"):
        assert fc1["metrics"][name] == pytest.approx(report.layer("fc1").metrics[name].tolist(), rel=TOL, abs=1e-12)


def test_default_metrics_are_the_streaming_ones():
    t = Tracker(_live("mlp"))
    t.close()
    assert sorted(t.classes) == ["act_mean", "act_var", "apoz", "dormant", "grad_norm", "taylor", "taylor_delta"]


def test_settings_checked_before_any_work(tmp_path, hook_free):
    model = _live("mlp")
    with pytest.raises(UsageError, match="every"):
        Tracker(model, every=0)
    with pytest.raises(UsageError, match="cannot be tracked"):
        Tracker(model, metrics=["act_entropy"])
    with pytest.raises(UsageError, match="unknown metric"):
        Tracker(model, metrics=["nope"])
    with pytest.raises(UsageError, match="loss_reduction"):
        Tracker(model, loss_reduction="median")
    with pytest.raises(UsageError, match="loss_scale"):
        Tracker(model, loss_scale=0)
    with pytest.raises(UsageError, match="cannot be opened"):
        Tracker(model, tmp_path)  # a directory
    hook_free(model)
    with pytest.raises(UsageError, match="matches no"):
        Tracker(model, layers=["nothing*"], example=torch.randn(2, 16))
    t = Tracker(model, layers=["fc1"], example=torch.randn(2, 16))
    t.close()
    assert [lay.name for lay in t.layers] == ["fc1"]


# --------------------------------------------------------------------------------------------
# reading the history back


def test_died_at_by_hand():
    steps = [0, 10, 20, 30]
    dead = [{1}, {1, 2}, {2}, {2, 3}]
    # unit 2: dead from step 10 on; unit 3: only the last record; unit 1 revived (not died)
    assert died_at(dead, steps) == {2: 10, 3: 30}
    assert died_at([{0}, None, {0}], [0, 5, 9]) == {0: 0}  # a record without dormancy interrupts nothing
    assert died_at([None], [0]) == {}


def _hand_history(path: Path) -> None:
    recs = []
    for step, dead in ((0, []), (5, [1]), (10, [1, 3])):
        recs.append({"format": "fitcli.history/1", "step": step, "tau": 0.0, "layers": {
            "a": {"units": 4, "final": False, "metrics": {}, "dead": dead},
            "out": {"units": 2, "final": True, "metrics": {}}}})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_history_summary_by_hand(tmp_path):
    _hand_history(tmp_path / "h.jsonl")
    s = history_summary(read_history(tmp_path / "h.jsonl"))
    a = next(lay for lay in s["layers"] if lay["name"] == "a")
    assert s["steps"] == [0, 5, 10]
    assert a["dead_fraction"] == [0.0, 0.25, 0.5]
    assert a["died_at"] == {"1": 5, "3": 10}
    out = next(lay for lay in s["layers"] if lay["name"] == "out")
    assert out["dead_fraction"] == [None, None, None] and out["final"]


def test_history_cli_formats(tmp_path, run_cli):
    _hand_history(tmp_path / "h.jsonl")
    r = run_cli(["history", str(tmp_path / "h.jsonl"), "--format", "json"])
    assert r.code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["layers"][0]["dead_fraction"] == [0.0, 0.25, 0.5]
    r = run_cli(["history", str(tmp_path / "h.jsonl"), "--format", "csv"])
    assert r.code == 0
    rows = [line.split(",") for line in r.stdout.splitlines()]
    assert rows[0] == ["step", "layer", "units", "final", "dead", "dead_fraction"]
    assert ["10", "a", "4", "0", "2", "0.5"] in rows
    r = run_cli(["history", str(tmp_path / "h.jsonl")])
    assert r.code == 0 and "step 10" in r.stdout and "50.0%" in r.stdout and "1@5" in r.stdout
    r = run_cli(["history", str(tmp_path / "h.jsonl"), "--format", "markdown", "--layer", "a"])
    assert r.code == 0 and "| `a` | 4 | 0.0% | 25.0% | 50.0% |" in r.stdout and "`out`" not in r.stdout


def test_history_cli_errors(tmp_path, run_cli):
    r = run_cli(["history", str(tmp_path / "missing.jsonl")])
    assert r.code == 3 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1 and "not found" in r.stderr
    bad = tmp_path / "bad.jsonl"
    _hand_history(bad)
    bad.write_text(bad.read_text() + "{truncated\n")
    r = run_cli(["history", str(bad)])
    assert r.code == 3 and "line 4" in r.stderr and "Traceback" not in r.stderr
    other = tmp_path / "other.jsonl"
    other.write_text('{"format": "fitcli.report/1"}\n')
    assert run_cli(["history", str(other)]).code == 3
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert run_cli(["history", str(empty)]).code == 3
    _hand_history(tmp_path / "h.jsonl")
    r = run_cli(["history", str(tmp_path / "h.jsonl"), "--layer", "zzz"])
    assert r.code == 2 and "matches no layer" in r.stderr
    with pytest.raises(InputError):
        read_history(tmp_path)


def test_tracker_history_through_the_cli(tmp_path, run_cli):
    """A real tracked run on the sample CNN, read back: the planted dead units are dead throughout."""
    model = _live("cnn")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    _train(model, _data("cnn", 3, 64), opt, dict(every=1), tmp_path / "h.jsonl")
    r = run_cli(["history", str(tmp_path / "h.jsonl"), "--format", "json"])
    assert r.code == 0, r.stderr
    layers = {lay["name"]: lay for lay in json.loads(r.stdout)["layers"]}
    truth = json.loads((SM / "truth.json").read_text())["cnn"]["dead"]
    for name, units in truth.items():
        for u in units:
            assert layers[name]["died_at"].get(str(u)) == 0, (name, u)


# --------------------------------------------------------------------------------------------
# adapters (optional extras: tested where the library installs)


class _TinyClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.fc1 = nn.Linear(5, 7)
        self.fc2 = nn.Linear(7, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _tiny_batches(n: int = 3, b: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(b, 5, generator=g), torch.randint(0, 2, (b,), generator=g)) for _ in range(n)]


def test_lightning_callback(tmp_path):
    pl = pytest.importorskip("pytorch_lightning", reason="the Lightning extra is not installed here")
    from fitcli.integrations.lightning import FitcliCallback

    batches = _tiny_batches()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _TinyClassifier()
            self.snaps: list[dict] = []

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            self.snaps.append(copy.deepcopy(self.net.state_dict()))
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    module = Module()
    cb = FitcliCallback(tmp_path / "h.jsonl", every=1)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                         default_root_dir=tmp_path)
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])),
                        batch_size=8, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    records = read_history(tmp_path / "h.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    for rec in records:
        offline = _TinyClassifier()
        offline.load_state_dict(module.snaps[rec["step"]])
        report = fitcli.audit(offline, [batches[rec["step"]]], loss="cross_entropy",
                              metrics=sorted(cb_metrics()), device="cpu")
        _assert_record_matches({**rec, "layers": {k.removeprefix("net."): v for k, v in rec["layers"].items()}},
                               report)
    assert cb.tracker is None
    for m in module.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def cb_metrics() -> list[str]:
    return list(Tracker(_TinyClassifier()).classes)


def test_hf_trainer_callback(tmp_path):
    transformers = pytest.importorskip("transformers")
    from fitcli.integrations.hf import FitcliTrainerCallback

    batches = _tiny_batches(n=3, b=4)
    rows = [{"x": x[i], "labels": y[i]} for x, y in batches for i in range(4)]

    class HFNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _TinyClassifier()

        def forward(self, x, labels=None):
            if self.training:  # the batches the Trainer drew (it shuffles)
                seen.append((x.detach().clone(), labels.clone()))
            logits = self.net(x)
            return {"loss": F.cross_entropy(logits, labels), "logits": logits}

    model = HFNet()
    snaps: list[dict] = []
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Snap(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            snaps.append(copy.deepcopy(model.net.state_dict()))

    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=0.5, report_to=[], use_cpu=True, save_strategy="no",
                                          logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                                          optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
                                          max_grad_norm=0.0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows,
                                   callbacks=[Snap(), FitcliTrainerCallback(tmp_path / "h.jsonl", every=1)])
    trainer.train()
    records = read_history(tmp_path / "h.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    for rec in records:
        offline = _TinyClassifier()
        offline.load_state_dict(snaps[rec["step"]])
        report = fitcli.audit(offline, [seen[rec["step"]]], loss="cross_entropy", metrics=sorted(cb_metrics()),
                              device="cpu")
        _assert_record_matches({**rec, "layers": {k.removeprefix("net."): v for k, v in rec["layers"].items()}},
                               report)


def test_bfloat16_cnn_tracker_equals_audit_on_the_same_batch_and_weights():
    """On a bfloat16 CNN the tracker feeds its metrics as the audit does (activations and
    gradients widened to float32 before any statistic or scaling): every streaming metric of the
    record equals the offline audit of the same batch with the same weights to 1e-6 (relative to
    the layer's largest value). Batch 32: the mean loss's 1/32 scales every bf16 gradient exactly."""
    model = _live("cnn").to(torch.bfloat16)
    offline = copy.deepcopy(model)
    (x, y), = _data("cnn", 1, 32)
    with Tracker(model) as tracker:
        F.cross_entropy(model(x.to(torch.bfloat16)).float(), y).backward()
        rec = tracker.step()
    report = fitcli.audit(offline, [(x, y)], loss="cross_entropy", metrics=sorted(tracker.classes), device="cpu")
    assert {"act_mean", "act_var", "apoz", "dormant", "taylor", "grad_norm"} <= set(tracker.classes)
    assert set(rec["layers"]) == {lay.name for lay in report.layers}
    convs = 0
    for lay in report.layers:
        got = rec["layers"][lay.name]
        assert set(got["metrics"]) == set(lay.metrics), lay.name
        convs += lay.name.startswith("conv")
        for name, want in lay.metrics.items():
            have = torch.tensor([math.nan if v is None else v for v in got["metrics"][name]], dtype=torch.float64)
            scale = float(want[torch.isfinite(want)].abs().max()) if bool(torch.isfinite(want).any()) else 1.0
            assert torch.allclose(have, want, rtol=1e-6, atol=1e-6 * scale, equal_nan=True), \
                (lay.name, name, float((have - want).abs().max()), scale)
        if not lay.final:
            assert got["dead"] == list(lay.dead), lay.name
    assert convs >= 2  # the conv layers, where the bf16 statistics drifted


def test_two_backward_passes_through_one_forward_skip_grad_norm_with_the_reason():
    """The weight-gradient norms are taken in the hook (nothing kept): a second backward through
    the same forward cannot be added to them, so grad_norm says why it has no value for the step
    instead of reporting the norms of one of the two gradients. Activation gradients add up."""
    model = _live("mlp")
    (x, y), = _data("mlp", 1, 16)
    with Tracker(model, metrics=["grad_norm", "taylor"]) as tracker:
        loss = F.cross_entropy(model(x), y)
        loss.backward(retain_graph=True)
        loss.backward()
        rec = tracker.step()
    for name, entry in rec["layers"].items():
        assert "grad_norm" not in entry["metrics"], name
        assert "two backward passes" in entry["skipped"]["grad_norm"]
        assert "taylor" in entry["metrics"]
    with Tracker(model, metrics=["taylor"]) as single:
        F.cross_entropy(model(x), y).backward()
        once = single.step()
    for name, entry in rec["layers"].items():  # twice the same gradient: twice the Taylor score
        for a, b in zip(entry["metrics"]["taylor"], once["layers"][name]["metrics"]["taylor"], strict=True):
            assert a == pytest.approx(2 * b, rel=1e-6, abs=1e-12)


def test_history_file_values_have_eight_significant_digits(tmp_path):
    """The history file writes each value as ``%.8g`` formats it (the record in memory keeps the
    values as computed); everything else reads back exactly as ``json.dumps`` would write it."""
    from fitcli.tracker import record_line
    g = torch.Generator().manual_seed(3)
    mant = (torch.rand(400, generator=g, dtype=torch.float64) * 0.9 + 0.1) * (torch.randint(0, 2, (400,), generator=g) * 2 - 1)
    vals = (mant * torch.pow(10.0, torch.randint(-30, 30, (400,), generator=g).double())).tolist()
    rec = {"format": "fitcli.history/1", "step": 1, "time": 2.5, "batches": 1, "samples": 3, "tau": 0.0,
           "layers": {'a"b': {"units": 400, "final": False, "metrics": {"m": vals, "n": [None, 1.0, 0.0]}, "dead": [2]},
                      "c": {"units": 1, "final": True, "metrics": {}, "skipped": {"taylor": "no gradient"}}}}
    back = json.loads(record_line(rec))
    assert back["layers"]['a"b']["metrics"]["m"] == [float(f"{v:.8g}") for v in vals]
    assert back["layers"]['a"b']["metrics"]["n"] == [None, 1.0, 0.0]
    assert {k: v for k, v in back.items() if k != "layers"} == {k: v for k, v in rec.items() if k != "layers"}
    assert back["layers"]["c"] == rec["layers"]["c"] and back["layers"]['a"b']["dead"] == [2]
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    with Tracker(model, tmp_path / "h.jsonl", metrics=["act_mean"]) as tr:
        model(torch.randn(7, 3))
        live = tr.step()
    written = read_history(tmp_path / "h.jsonl")[0]
    assert written["layers"]["0"]["metrics"]["act_mean"] == [float(f"{v:.8g}") for v in live["layers"]["0"]["metrics"]["act_mean"]]


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_quick_moments_keep_the_variance(offset):
    """The tracker's one-read Σh² (``quick_moments``) against a float64 brute force, also for a unit
    whose mean dwarfs its spread (there it falls back to centred values): 1e-7 relative."""
    from fitcli.metrics.base import UnitBatch
    g = torch.Generator().manual_seed(5)
    a = (torch.randn(8, 6, 50, generator=g) * torch.linspace(0.01, 2, 6).view(1, 6, 1) + offset).float()
    exact = a.double()
    n = 8 * 50
    want_sum = exact.sum(dim=(0, 2))
    want_var = ((exact - want_sum.view(1, 6, 1) / n) ** 2).sum(dim=(0, 2))
    for quick in (False, True):
        ub = UnitBatch(weight=None, act=a, quick_moments=quick)
        s, q = ub.value_sum(), ub.square_sum()
        var = q - s * s / n
        assert torch.allclose(s, want_sum, rtol=0, atol=1e-7 * float(exact.abs().sum(dim=(0, 2)).max())), quick
        assert torch.allclose(var, want_var, rtol=1e-5 if offset else 1e-7, atol=0), (quick, var, want_var)


def test_relu_outputs_skip_the_minimum_but_keep_every_moment():
    """A ReLU's output (known from autograd) is taken as non-negative without reading its minimum;
    Σ|h|, the zero count and the sums equal a brute force, with a NaN in the batch too."""
    from fitcli.metrics.base import UnitBatch
    g = torch.Generator().manual_seed(2)
    for nan in (False, True):
        a = torch.relu(torch.randn(4, 3, 20, generator=g))
        if nan:
            a[1, 2, 5] = float("nan")
        x = a.double()
        for flag in (False, True):
            ub = UnitBatch(weight=None, act=a, relu_output=flag)
            want_abs = x.abs().sum(dim=(0, 2))
            want_zeros = (x == 0).sum(dim=(0, 2)).double()
            assert torch.allclose(ub.abs_sum(), want_abs, rtol=1e-6, equal_nan=True), (nan, flag)
            got_z = ub.zero_count()
            assert torch.equal(got_z[:2], want_zeros[:2]), (nan, flag)
            if not nan:
                assert torch.equal(got_z, want_zeros)


@pytest.mark.parametrize("positions", [4, 16, 50])
@pytest.mark.parametrize("kind", ["signed", "relu", "relu_nan", "offset"])
def test_quick_moments_of_short_and_long_maps_equal_a_brute_force(positions, kind):
    """The tracker's moments (``quick_moments``; maps of ≤ 16 positions take the batch-first
    reduction) against float64 sums over every observation: Σh, Σh², Σ|h|, the zero count
    (exact), and each sample's mean over positions (``hbar``), for signed values, a ReLU's output
    with exact zeros, one with a NaN, and a unit whose mean dwarfs its spread."""
    from fitcli.metrics.base import Scratch, UnitBatch
    g = torch.Generator().manual_seed(positions)
    a = torch.randn(8, 5, positions, generator=g)
    if kind.startswith("relu"):
        a = torch.relu(a)
    if kind == "offset":
        a[:, 1] += 1000.0
    if kind == "relu_nan":
        a[3, 4, 1] = float("nan")
    x = a.double()
    for relu in (False, True) if kind.startswith("relu") else (False,):
        ub = UnitBatch(weight=None, act=a, quick_moments=True, relu_output=relu, scratch=Scratch())
        sums = {"sum": x.sum(dim=(0, 2)), "sumsq": x.square().sum(dim=(0, 2)), "abs": x.abs().sum(dim=(0, 2))}
        got = {"sum": ub.value_sum(), "sumsq": ub.square_sum(), "abs": ub.abs_sum()}
        for k, want in sums.items():
            assert torch.allclose(got[k], want, rtol=1e-6, atol=0, equal_nan=True), (k, got[k], want)
        zeros = (x == 0).sum(dim=(0, 2)).double()
        assert torch.equal(ub.zero_count()[:4], zeros[:4]), (ub.zero_count(), zeros)
        assert torch.allclose(ub.hbar(), x.mean(dim=2), rtol=1e-6, atol=1e-6, equal_nan=True)  # float32 sums
        if kind != "relu_nan":
            assert torch.equal(ub.zero_count(), zeros)
        if kind == "relu":
            assert float(zeros.sum()) > 0  # the zero count was exercised


def test_reset_reusing_the_state_tensors():
    """``reset(reuse=True)`` (the tracker, between steps) gives the defaults again in the state's
    own tensors; a plain ``reset()`` gives fresh ones. Both equal a new metric's state."""
    from fitcli.metrics.base import UnitBatch
    from fitcli.metrics.registry import get_metric
    cls = get_metric("act_var")
    fresh = cls(3).state_dict()
    m = cls(3)
    m.update(UnitBatch(weight=None, act=torch.randn(5, 3, 4)))
    before = {k: v for k, v in m.state_dict().items()}
    m.reset(reuse=True)
    for k, v in m.state_dict().items():
        assert torch.equal(v, fresh[k]), k
        if before[k].shape == v.shape:
            assert v is before[k], k
    m.update(UnitBatch(weight=None, act=torch.randn(5, 3, 4)))
    m.reset()
    assert all(torch.equal(v, fresh[k]) for k, v in m.state_dict().items())


def test_reset_many_resets_every_metric_as_its_own_reset_would():
    """``Metric.reset_many`` (the tracker's reset of all its states at once): every state back to
    its default, in place where it can be; a state rebound to another shape gets a fresh default;
    a metric with its own ``reset`` has it called."""
    from fitcli.metrics.base import Metric, UnitBatch
    from fitcli.metrics.registry import get_metric

    class Own(get_metric("act_mean")):
        calls = 0

        def reset(self, reuse: bool = False) -> None:
            type(self).calls += 1
            super().reset()

    ms = [get_metric("act_var")(3), get_metric("apoz")(3), Own(3)]
    fresh = [type(m)(3).state_dict() for m in ms]
    for m in ms:
        m.update(UnitBatch(weight=None, act=torch.randn(5, 3, 4)))
    ms[0].s1 = torch.ones(7, dtype=torch.float64)  # rebound to another shape: cannot be reused
    kept = ms[1].zeros
    Metric.reset_many(ms)
    for m, want in zip(ms, fresh, strict=True):
        assert all(torch.equal(v, want[k]) for k, v in m.state_dict().items()), type(m).__name__
    assert ms[1].zeros is kept and Own.calls == 1


def test_fold_grad_keeps_only_the_per_sample_products():
    """``UnitBatch.fold_grad`` (the tracker's gradient hook, for metrics reading the gradient only
    through Σh·g): two gradients folded in give the Σ_p h·g of their sum per sample, and Σ_x and
    Σ_x |·| of it, against a float64 brute force; no gradient tensor is kept."""
    from fitcli.metrics.base import Scratch, UnitBatch
    g = torch.Generator().manual_seed(4)
    a, g1, g2 = (torch.randn(5, 3, 7, generator=g) for _ in range(3))
    ub = UnitBatch(weight=None, act=a, scratch=Scratch())
    ub.fold_grad(g1, 2.0)
    ub.fold_grad(g2, 0.5)
    per = (a.double() * (2.0 * g1.double() + 0.5 * g2.double())).sum(dim=2)
    assert ub.has_grad() and ub.grad_parts()[0] is None
    assert torch.allclose(ub.hg(), per, rtol=1e-6, atol=1e-6)
    sums = ub.hg_sums()
    assert torch.allclose(sums["sum"], per.sum(0), rtol=1e-6, atol=1e-6)
    assert torch.allclose(sums["abs"], per.abs().sum(0), rtol=1e-6, atol=1e-6)


def test_a_metric_reading_the_gradient_itself_keeps_it():
    """Taylor alone lets the tracker fold each gradient into Σh·g; a metric that reads
    ``batch.grad`` itself (no ``"hg"`` in its shares) on the same layer keeps the gradient, and
    both are right: the plugin's Σ_x Σ_p |g| against autograd's per-sample gradients."""
    from fitcli.feeder import folds_gradient
    from fitcli.metrics import registry as R
    from fitcli.metrics.base import Metric, zeros
    from fitcli.metrics.registry import get_metric

    class GradAbs(Metric):
        name = "grad_abs_test"
        needs = frozenset({"activations", "gradients"})
        higher_is_better = True

        def setup(self):
            self.add_state("total", zeros(self.units), "sum")

        def update(self, batch):
            if batch.has_grad():
                self.total = self.total + batch.grad.abs().sum(dim=(0, 2)).double()

        def compute(self):
            return self.total

    taylor = get_metric("taylor")
    class GradAbsWeights(GradAbs):  # needing the weights too does not make it read the gradient less
        needs = frozenset({"weights", "activations", "gradients"})

    assert folds_gradient([taylor(3), get_metric("grad_norm")(3)])
    assert not folds_gradient([taylor(3), GradAbs(3)]) and not folds_gradient([taylor(3), GradAbsWeights(3)])
    reg = R.load_registry()
    reg["grad_abs_test"] = R.Entry("grad_abs_test", "tests", GradAbs)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        with Tracker(model, metrics=["taylor", "grad_abs_test"]) as tr:
            F.cross_entropy(model(x), y).backward()
            rec = tr.step()
    finally:
        del reg["grad_abs_test"]
    h = torch.relu(model[0](x)).detach().requires_grad_(True)
    grads = torch.autograd.grad(F.cross_entropy(model[2](h), y, reduction="sum"), h)[0].double()
    got = rec["layers"]["0"]["metrics"]
    assert got["grad_abs_test"] == pytest.approx(grads.abs().sum(0).tolist(), rel=1e-6)
    assert got["taylor"] == pytest.approx((h.detach().double() * grads).abs().mean(0).tolist(), rel=1e-5, abs=1e-9)
