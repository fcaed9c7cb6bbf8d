"""Residual-stream channels of a ResNet pruned as one coupled group (``kinds="hidden"``), and
``fitcli.prune`` on a Hugging Face transformer through fitcli's own surgery.

Every expected value is computed here, independently of fitcli: the pruned shapes from the
architecture by hand, the channels a budget takes from the conv weights' row norms, and the
pruned model's outputs against the original run with forward hooks that zero the removed stream
channels at every layer writing to the stream (which makes the stream channel 0 everywhere).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import fitcli
from fitcli.errors import InputError, UsageError
from fitcli.pruning import PruneRefused, prune

RESNET = '''
import torch
from torch import nn
import torch.nn.functional as F


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN, added to the identity (or to a 1x1 downsample conv + BN), then ReLU."""

    def __init__(self, cin, mid, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + identity)


class ResNet(nn.Module):
    """stem (conv-BN-ReLU, stream 1 of width s1), a block on stream 1, a downsampling block
    opening stream 2 (width s2), a block on stream 2, global average pooling, a Linear head."""

    def __init__(self, s1=8, s2=12, mids=(6, 10, 10), classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, s1, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(s1)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(Block(s1, mids[0], s1), Block(s1, mids[1], s2, stride=2),
                                    Block(s2, mids[2], s2))
        self.fc = nn.Linear(s2, classes)

    def forward(self, x):
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
'''
_NS: dict = {}
exec(compile(RESNET, "resnet_models.py", "exec"), _NS)
ResNet = _NS["ResNet"]

# the layers writing to each stream, and the BatchNorm right after each (where a hook zeroes it)
WRITERS = {1: ["conv1", "layer1.0.conv2"], 2: ["layer1.1.downsample.0", "layer1.1.conv2", "layer1.2.conv2"]}
NORM_OF = {"conv1": "bn1", "layer1.0.conv2": "layer1.0.bn2", "layer1.1.downsample.0": "layer1.1.downsample.1",
           "layer1.1.conv2": "layer1.1.bn2", "layer1.2.conv2": "layer1.2.bn2"}
LABEL = {s: "+".join(ws) for s, ws in WRITERS.items()}


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = ResNet()
    with torch.no_grad():
        for m in model.modules():  # trained-looking BatchNorms
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(3)]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"


def _masked(model: nn.Module, x: torch.Tensor, streams: dict[int, list[int]]) -> torch.Tensor:
    """The original's output with each stream's channels zeroed at every writer's BatchNorm."""
    mods = dict(model.named_modules())

    def zero(chans):
        def hook(_m, _args, out):
            out = out.clone()
            out[:, chans] = 0
            return out
        return hook

    handles = [mods[NORM_OF[w]].register_forward_hook(zero(chans)) for s, chans in streams.items() for w in WRITERS[s]]
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in handles:
            h.remove()


def _mean_ce(run, data) -> float:
    with torch.no_grad():
        return sum(float(F.cross_entropy(run(x).double(), y, reduction="sum")) for x, y in data) / sum(
            len(y) for _, y in data)


def _plant_dead(model: nn.Module, streams: dict[int, list[int]]) -> None:
    """Every writer's conv rows and BatchNorm entries of these channels to 0: the stream
    channels are then 0 everywhere (0 + 0 through the ReLUs)."""
    mods = dict(model.named_modules())
    with torch.no_grad():
        for s, chans in streams.items():
            for w in WRITERS[s]:
                mods[w].weight[chans] = 0
                bn = mods[NORM_OF[w]]
                bn.weight[chans] = 0
                bn.bias[chans] = 0


def _hand_params(s1: int, s2: int, mids=(6, 10, 10), classes: int = 5) -> int:
    """Parameters of ResNet(s1, s2) counted from its shapes (BatchNorm: weight and bias)."""
    def block(cin, mid, cout, down):
        return cin * mid * 9 + 2 * mid + mid * cout * 9 + 2 * cout + ((cin * cout + 2 * cout) if down else 0)
    return (3 * s1 * 9 + 2 * s1 + block(s1, mids[0], s1, False) + block(s1, mids[1], s2, True)
            + block(s2, mids[2], s2, False) + s2 * classes + classes)


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}


# ---------------------------------------------------------------------------------------------
# the library


def test_named_stream_channel_goes_from_every_coupled_layer():
    model, data = _model(), _data()
    before = _state(model)
    res = prune(model, data, kinds="hidden", remove={"layer1.0.conv2": [1, 6], "layer1.2.conv2": [4]})
    assert res.streams == {LABEL[1]: [1, 6], LABEL[2]: [4]}
    assert res.removed == {}
    # every coupled layer lost the same channels: the shapes of ResNet(s1=6, s2=11), by hand
    assert _shapes(res.module) == _shapes(ResNet(s1=6, s2=11))
    assert res.params_before == _hand_params(8, 12) and res.params_after == _hand_params(6, 11)
    x = _data()[0][0]
    with torch.no_grad():
        got = res.module(x)
    assert torch.allclose(got, _masked(model, x, {1: [1, 6], 2: [4]}), atol=1e-5, rtol=0)
    base, masked = _mean_ce(model, data), _mean_ce(lambda x: _masked(model, x, {1: [1, 6], 2: [4]}), data)
    assert abs(masked - base) > 1e-4  # live channels: removing them costs something
    assert abs(res.loss_change - (masked - base)) < 1e-5
    assert abs(res.predicted_loss_change - (masked - base)) < 1e-5
    _assert_same(model, before)


def test_dead_stream_channels_written_model_matches_masked(tmp_path):
    model, data = _model(), _data()
    planted = {1: [2, 5], 2: [0, 7, 9]}
    _plant_dead(model, planted)
    before = _state(model)
    res = prune(model, data, kinds="hidden", remove="dead")
    assert res.streams == {LABEL[1]: planted[1], LABEL[2]: planted[2]}
    assert res.predicted_loss_change == 0.0 and abs(res.loss_change) < 1e-6
    written = res.save(tmp_path / "pruned")
    assert [p.name for p in written] == ["pruned.pt2", "pruned.safetensors"]

    fresh = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(7))  # another batch size
    want = _masked(model, fresh, planted)
    got = torch.export.load(str(tmp_path / "pruned.pt2")).module()(fresh)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    small = ResNet(s1=6, s2=9).eval()
    small.load_state_dict(load_file(str(tmp_path / "pruned.safetensors")))
    with torch.no_grad():
        assert torch.allclose(small(fresh), want, atol=1e-5, rtol=0)
    _assert_same(model, before)


def test_budget_takes_the_channels_with_the_lowest_summed_writer_scores():
    model, data = _model(), _data()
    res = prune(model, data, kinds="hidden", budget=25, rank_by="weight_norm")
    mods = dict(model.named_modules())
    expected = {}
    for s, writers in WRITERS.items():  # each writer's row norms, ℓ2-normalised per layer, summed
        total = sum(mods[w].weight.detach().double().flatten(1).norm(dim=1) / mods[w].weight.detach().double().norm()
                    for w in writers)
        k = math.floor(0.25 * total.numel())
        expected[LABEL[s]] = sorted(torch.argsort(total)[:k].tolist())
    assert res.streams == expected and res.removed == {}
    assert res.rank_by == "weight_norm"
    streams = {s: expected[LABEL[s]] for s in WRITERS}
    x = _data()[1][0]
    with torch.no_grad():
        assert torch.allclose(res.module(x), _masked(model, x, streams), atol=1e-5, rtol=0)
    masked = _mean_ce(lambda x: _masked(model, x, streams), data)
    assert abs(res.loss_after - masked) < 1e-5


def test_channels_and_hidden_together():
    model, data = _model(), _data()
    res = prune(model, data, kinds=["channels", "hidden"],
                remove={"layer1.0.conv1": [0, 3], "conv1": [7], "layer1.1.conv2": [2]})
    assert res.removed == {"layer1.0.conv1": [0, 3]}
    assert res.streams == {LABEL[1]: [7], LABEL[2]: [2]}
    assert _shapes(res.module) == _shapes(ResNet(s1=7, s2=11, mids=(4, 10, 10)))
    x = _data()[0][0]
    mods = dict(model.named_modules())

    def zero(_m, _a, out):  # layer1.0.conv1's own units, at its BatchNorm
        out = out.clone()
        out[:, [0, 3]] = 0
        return out

    h = mods["layer1.0.bn1"].register_forward_hook(zero)
    try:
        want = _masked(model, x, {1: [7], 2: [2]})
    finally:
        h.remove()
    with torch.no_grad():
        assert torch.allclose(res.module(x), want, atol=1e-5, rtol=0)


def test_without_hidden_a_stream_channel_is_refused_and_names_the_kind():
    model, data = _model(), _data()
    with pytest.raises(PruneRefused) as e:
        prune(model, data, remove={"conv1": [3]})
    assert e.value.exit_code == 3 and "coupled" in e.value.message and "layer1.0.conv2" in e.value.message
    assert "kinds" in str(e.value) and "hidden" in str(e.value)


@pytest.mark.parametrize("kw, err, words", [
    (dict(kinds="hidden", budget=5), UsageError, "less than one channel"),  # floor(0.4), floor(0.6): none
    (dict(kinds="hidden", budget=100), UsageError, "every channel"),
    (dict(kinds="hidden", budget=150), UsageError, "between 0 and 100"),
    (dict(kinds="fins"), UsageError, "unknown kind 'fins'"),
    (dict(kinds="hidden", remove={"conv1": [0, 1, 2, 3, 4, 5, 6, 7]}), PruneRefused, "every channel"),
    (dict(kinds="hidden", remove={"conv1": [8]}), UsageError, "out of range"),
])
def test_library_refusals(kw, err, words):
    model = _model()
    before = _state(model)
    with pytest.raises(err) as e:
        prune(model, _data(), **kw)
    assert words in str(e.value)
    _assert_same(model, before)


def test_stream_through_layernorm_is_refused(repo, truth):
    """The sample resmlp's stream passes LayerNorms: a removed channel is not a zeroed one there."""
    from fitcli.loading import load_model, resolve_callable

    t = truth["resmlp"]
    model = load_model(repo / t["checkpoint"], arch=resolve_callable(f"{repo / t['arch'].rpartition(':')[0]}:resmlp")).module
    with pytest.raises(InputError) as e:
        prune(model, str(repo / t["data"]), kinds="hidden", remove={"blocks.0.fc_out": [3]})
    assert e.value.exit_code == 3 and "LayerNorm" in e.value.message
    with pytest.raises(InputError) as e:  # chosen by a budget: no stream can lose channels
        prune(model, str(repo / t["data"]), kinds="hidden", budget=25)
    assert e.value.exit_code == 3 and "LayerNorm" in e.value.message


# ---------------------------------------------------------------------------------------------
# the command line


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "resnet_models.py").write_text(RESNET)
    model = _model()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "resnet.safetensors"))
    data = _data()
    save_file({"inputs": torch.cat([x for x, _ in data]), "targets": torch.cat([y for _, y in data])},
              str(tmp_path / "data.safetensors"))
    out = tmp_path / "out"
    out.mkdir()
    return {"model": tmp_path / "resnet.safetensors", "arch": tmp_path / "resnet_models.py",
            "data": tmp_path / "data.safetensors", "out": out}


def _cli(files, *extra):
    return ["prune", files["model"], "--arch", f"{files['arch']}:ResNet", "--data", files["data"], *extra]


def test_cli_kinds_hidden_budget(run_cli, files):
    r = run_cli(_cli(files, "--kinds", "hidden", "--budget", "25", "--rank-by", "weight_norm", "-o",
                     files["out"] / "p", "--format", "json", "-q"))
    assert r.code == 0, r.stderr
    d = json.loads(r.stdout)
    lib = prune(_model(), _data(), kinds="hidden", budget=25, rank_by="weight_norm")
    assert d["streams"] == lib.streams and len(d["streams"][LABEL[1]]) == 2 and len(d["streams"][LABEL[2]]) == 3
    assert sorted(p.name for p in files["out"].iterdir()) == ["p.pt2", "p.safetensors"]
    streams = {s: d["streams"][LABEL[s]] for s in WRITERS}
    x = _data()[2][0]
    got = torch.export.load(str(files["out"] / "p.pt2")).module()(x)
    assert torch.allclose(got, _masked(_model(), x, streams), atol=1e-5, rtol=0)
    table = run_cli(_cli(files, "--kinds", "hidden", "--budget", "25", "-o", files["out"] / "q", "-q"))
    assert table.code == 0 and f"removed from the residual stream {LABEL[1]}:" in table.stdout


@pytest.mark.parametrize("extra, code, words", [
    (["--remove", "conv1:3"], 3, "--kinds hidden"),  # coupled, without the kind
    (["--kinds", "hidden", "--budget", "5"], 2, "less than one channel"),
    (["--kinds", "hidden", "--budget", "100"], 2, "every channel"),
    (["--kinds", "hidden", "--budget", "-3"], 2, "between 0 and 100"),
    (["--kinds", "hidden,fins", "--budget", "20"], 2, "unknown kind 'fins'"),
    (["--kinds", "hidden", "--remove", "conv1:0-7"], 3, "every channel"),
    (["--kinds", "hidden", "--remove", "conv1:9"], 2, "out of range"),
])
def test_cli_refusals_write_nothing(run_cli, files, extra, code, words):
    r = run_cli(_cli(files, *extra, "-o", files["out"] / "p"))
    assert r.code == code, (r.code, r.stderr)
    assert words in r.stderr and "Traceback" not in r.stderr and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) <= 2  # the message (and at most a hint)
    assert not list(files["out"].iterdir())


def test_cli_output_over_the_input_refused(run_cli, files):
    original = files["model"].read_bytes()
    r = run_cli(_cli(files, "--kinds", "hidden", "--budget", "25", "-o", files["model"]))
    assert r.code == 2 and "Traceback" not in r.stderr
    assert files["model"].read_bytes() == original
    assert not files["model"].with_suffix(".pt2").exists()


def test_cli_no_stream_exit_3(run_cli, repo, tmp_path):
    s = repo / "sample_models"
    r = run_cli(["prune", s / "mlp.safetensors", "--arch", f"{s / 'models.py'}:mlp", "--data", s / "mlp_data.safetensors",
                 "--kinds", "hidden", "--budget", "20", "-o", tmp_path / "out"])
    assert r.code == 3 and "no residual stream" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# a Hugging Face transformer: fitcli's own surgery, no Torch-Pruning tracer


def test_api_prunes_a_hugging_face_llama_without_torch_pruning(monkeypatch, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch_pruning

    def traced(*_a, **_k):
        raise AssertionError("Torch-Pruning's tracer was called on a Hugging Face transformer")

    monkeypatch.setattr(torch_pruning, "DependencyGraph", traced)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg).eval()
    before = _state(model)
    g = torch.Generator().manual_seed(3)
    data = [torch.randint(0, 64, (4, 12), generator=g) for _ in range(2)]
    res = fitcli.prune(model, data, budget=20, kinds="mlp", compensate="none")
    assert type(res).__name__ == "TransformerPruneResult"
    inter = [lay.mlp.gate_proj.out_features for lay in res.module.model.layers]
    assert inter[0] == inter[1] < 48 and res.counts["mlp"] == 48 - inter[0]
    for lay in res.module.model.layers:  # the MLP is cut consistently: gate, up rows; down columns
        assert lay.mlp.up_proj.out_features == lay.mlp.down_proj.in_features == inter[0]
    removed = 2 * 3 * 32 * (48 - inter[0])  # per block: gate and up rows, down columns
    assert res.params == (sum(p.numel() for p in model.parameters()),
                          sum(p.numel() for p in model.parameters()) - removed)
    written = res.save(tmp_path / "small")
    again = transformers.LlamaForCausalLM.from_pretrained(str(written[0]))
    assert again.config.intermediate_size == inter[0]
    _assert_same(model, before)
    with pytest.raises(UsageError) as e:  # named units of a transformer with a budget: no
        fitcli.prune(model, data, budget=20, remove="removable")
    assert "remove" in str(e.value)
