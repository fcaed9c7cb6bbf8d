"""fitcli.prune and ``fitcli prune``: physical removal of units.

Every expected value is computed here, independently of fitcli: losses by a plain forward and
``F.cross_entropy``, masked losses by forward hooks that zero the chosen channels, parameter
counts from the layer shapes by hand, folded biases by ``b + W[:, j] * c``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from fitcli.pruning import PruneRefused, prune

LIVE = {"mlp": {"fc1": [0, 1, 2], "fc2": [0, 1]}, "cnn": {"conv1": [0, 1], "conv2": [0, 3]}}


def _data(repo: Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    d = load_file(str(repo / "sample_models" / f"{name}_data.safetensors"))
    return d["inputs"], d["targets"]


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x).double(), y))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


def _planted(t: dict) -> dict[str, list[int]]:
    out = {k: list(v) for k, v in t["dead"].items() if v}
    c = t["constant"]
    out[c["layer"]] = sorted({*out.get(c["layer"], []), c["unit"]})
    return out


def _hand_params(name: str, removed: dict[str, list[int]]) -> tuple[int, int]:
    """Parameter counts before/after from the architectures' shapes (sample_models/models.py)."""
    r = {k: len(v) for k, v in removed.items()}
    if name == "mlp":  # Linear(16, 32) -> Linear(32, 32) -> Linear(32, 4)
        h1, h2 = 32 - r.get("fc1", 0), 32 - r.get("fc2", 0)
        return (16 * 32 + 32) + (32 * 32 + 32) + (32 * 4 + 4), (16 * h1 + h1) + (h1 * h2 + h2) + (h2 * 4 + 4)
    if name == "cnn":  # Conv(1, 8, 3) -> Conv(8, 16, 3) -> pool -> Linear(16, 16) -> Linear(16, 4)
        c1, c2 = 8 - r.get("conv1", 0), 16 - r.get("conv2", 0)
        before = (8 * 9 + 8) + (16 * 8 * 9 + 16) + (16 * 16 + 16) + (16 * 4 + 4)
        return before, (c1 * 9 + c1) + (c2 * c1 * 9 + c2) + (c2 * 16 + 16) + (16 * 4 + 4)
    # resmlp: only the hidden units of the blocks' MLPs go: Linear(16, 32) rows and Linear(32, 16) columns
    block = 2 * (16 + 16) + (16 * 48 + 48) + (16 * 16 + 16) + (16 * 32 + 32) + (32 * 16 + 16)  # 2 LayerNorms, attn
    before = (8 * 16 + 16) + 2 * block + 2 * 16 + (16 * 4 + 4)
    gone = sum(n * (16 + 1) + n * 16 for k, n in r.items() if k.endswith("fc_in"))
    return before, before - gone


def _sample(name: str, truth: dict) -> nn.Module:
    from fitcli.loading import load_model, resolve_callable

    repo = Path(__file__).resolve().parent.parent
    t = truth[name]
    file, _, attr = t["arch"].rpartition(":")
    return load_model(repo / t["checkpoint"], arch=resolve_callable(f"{repo / file}:{attr}")).module


@pytest.fixture(scope="module")
def pruned_dead(truth):
    """The planted dead and constant units of every sample model pruned (once per module)."""
    repo = Path(__file__).resolve().parent.parent
    out = {}
    for name in ("mlp", "cnn", "resmlp"):
        t = truth[name]
        model = _sample(name, truth)
        before = _state(model)
        res = prune(model, str(repo / t["data"]), remove="dead")
        out[name] = (model, before, res)
    return out


