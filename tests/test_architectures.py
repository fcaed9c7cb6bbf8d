"""Real architectures, built in the test from the real classes (no downloads): a ResNet-style CNN
with Conv -> BatchNorm -> ReLU blocks, residual adds and a downsample branch; BERT, GPT-2 and a
LLaMA-style model with grouped-query attention from transformers configs. Each has planted dead
units, which must be found exactly; activation points must be where the spec puts them; exact
ablation at that point must equal a brute-force loop of forward hooks written here (1e-5)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fitcli

transformers = pytest.importorskip("transformers")  # a dev dependency: make test installs it
warnings.filterwarnings("ignore", module="transformers")
TOL = 1e-5


# ---------------------------------------------------------------------------------------------
# a ResNet-style CNN (torchvision's BasicBlock pattern, written here: torchvision is not installed)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)  # called twice, as in torchvision
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


RESNET_DEAD = {"conv1": [2], "layer1.0.conv1": [3, 5], "layer1.1.conv1": [0]}


def _resnet() -> tuple[TinyResNet, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = TinyResNet()
    with torch.no_grad():
        for m in model.modules():  # trained-looking running statistics
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        bns = {"conv1": model.bn1, "layer1.0.conv1": model.layer1[0].bn1, "layer1.1.conv1": model.layer1[1].bn1}
        for layer, units in RESNET_DEAD.items():  # BatchNorm weight 0, bias -1: always 0 after the ReLU
            bns[layer].weight[units] = 0.0
            bns[layer].bias[units] = -1.0
    model.eval()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(3)]
    return model, data


def _ce(logits, y):
    return F.cross_entropy(logits.float(), y, reduction="none")


def _brute_ablation(model, data, module, units, loss, first_call_only=True, pre=False):
    """Mean loss change when each unit is zeroed at ``module``'s output (its input with ``pre``), by
    rerunning the whole model once per unit with a hook; channel dim 1 for 4-D tensors, else last."""
    def zero(t, u):
        t = t.clone()
        if t.dim() == 4:
            t[:, u] = 0
        else:
            t[..., u] = 0
        return t

    out = {}
    with torch.no_grad():
        base = torch.cat([loss(model(**b) if isinstance(b, dict) else model(b[0]), b) for b in data])
        for u in units:
            calls = {"n": 0}

            if pre:
                def hook(m, args, u=u):
                    return (zero(args[0], u), *args[1:])
                h = module.register_forward_pre_hook(hook)
            else:
                def hook(m, args, o, u=u, calls=calls):
                    calls["n"] += 1
                    if first_call_only and calls["n"] > 1:
                        return o
                    return zero(o, u)
                h = module.register_forward_hook(hook)
            try:
                losses = []
                for b in data:
                    calls["n"] = 0
                    losses.append(loss(model(**b) if isinstance(b, dict) else model(b[0]), b))
            finally:
                h.remove()
            out[u] = float((torch.cat(losses) - base).mean())
    return out


def test_resnet_points_follow_batchnorm_to_the_relu():
    model, data = _resnet()
    info = fitcli.inspect(model, data)
    chains = {lay["name"]: lay["activation_chain"] for lay in info.layers}
    assert chains["conv1"] == "conv1 -> bn1 -> relu"
    assert chains["layer1.0.conv1"] == "layer1.0.conv1 -> bn1 -> relu"
    assert chains["layer1.0.conv2"] == "layer1.0.conv2 -> bn2"  # the residual add mixes: read after bn2
    assert chains["layer1.1.downsample.0"] == "layer1.1.downsample.0 -> 1"  # the branch's BatchNorm
    assert chains["fc"] == "fc"
    points = {lay["name"]: lay["activation_point"] for lay in info.layers}
    assert points["layer1.0.conv1"] == "layer1.0.relu"


def test_resnet_planted_dead_channels_are_found_exactly():
    model, data = _resnet()
    report = fitcli.audit(model, data, device="cpu")
    assert report.settings["model_mode"] == "eval"
    dead = {k: v for k, v in report.dead.items() if v}
    assert dead == RESNET_DEAD
    for layer, units in RESNET_DEAD.items():
        apoz = report.layer(layer).metrics["apoz"]
        assert all(float(apoz[u]) == 1.0 for u in units)


def test_resnet_ablation_at_the_point_equals_a_hook_loop():
    model, data = _resnet()
    loss = lambda out, b: _ce(out, b[1])  # noqa: E731
    report = fitcli.ablate(model, data, layers=["layer1.0.conv1", "layer1.0.conv2", "conv1"], device="cpu")
    # layer1.0.conv1's point is the first call of the block's shared ReLU
    want = _brute_ablation(model, data, model.layer1[0].relu, range(8), loss, first_call_only=True)
    got = report.layer("layer1.0.conv1").metrics["ablation"]
    for u, w in want.items():
        assert abs(float(got[u]) - w) <= TOL, (u, float(got[u]), w)
    assert all(float(got[u]) == 0.0 for u in RESNET_DEAD["layer1.0.conv1"])
    want = _brute_ablation(model, data, model.layer1[0].bn2, range(8), loss)
    got = report.layer("layer1.0.conv2").metrics["ablation"]
    for u, w in want.items():
        assert abs(float(got[u]) - w) <= TOL, (u, float(got[u]), w)
    assert report.removable["conv1"] == [2]


def test_train_mode_model_is_audited_in_eval_mode_and_restored():
    model, data = _resnet()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = fitcli.audit(model, data, device="cpu", metrics=["act_mean"])
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm running statistics untouched
    model.eval()
    grabbed = []
    h = model.bn1.register_forward_hook(lambda m, i, o: grabbed.append(F.relu(o).abs().mean(dim=(0, 2, 3))))
    with torch.no_grad():
        for x, _ in data:
            model(x)
    h.remove()
    want = torch.stack(grabbed).mean(0).double()
    assert torch.allclose(report.layer("conv1").metrics["act_mean"], want, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Hugging Face models from tiny configs


def _tokens(n=8, t=7, vocab=50, seed=0, pad_from=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    if pad_from is not None:
        mask[n // 2:, pad_from:] = 0
        ids[n // 2:, pad_from:] = 0
    return ids, mask


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    m = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=32,
                                                 max_position_embeddings=32, num_labels=3)).eval()
    with torch.no_grad():
        d = m.bert.encoder.layer[0].intermediate.dense
        d.weight[5] = 0.0
        d.bias[5] = -20.0  # GELU(-20) is exactly 0: a dead unit
    ids, mask = _tokens(pad_from=5)
    labels = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(2))
    return m, [{"input_ids": ids[:4], "attention_mask": mask[:4], "labels": labels[:4]},
               {"input_ids": ids[4:], "attention_mask": mask[4:], "labels": labels[4:]}]


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                   bos_token_id=0, eos_token_id=0)).eval()
    with torch.no_grad():
        c = m.transformer.h[1].mlp.c_fc  # Conv1D: weight [in, out], unit i is column i
        c.weight[:, 7] = 0.0
        c.bias[7] = -20.0
    ids, mask = _tokens(pad_from=4)
    return m, [{"input_ids": ids, "attention_mask": mask}]


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                     bos_token_id=0, eos_token_id=0)).eval()
    with torch.no_grad():
        m.model.layers[1].mlp.gate_proj.weight[11] = 0.0  # silu(0) * up = 0: a dead gated unit
    ids, mask = _tokens(pad_from=5)
    return m, [{"input_ids": ids, "attention_mask": mask}]


def _lm_loss(out, b):
    """Next-token cross-entropy per sample over real target tokens, written here independently."""
    logits = out.logits[:, :-1]
    target = b["input_ids"][:, 1:]
    real = b["attention_mask"][:, 1:].bool()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="none")
    ce = ce.reshape(target.shape) * real
    return ce.sum(1) / real.sum(1)


def _cls_loss(out, b):
    return F.cross_entropy(out.logits.float(), b["labels"], reduction="none")


def _model_inputs(batches):
    return [{k: v for k, v in b.items() if k != "labels"} for b in batches]


def _brute_hf(model, batches, module, units, loss, pre=False):
    """As _brute_ablation, with the loss given the whole batch dict (labels included)."""
    def run():
        return torch.cat([loss(model(**{k: v for k, v in b.items() if k != "labels"}), b) for b in batches])

    def zero(t, u):
        t = t.clone()
        t[..., u] = 0
        return t

    out = {}
    with torch.no_grad():
        base = run()
        for u in units:
            h = (module.register_forward_pre_hook(lambda m, a, u=u: (zero(a[0], u), *a[1:])) if pre
                 else module.register_forward_hook(lambda m, a, o, u=u: zero(o, u)))
            try:
                out[u] = float((run() - base).mean())
            finally:
                h.remove()
    return out


def test_bert_points_dead_unit_and_ablation():
    m, batches = _bert()
    report = fitcli.audit(m, batches, device="cpu", kinds=["mlp", "rows"])  # every layer but the heads
    assert report.settings["loss"] == "cross_entropy"
    chains = {lay.name: lay.activation_chain for lay in report.layers}
    pre = "bert.encoder.layer.0."
    assert chains[pre + "intermediate.dense"] == pre + "intermediate.dense -> intermediate_act_fn"
    assert chains[pre + "output.dense"] == pre + "output.dense -> dropout"  # then the residual add mixes
    assert chains[pre + "attention.self.query"] == pre + "attention.self.query"  # heads split: mixed
    assert report.layer("bert.embeddings.word_embeddings").activation_point_kind == "weights"
    assert {k: v for k, v in report.dead.items() if v} == {pre + "intermediate.dense": [5]}
    ab = fitcli.ablate(m, batches, layers=[pre + "intermediate.dense"], units=[0, 1, 5, 9], device="cpu")
    want = _brute_hf(m, batches, m.bert.encoder.layer[0].intermediate.intermediate_act_fn, [0, 1, 5, 9], _cls_loss)
    got = ab.layer(pre + "intermediate.dense").metrics["ablation"]
    for u, w in want.items():
        assert abs(float(got[u]) - w) <= TOL, (u, float(got[u]), w)
    assert float(got[5]) == 0.0


def test_gpt2_conv1d_units_points_and_lm_ablation():
    m, batches = _gpt2()
    report = fitcli.audit(m, batches, device="cpu")
    assert report.settings["loss"] == "lm"
    assert any("shifted by one" in n for n in report["discovery"]["notes"])
    c_fc = report.layer("transformer.h.1.mlp.c_fc")
    assert c_fc.type == "Conv1D" and c_fc.units == 64
    assert c_fc.activation_chain == "transformer.h.1.mlp.c_fc -> act"
    # weight_norm of a Conv1D unit is its column (weight is in x out)
    w = m.transformer.h[1].mlp.c_fc.weight.detach().double()
    assert torch.allclose(c_fc.metrics["weight_norm"], w.norm(dim=0), atol=1e-9)
    assert {k: v for k, v in report.dead.items() if v} == {"transformer.h.1.mlp.c_fc": [7]}
    ab = fitcli.ablate(m, batches, layers=["transformer.h.1.mlp.c_fc"], units=[0, 7, 30], device="cpu")
    want = _brute_hf(m, batches, m.transformer.h[1].mlp.act, [0, 7, 30], _lm_loss)
    got = ab.layer("transformer.h.1.mlp.c_fc").metrics["ablation"]
    for u, wv in want.items():
        assert abs(float(got[u]) - wv) <= TOL, (u, float(got[u]), wv)


def test_llama_gated_units_with_grouped_query_attention():
    m, batches = _llama()
    report = fitcli.audit(m, batches, device="cpu", kinds=["mlp", "rows"])  # every layer but the heads
    names = [lay.name for lay in report.layers]
    gated = "model.layers.1.mlp.down_proj.input"
    assert gated in names
    assert not any(n.endswith(("gate_proj", "up_proj")) for n in names)  # reported once, as the group
    lay = report.layer(gated)
    assert lay.type == "GatedLinear" and lay.units == 32
    assert lay.members == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    mlp = m.model.layers[1].mlp
    want_norm = (mlp.gate_proj.weight.double().norm(dim=1) ** 2 + mlp.up_proj.weight.double().norm(dim=1) ** 2).sqrt()
    assert torch.allclose(lay.metrics["weight_norm"], want_norm.detach(), atol=1e-9)
    want_out = mlp.down_proj.weight.double().norm(dim=0).detach()  # down column i
    assert torch.allclose(lay.metrics["weight_norm_out"], want_out, atol=1e-9)
    assert report.layer("model.layers.0.self_attn.k_proj").units == 8  # grouped-query: 2 kv heads x 4
    assert {k: v for k, v in report.dead.items() if v} == {gated: [11]}
    ab = fitcli.ablate(m, batches, layers=[gated], units=[0, 11, 20], device="cpu")
    want = _brute_hf(m, batches, mlp.down_proj, [0, 11, 20], _lm_loss, pre=True)
    got = ab.layer(gated).metrics["ablation"]
    for u, wv in want.items():
        assert abs(float(got[u]) - wv) <= TOL, (u, float(got[u]), wv)


@pytest.mark.parametrize("build", [_bert, _gpt2])
def test_padding_is_not_an_observation(build):
    """The same sentences padded to two lengths give the same statistics and gradients."""
    m, batches = build()
    longer = []
    for b in batches:
        n, t = b["input_ids"].shape
        pad = torch.zeros(n, 5, dtype=torch.long)
        nb = {"input_ids": torch.cat([b["input_ids"], pad], 1), "attention_mask": torch.cat([b["attention_mask"], pad], 1)}
        if "labels" in b:
            nb["labels"] = b["labels"]
        longer.append(nb)
    metrics = ["act_mean", "act_var", "apoz", "dormant", "act_entropy", "taylor", "output_corr"]
    if "labels" not in batches[0]:
        metrics.remove("output_corr")
    a = fitcli.audit(m, batches, device="cpu", metrics=metrics)
    b = fitcli.audit(m, longer, device="cpu", metrics=metrics)
    compared = 0
    for la, lb in zip(a.layers, b.layers, strict=True):
        for k in la.metrics:
            assert torch.allclose(la.metrics[k], lb.metrics[k], rtol=1e-4, atol=1e-6, equal_nan=True), (la.name, k)
            compared += 1
    assert compared > 20


def _save_hf_folder(tmp_path, model, with_tokenizer=False):
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    if with_tokenizer:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(
            "the a cat dog sat on mat ran to and big small red blue".split())}}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)
    return folder


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "fitcli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_inspect_gpt2_folder_lists_conv1d_layers(tmp_path):
    from safetensors.torch import save_file

    m, batches = _gpt2()
    folder = _save_hf_folder(tmp_path, m)
    save_file({k: v.contiguous() for k, v in batches[0].items()}, str(tmp_path / "tokens.safetensors"))
    res = _cli(["inspect", folder, "--data", tmp_path / "tokens.safetensors", "--format", "json"], tmp_path)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["model"]["format"] == "hf" and info["model"]["arch"] == "transformers.GPT2LMHeadModel"
    layers = {x["name"]: x for x in info["layers"]}
    for i in range(2):
        fc = layers[f"transformer.h.{i}.mlp.c_fc"]
        assert (fc["type"], fc["units"], fc["activation_point"]) == ("Conv1D", 64, f"transformer.h.{i}.mlp.act")
        assert layers[f"transformer.h.{i}.attn.c_attn"]["type"] == "Conv1D"
        assert layers[f"transformer.h.{i}.attn.c_attn"]["units"] == 48


def test_score_hf_folder_with_token_file_and_with_text(tmp_path):
    from safetensors.torch import save_file

    m, batches = _bert()
    folder = _save_hf_folder(tmp_path, m, with_tokenizer=True)
    b = {k: torch.cat([x[k] for x in batches]) for k in batches[0]}
    save_file({k: v.contiguous() for k, v in b.items()}, str(tmp_path / "tokens.safetensors"))
    out = tmp_path / "r.json"
    res = _cli(["score", folder, "--data", tmp_path / "tokens.safetensors", "-o", out, "--format", "json",
                "--device", "cpu", "--quiet"], tmp_path)
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    fitcli.report.validate(report)
    assert report["model"]["arch"] == "transformers.BertForSequenceClassification"
    assert report["settings"]["loss"] == "cross_entropy"
    assert report["summary"]["dead"] == 1
    (tmp_path / "s.txt").write_text("the cat sat on the mat\n\na big dog ran\nthe small red cat and the blue dog sat\n")
    res = _cli(["score", folder, "--text", tmp_path / "s.txt", "--max-seq-len", "6", "--format", "json",
                "--device", "cpu", "--quiet"], tmp_path)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["data"]["samples"] == 3
    assert {s["metric"] for s in report["skipped"]} >= {"taylor", "grad_norm"}  # no labels, no loss


def test_unknown_parameterised_modules_bilinear_and_embedding():
    class Scaler(nn.Module):  # a parameterised module fitcli does not know
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(4, 4))

        def forward(self, x):
            return x @ self.gain

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.bil = nn.Bilinear(4, 4, 6)
            self.act = nn.Tanh()
            self.scale = Scaler()
            self.head = nn.Linear(6, 3)

        def forward(self, ids):
            e = self.scale(self.emb(ids)).mean(1)
            return self.head(self.act(self.bil(e, e)))

    torch.manual_seed(0)
    net = Net().eval()
    ids = torch.randint(0, 10, (8, 5))
    report = fitcli.audit(net, [(ids, torch.randint(0, 3, (8,)))], device="cpu")
    emb = report.layer("emb")
    assert emb.activation_point_kind == "weights" and emb.units == 10
    assert set(emb.metrics) <= {"weight_norm", "weight_norm_out"}  # rows: weight-only units
    assert torch.allclose(emb.metrics["weight_norm"], net.emb.weight.detach().double().norm(dim=1))
    bil = report.layer("bil")
    assert bil.type == "Bilinear" and bil.units == 6 and bil.activation_chain == "bil -> act"
    unsupported = {u["name"]: u for u in report.unsupported}
    assert unsupported["scale"]["type"] == "Scaler" and "not supported" in unsupported["scale"]["reason"]
    assert report.summary["units"] == 6  # embedding rows are not counted as audited units for dead %


def test_a_model_without_targets_is_ablated_by_its_output_change():
    """A sentence-embedding model: no target at all. Ablation measures 1 - cosine between the
    embedding with and without the unit (the report says so); gradient metrics are skipped."""
    class Embedder(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(6, 12)
            self.act = nn.ReLU()
            self.fc2 = nn.Linear(12, 4)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    torch.manual_seed(0)
    m = Embedder().eval()
    with torch.no_grad():
        m.fc1.weight[3] = 0.0
        m.fc1.bias[3] = -1.0  # dead
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(4))
    report = fitcli.audit(m, [x[:10], x[10:]], device="cpu")
    skipped = {s["metric"]: s["reason"] for s in report.skipped}
    assert "taylor" in skipped and "grad_norm" in skipped
    ab = fitcli.ablate(m, [x[:10], x[10:]], layers=["fc1"], device="cpu")
    assert any("1 - cosine" in n for n in ab["discovery"]["notes"])
    with torch.no_grad():
        base = m(x)
        want = []
        for u in range(12):
            h = m.act.register_forward_hook(lambda mod, i, o, u=u: o.index_fill(1, torch.tensor([u]), 0.0))
            out = m(x)
            h.remove()
            want.append(float((1 - F.cosine_similarity(out, base, dim=1)).mean()))
    got = ab.layer("fc1").metrics["ablation"]
    for u in range(12):
        assert abs(float(got[u]) - want[u]) <= 1e-6, u
    assert ab.removable["fc1"][0] == 3