@pytest.mark.parametrize("name", ["mlp", "cnn", "resmlp"])
def test_planted_dead_and_constant_units_pruned_exactly(name, pruned_dead, truth, repo, tmp_path):
    model, before, res = pruned_dead[name]
    t = truth[name]
    assert res.removed == _planted(t)
    c = t["constant"]
    assert set(res.folded) == {c["layer"]} and list(res.folded[c["layer"]]) == [c["unit"]]
    assert res.folded[c["layer"]][c["unit"]] == pytest.approx(c["value"], abs=1e-4)
    assert res.refused == []
    _assert_same(model, before)  # the user's model is bitwise unchanged
    x, y = _data(repo, name)
    base = _loss(model, x, y)
    assert abs(_loss(res.module, x, y) - base) < 1e-5
    assert abs(res.loss_before - base) < 1e-6 and abs(res.loss_after - base) < 1e-5
    assert abs(res.predicted_loss_change) < 1e-9  # dead (zero) and constant (folded) units: no change
    hand_before, hand_after = _hand_params(name, res.removed)
    assert (res.params_before, res.params_after) == (hand_before, hand_after)
    assert sum(p.numel() for p in res.module.parameters()) == hand_after
    assert res.flops_after < res.flops_before
    pt2, st = res.save(tmp_path / "pruned")
    assert (pt2.name, st.name) == ("pruned.pt2", "pruned.safetensors")
    program = torch.export.load(str(pt2)).module()
    with torch.no_grad():
        ref = model(x)
        got = torch.cat([program(x[i:i + 64]) for i in range(0, len(x), 64)])
        got_all = program(x)  # a batch size other than the example's: the batch dimension is dynamic
    assert torch.allclose(got, ref, atol=1e-5)
    assert torch.allclose(got_all, ref, atol=1e-5)
    weights = load_file(str(st))
    assert sum(v.numel() for v in weights.values()) == hand_after
    _assert_same(model, before)


def test_mlp_shapes_and_folded_bias(pruned_dead):
    model, _, res = pruned_dead["mlp"]
    p = res.module
    assert (p.fc1.out_features, p.fc2.in_features, p.fc2.out_features, p.fc3.in_features) == (30, 30, 29, 29)
    keep1 = [i for i in range(32) if i not in (3, 17)]
    keep2 = [i for i in range(32) if i not in (5, 9, 20)]
    assert torch.equal(p.fc1.weight, model.fc1.weight[keep1])
    assert torch.equal(p.fc2.weight, model.fc2.weight[keep2][:, keep1])
    assert torch.equal(p.fc3.weight, model.fc3.weight[:, keep2])
    # fc2 unit 9 is the constant 5.0 after relu2: fc3's bias takes W[:, 9] * 5
    expect = model.fc3.bias.double() + model.fc3.weight[:, 9].double() * 5.0
    assert torch.allclose(p.fc3.bias.double(), expect, atol=1e-5)


def _masked_loss(model: nn.Module, x, y, masks: dict[str, list[int]], where: dict[str, str]) -> float:
    """Loss with the units zeroed by forward hooks on the modules named in ``where``."""
    mods = dict(model.named_modules())
    handles = []
    for layer, units in masks.items():
        def hook(m, args, out, units=units):
            out = out.clone()
            out[:, units] = 0
            return out
        handles.append(mods[where[layer]].register_forward_hook(hook))
    try:
        return _loss(model, x, y)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_live_units_change_the_loss_as_exact_ablation_predicts(name, truth, repo):
    model = _sample(name, truth)
    before = _state(model)
    x, y = _data(repo, name)
    # the ReLU modules of the MLP; the CNN's ReLUs are functions: zeroing a conv channel before
    # relu zeroes it after (relu(0) = 0), and the pooling/flatten keep it zero
    where = {"fc1": "relu1", "fc2": "relu2"} if name == "mlp" else {"conv1": "conv1", "conv2": "conv2"}
    res = prune(model, str(repo / truth[name]["data"]), remove=LIVE[name])
    base = _loss(model, x, y)
    masked = _masked_loss(model, x, y, LIVE[name], where)
    assert abs(masked - base) > 1e-3  # the units are live: their removal costs something
    assert res.removed == LIVE[name] and res.folded == {}
    assert abs(res.predicted_loss_change - (masked - base)) < 1e-5
    assert abs(res.loss_change - (masked - base)) < 1e-5
    assert abs(_loss(res.module, x, y) - masked) < 1e-5
    _assert_same(model, before)


def test_refused_coupling_is_an_input_error_and_leaves_the_model(repo, truth):
    model = _sample("resmlp", truth)
    before = _state(model)
    with pytest.raises(PruneRefused) as e:
        prune(model, str(repo / truth["resmlp"]["data"]), remove={"blocks.0.fc_out": [3]})
    assert e.value.exit_code == 3
    assert "coupled" in e.value.message and "blocks.0.fc_out" in e.value.message
    _assert_same(model, before)


def test_cli_refused_coupling_exit_3(run_cli, repo, tmp_path):
    s = repo / "sample_models"
    r = run_cli(["prune", s / "resmlp.safetensors", "--arch", f"{s / 'models.py'}:resmlp", "--data",
                 s / "resmlp_data.safetensors", "--remove", "blocks.1.fc_out:0,2", "-o", tmp_path / "out", "-q"])
    assert r.code == 3
    assert "blocks.1.fc_out" in r.stderr and "coupled" in r.stderr and "residual" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not list(tmp_path.iterdir())  # nothing written


def test_cli_final_layer_refused(run_cli, repo, tmp_path):
    s = repo / "sample_models"
    r = run_cli(["prune", s / "mlp.safetensors", "--arch", f"{s / 'models.py'}:mlp", "--data", s / "mlp_data.safetensors",
                 "--remove", "fc3:0", "-o", tmp_path / "out"])
    assert r.code == 3 and "final layer" in r.stderr


def test_cli_dead_table_and_json(run_cli, repo, tmp_path):
    s = repo / "sample_models"
    args = ["prune", s / "mlp.safetensors", "--arch", f"{s / 'models.py'}:mlp", "--data", s / "mlp_data.safetensors"]
    r = run_cli([*args, "--remove", "dead", "-o", tmp_path / "p"])
    assert r.code == 0, r.stderr
    hand_before, hand_after = _hand_params("mlp", {"fc1": [3, 17], "fc2": [5, 9, 20]})
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("parameters"))
    assert f"{hand_before:,}" in line and f"{hand_after:,}" in line
    assert "removed from fc2: 5, 9 (folded: 5), 20" in r.stdout
    assert (tmp_path / "p.pt2").is_file() and (tmp_path / "p.safetensors").is_file()
    r = run_cli([*args, "--remove", "fc1:3,17", "-o", tmp_path / "q.pt2", "--format", "json", "-q"])
    assert r.code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["removed"] == {"fc1": [3, 17]} and d["parameters"]["before"] - d["parameters"]["after"] == 2 * 17 + 2 * 32
    assert abs(d["loss"]["change"]) < 1e-5 and r.stderr == ""
    assert (tmp_path / "q.pt2").is_file() and (tmp_path / "q.safetensors").is_file()


def test_cli_never_overwrites_an_input(run_cli, repo, tmp_path):
    s = repo / "sample_models"
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes((s / "mlp.safetensors").read_bytes())
    before = ckpt.read_bytes()
    r = run_cli(["prune", ckpt, "--arch", f"{s / 'models.py'}:mlp", "--data", s / "mlp_data.safetensors", "-o", tmp_path / "m"])
    assert r.code == 2 and "one of the inputs" in r.stderr
    assert ckpt.read_bytes() == before and not (tmp_path / "m.pt2").exists()


def test_cli_usage_errors(run_cli, repo, tmp_path):
    s = repo / "sample_models"
    args = ["prune", s / "mlp.safetensors", "--arch", f"{s / 'models.py'}:mlp", "--data", s / "mlp_data.safetensors"]
    assert run_cli([*args]).code == 2  # no -o
    assert run_cli([*args, "-o", tmp_path / "o", "--remove", "dead", "--budget", "5"]).code == 2
    r = run_cli([*args, "-o", tmp_path / "o", "--remove", "fc1"])
    assert r.code == 2 and "LAYER:UNITS" in r.stderr
    r = run_cli([*args, "-o", tmp_path / "o", "--remove", "fc9:1"])
    assert r.code == 2 and "fc9" in r.stderr
    r = run_cli([*args, "-o", tmp_path / "o", "--remove", "fc1:40"])
    assert r.code == 2 and "out of range" in r.stderr


def test_budget_removes_that_share_of_units(repo, truth):
    model = _sample("mlp", truth)
    x, y = _data(repo, "mlp")
    res = prune(model, str(repo / truth["mlp"]["data"]), budget=25, rank_by="apoz")
    assert res.rank_by == "apoz"
    n = sum(len(v) for v in res.removed.values())
    assert n == math.floor(0.25 * 64)  # fc1 and fc2 hold the 64 prunable units; fc3 is the output
    zero = {k: [u for u in v if u not in res.folded.get(k, {})] for k, v in res.removed.items()}
    masked = _masked_loss(model, x, y, zero, {"fc1": "relu1", "fc2": "relu2"})
    assert abs(res.loss_after - masked) < 1e-5
    assert abs(res.predicted_loss_change - res.loss_change) < 1e-5


class _Convs(nn.Module):
    """conv(1->3) -> relu -> conv(3->2, padding p) -> flatten -> linear: channel 0 of the first
    conv is the constant 3 (zero weights, bias 3)."""

    def __init__(self, pad: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c1 = nn.Conv2d(1, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 2, 3, padding=pad)
        side = 6 if pad == 1 else 4
        self.fc = nn.Linear(2 * side * side, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            self.c1.weight[0] = 0
            self.c1.bias[0] = 3.0

    def forward(self, x):
        return self.fc(self.c2(torch.relu(self.c1(x))).flatten(1))


def _tiny_data(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n // 16)]


def test_constant_into_unpadded_conv_is_folded_exactly():
    m = _Convs(pad=0).eval()
    data = _tiny_data()
    res = prune(m, data, remove={"c1": [0]})
    assert res.folded == {"c1": {0: pytest.approx(3.0)}}
    expect = m.c2.bias.double() + 3.0 * m.c2.weight[:, 0].double().sum(dim=(1, 2))  # the kernel sums
    assert torch.allclose(res.module.c2.bias.double(), expect, atol=1e-5)
    for x, _ in data:
        with torch.no_grad():
            assert torch.allclose(res.module(x), m(x), atol=1e-5)


def test_constant_into_padded_conv_is_refused():
    m = _Convs(pad=1).eval()
    before = _state(m)
    with pytest.raises(PruneRefused, match="padd"):
        prune(m, _tiny_data(), remove={"c1": [0]})
    _assert_same(m, before)


def test_flatten_with_spatial_positions():
    """A conv channel is H*W consecutive columns of the Linear after flatten."""
    m = _Convs(pad=1).eval()
    data = _tiny_data()
    res = prune(m, data, remove={"c2": [1]})
    assert res.module.fc.in_features == 36 and res.module.fc.weight.shape == (3, 36)
    assert torch.equal(res.module.fc.weight, m.fc.weight[:, :36])  # channel 0's columns stay
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])

    def hook(mod, args, out):
        out = out.clone()
        out[:, 1] = 0
        return out

    base = _loss(m, x, y)
    h = m.c2.register_forward_hook(hook)
    try:
        masked = _loss(m, x, y)
    finally:
        h.remove()
    assert abs(res.loss_change - (masked - base)) < 1e-5
    assert abs(_loss(res.module, x, y) - masked) < 1e-5


def test_apoptosis_example_smoke(repo):
    """examples/apoptosis.py with tiny settings: the fit strategy removes the units it ranks lowest,
    and fitcli.prune drops exactly them (plus any that died on their own) without changing the loss."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("apoptosis", repo / "examples" / "apoptosis.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--steps", "20", "--every", "10", "--per-round", "3", "--seeds", "1", "--strategies", "fit,redo"])
    rows = [ln for ln in out.splitlines() if ln.startswith("| fit") or ln.startswith("| redo")]
    assert len(rows) == 2
    fit_removed = float(rows[0].split("|")[4])
    assert fit_removed >= 3  # one round of 3 units (and any unit that died by itself)
    fit_params = int(rows[0].split("|")[3].replace(",", ""))
    assert fit_params <= 1732 - 3 * (16 + 1 + 4)  # at least 3 units' rows and columns are gone (fc2: 32+1+4)


def test_caller_state_untouched(truth, repo, hook_free):
    """The caller's global RNG, the model's train flag and its hooks are as they were."""
    model = _sample("mlp", truth).train()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    prune(model, str(repo / truth["mlp"]["data"]), remove={"fc1": [0]})
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training and all(m.training for m in model.modules())
    hook_free(model)


def test_no_targets_prunes_without_a_loss(run_cli, repo, tmp_path):
    s = repo / "sample_models"
    r = run_cli(["prune", s / "mlp.safetensors", "--arch", f"{s / 'models.py'}:mlp", "--data", "random:16,n=64",
                 "--remove", "fc1:3,17", "-o", tmp_path / "r", "--format", "json"])
    assert r.code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["loss"]["before"] is None and d["loss"]["predicted_change"] is None
    assert d["parameters"]["before"] - d["parameters"]["after"] == 2 * 17 + 2 * 32
    assert "no loss" in r.stderr


class _BN(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.c1, self.bn, self.c2 = nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 3)
        with torch.no_grad():
            self.bn.running_mean.copy_(torch.randn(4, generator=g))
            self.bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
            self.bn.weight.copy_(torch.randn(4, generator=g))
            self.bn.bias.copy_(torch.randn(4, generator=g))

    def forward(self, x):
        return self.c2(torch.relu(self.bn(self.c1(x)))).mean(dim=(2, 3))


def test_batchnorm_entries_go_with_the_unit():
    m = _BN().eval()
    g = torch.Generator().manual_seed(4)
    data = [(torch.randn(8, 2, 7, 7, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]
    res = prune(m, data, remove={"c1": [1, 2]})
    p = res.module
    assert p.bn.num_features == 2 and p.c2.in_channels == 2
    assert torch.equal(p.bn.running_mean, m.bn.running_mean[[0, 3]])
    assert torch.equal(p.bn.running_var, m.bn.running_var[[0, 3]])
    assert torch.equal(p.bn.weight, m.bn.weight[[0, 3]]) and torch.equal(p.c2.weight, m.c2.weight[:, [0, 3]])
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])

    def hook(mod, args, out):  # zero the channels after the ReLU: what the consumer no longer sees
        out = out.clone()
        out[:, [1, 2]] = 0
        return out

    h = m.bn.register_forward_hook(hook)  # relu(0) = 0, so zeroing before the ReLU zeroes after it
    try:
        masked = _loss(m, x, y)
    finally:
        h.remove()
    assert abs(_loss(p, x, y) - masked) < 1e-5
    assert abs(res.predicted_loss_change - (masked - _loss(m, x, y))) < 1e-5


def test_missing_extra_is_named(run_cli, repo, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import torch_pruning -> ImportError
    s = repo / "sample_models"
    r = run_cli(["prune", s / "mlp.safetensors", "--arch", f"{s / 'models.py'}:mlp", "--data",
                 s / "mlp_data.safetensors", "-o", tmp_path / "o"])
    assert r.code == 3 and "fitcli[prune]" in r.stderr and "torch-pruning" in r.stderr


_LOAD_PT2 = """
import sys
sys.modules["transformers"] = None  # importing it would fail: the program must load without it
import torch
program = torch.export.load(sys.argv[1])
ids = torch.load(sys.argv[2])
out = program.module()(input_ids=ids, attention_mask=torch.ones_like(ids))
assert type(out) is dict, type(out)
assert not [m for m, v in sys.modules.items() if v is not None and m.split(".")[0] == "transformers"]
torch.save(out, sys.argv[3])
"""


def test_pruned_hugging_face_model_loads_with_torch_export_alone(tmp_path):
    """The .pt2 of a pruned BertModel loads and runs in a process that cannot import
    transformers, and returns what the original does with the removed units masked."""
    import subprocess
    import sys

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 50, (8, 6))
    data = [{"input_ids": ids[i:i + 4], "attention_mask": torch.ones(4, 6, dtype=torch.long)} for i in (0, 4)]
    layer, units = "encoder.layer.0.intermediate.dense", [0, 3]
    result = prune(model, data, remove={layer: units})
    assert result.removed == {layer: units}
    result.save(tmp_path / "bert")

    fresh = torch.randint(0, 50, (3, 6))  # another batch size: the batch dimension is dynamic
    torch.save(fresh, tmp_path / "ids.pt")
    proc = subprocess.run([sys.executable, "-c", _LOAD_PT2, str(tmp_path / "bert.pt2"), str(tmp_path / "ids.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.load(tmp_path / "out.pt")

    # the masked original: the removed units' columns of the consumer read 0 (GELU output zeroed)
    def zero(mod, args):
        x = args[0].clone()
        x[..., units] = 0
        return (x,)

    handle = model.encoder.layer[0].output.dense.register_forward_pre_hook(zero)
    try:
        with torch.no_grad():
            want = model(input_ids=fresh, attention_mask=torch.ones_like(fresh))
    finally:
        handle.remove()
    assert set(got) == {"last_hidden_state", "pooler_output"}
    for key in got:
        assert torch.allclose(got[key], want[key], atol=1e-5, rtol=0), key
