"""Attention heads as units, on tiny transformers built here: nn.MultiheadAttention, BERT, GPT-2 and a
LLaMA with grouped-query attention. A head planted dead (its value weights zero) is dead; per-head
exact ablation equals a brute-force loop that masks the head's slice with a hook; head importance
equals the gradient of an explicit per-sample head-mask variable computed here (Michel et al.)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fitcli

pytest.importorskip("transformers")
TOL = 1e-5


class MHANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        a, _ = self.attn(h, h, h)
        return self.head((h + a).mean(1))


def _mha():
    torch.manual_seed(0)
    m = MHANet().eval()
    with torch.no_grad():  # head 1's values are 0: its context is 0 whatever it attends to
        m.attn.in_proj_weight[32 + 4:32 + 8] = 0.0
        m.attn.in_proj_bias[32 + 4:32 + 8] = 0.0
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(5, 7, 6, generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(2)]
    return m, data, "attn.heads", m.attn.out_proj, 4, 1


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    m = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=32,
                                                 max_position_embeddings=32, num_labels=3)).eval()
    v = m.bert.encoder.layer[1].attention.self.value
    with torch.no_grad():
        v.weight[8:12] = 0.0
        v.bias[8:12] = 0.0  # head 2 of layer 1
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 50, (6, 7), generator=g)
    mask = torch.ones(6, 7, dtype=torch.long)
    mask[3:, 5:] = 0
    data = [{"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (6,), generator=g)}]
    return m, data, "bert.encoder.layer.1.attention.self.heads", m.bert.encoder.layer[1].attention.output.dense, 4, 2


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=4, n_positions=32,
                                   bos_token_id=0, eos_token_id=0)).eval()
    c = m.transformer.h[0].attn.c_attn  # Conv1D [in, 3 * 16]: q | k | v; head 3 of v is columns 44:48
    with torch.no_grad():
        c.weight[:, 32 + 12:32 + 16] = 0.0
        c.bias[32 + 12:32 + 16] = 0.0
    ids = torch.randint(1, 50, (4, 6), generator=torch.Generator().manual_seed(3))
    data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    return m, data, "transformer.h.0.attn.heads", m.transformer.h[0].attn.c_proj, 4, 3


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                     bos_token_id=0, eos_token_id=0)).eval()
    with torch.no_grad():  # kv head 0 is shared by query heads 0 and 1: both are dead
        m.model.layers[1].self_attn.v_proj.weight[0:4] = 0.0
    ids = torch.randint(1, 50, (4, 6), generator=torch.Generator().manual_seed(4))
    data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    return m, data, "model.layers.1.self_attn.heads", m.model.layers[1].self_attn.o_proj, 4, (0, 1)


def _loss(m, b, out):
    if isinstance(b, tuple):
        return F.cross_entropy(out, b[1], reduction="none")
    if "labels" in b:
        return F.cross_entropy(out.logits, b["labels"], reduction="none")
    logits, target = out.logits[:, :-1], b["input_ids"][:, 1:]
    real = b["attention_mask"][:, 1:].bool()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return (ce.reshape(target.shape) * real).sum(1) / real.sum(1)


def _run(m, b):
    if isinstance(b, tuple):
        return m(b[0])
    return m(**{k: v for k, v in b.items() if k != "labels"})


def _with_mask(m, data, proj, heads, scale_fn):
    """Run every batch with the projection's input multiplied per head by ``scale_fn(batch) ->
    [batch, heads]``; returns per-sample losses and the scales used."""
    losses, scales = [], []
    for b in data:
        xi = scale_fn(b)

        def pre(mod, args, xi=xi):
            z = args[0]
            d = z.shape[-1] // heads
            return (z * xi.repeat_interleave(d, dim=1).unsqueeze(1).to(z.dtype),)

        h = proj.register_forward_pre_hook(pre)
        try:
            losses.append(_loss(m, b, _run(m, b)))
        finally:
            h.remove()
        scales.append(xi)
    return losses, scales


def _mha_context_scale(m, data, heads, scale_fn):
    """nn.MultiheadAttention applies its out_proj functionally: the brute-force loop writes the
    attention out here to scale each head's context."""
    losses = []
    attn = m.attn
    for b in data:
        xi = scale_fn(b)
        x = b[0]
        h = m.embed(x)
        q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        bsz, t, e = q.shape
        d = e // heads
        q, k, v = (y.reshape(bsz, t, heads, d).transpose(1, 2) for y in (q, k, v))
        w = torch.softmax(q @ k.transpose(-2, -1) / d ** 0.5, dim=-1)
        z = (w @ v) * xi.reshape(bsz, heads, 1, 1)
        a = F.linear(z.transpose(1, 2).reshape(bsz, t, e), attn.out_proj.weight, attn.out_proj.bias)
        losses.append(F.cross_entropy(m.head((h + a).mean(1)), b[1], reduction="none"))
    return losses


BUILDERS = {"mha": _mha, "bert": _bert, "gpt2": _gpt2, "llama": _llama}


def _batch_size(b):
    return b[0].shape[0] if isinstance(b, tuple) else b["input_ids"].shape[0]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_heads_dead_ablation_and_importance(name):
    m, data, layer, proj, heads, dead = BUILDERS[name]()
    dead = {dead} if isinstance(dead, int) else set(dead)
    report = fitcli.audit(m, data, device="cpu", layers=[layer])
    lay = report.layer(layer)
    assert lay.type == "Heads" and lay.units == heads and lay.activation_point_kind == "heads"
    assert set(report.dead[layer]) == dead

    def run_scaled(scale_fn):
        if name == "mha":
            return _mha_context_scale(m, data, heads, scale_fn)
        return _with_mask(m, data, proj, heads, scale_fn)[0]

    # head importance: |dL_x/d xi_{x,h}| averaged over samples, xi a per-sample head mask at 1
    xis = []

    def mask_of(b):
        xi = torch.ones(_batch_size(b), heads, requires_grad=True)
        xis.append(xi)
        return xi

    losses = run_scaled(mask_of)
    torch.autograd.backward([loss.sum() for loss in losses])
    importance = torch.cat([xi.grad for xi in xis]).abs().mean(0).double()
    assert torch.allclose(lay.metrics["taylor"], importance, rtol=1e-4, atol=1e-7), (lay.metrics["taylor"], importance)
    # exact ablation of each head's slice against the brute-force loop
    ab = fitcli.ablate(m, data, layers=[layer], device="cpu")
    with torch.no_grad():
        base = torch.cat(run_scaled(lambda b: torch.ones(_batch_size(b), heads)))
        for hh in range(heads):
            def zero(b, hh=hh):
                xi = torch.ones(_batch_size(b), heads)
                xi[:, hh] = 0
                return xi
            want = float((torch.cat(run_scaled(zero)) - base).mean())
            got = float(ab.layer(layer).metrics["ablation"][hh])
            assert abs(got - want) <= TOL, (name, hh, got, want)
    for hh in dead:
        assert float(ab.layer(layer).metrics["ablation"][hh]) == 0.0


def test_heads_are_opt_in_and_selected_by_units_heads(tmp_path):
    import subprocess
    import sys

    m, data, layer, *_ = _mha()
    assert layer not in [lay.name for lay in fitcli.audit(m, data, device="cpu").layers]
    torch.save(m.state_dict(), tmp_path / "m.pt")
    torch.save({"inputs": torch.cat([x for x, _ in data]), "targets": torch.cat([y for _, y in data])},
               tmp_path / "d.pt")
    (tmp_path / "net.py").write_text(f"import sys\nsys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})\n"
                                     "from test_heads import MHANet\n")
    res = subprocess.run([sys.executable, "-m", "fitcli", "ablate", str(tmp_path / "m.pt"), "--arch",
                          f"{tmp_path / 'net.py'}:MHANet", "--data", str(tmp_path / "d.pt"), "--units", "heads",
                          "--format", "json", "--quiet", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    import json

    report = json.loads(res.stdout)
    assert [lay["name"] for lay in report["layers"]] == ["attn.heads"]
    assert report["layers"][0]["removable"] == [1]


def test_validation_covers_heads_with_a_random_baseline():
    m, data, layer, *_ = _bert()
    r = fitcli.audit(m, data, device="cpu", layers=[layer], validate=True)
    v = r.validation
    assert layer in v["layers"] and "taylor" in v["layers"][layer]["metrics"]
    rnd = v["random"]["layers"][layer]
    assert rnd["draws"] == 200 and rnd["units"] == 4
    assert -1 <= rnd["spearman"] <= 1 and 0 <= rnd["bottom10_overlap"] <= 1


def test_random_baseline_is_chance():
    from fitcli.validate import random_baseline

    o = torch.arange(200, dtype=torch.float64)
    r = random_baseline({"x": o})["layers"]["x"]
    assert abs(r["spearman"]) < 0.03  # a random order does not rank like the oracle
    assert abs(r["bottom10_overlap"] - 0.1) < 0.03  # and its bottom 10% overlaps by chance: ~10%


def _sharpen(m, name):
    """Random-init attention is near uniform; give the queries and keys unit-scale weights so the
    heads' distributions differ."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        if name == "mha":
            m.attn.in_proj_weight[:32] = torch.randn(32, 16, generator=g)
            return
        if name == "gpt2":
            w = m.transformer.h[0].attn.c_attn.weight  # Conv1D [in, q | k | v]
            w[:, :32] = torch.randn(16, 32, generator=g)
            return
        att = m.bert.encoder.layer[1].attention.self if name == "bert" else m.model.layers[1].self_attn
        for lin in (att.query, att.key) if name == "bert" else (att.q_proj, att.k_proj):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g))


def _hand_entropy(p, mask):
    """Per head: -sum_k p log p of each real query position, averaged over those positions."""
    b, h, q, _ = p.shape
    out = []
    for head in range(h):
        total, n = 0.0, 0
        for i in range(b):
            for j in range(q):
                if mask is not None and not bool(mask[i, j]):
                    continue
                total += -sum(float(x) * math.log(float(x)) for x in p[i, head, j].double() if float(x) > 0)
                n += 1
        out.append(total / n)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_attention_entropy_per_head_equals_a_hand_computation(name):
    """The model's own attention probabilities (need_weights / output_attentions), entropy by hand;
    padding queries excluded (BERT has padding)."""
    m, data, layer, *_ = BUILDERS[name]()
    _sharpen(m, name)
    if name != "mha":
        m.config._attn_implementation = "eager"
    r = fitcli.audit(m, data, layers=[layer], metrics=["attn_entropy"], device="cpu")
    got = r.layer(layer).metrics["attn_entropy"]
    sums, counts = torch.zeros(4, dtype=torch.float64), 0
    with torch.no_grad():
        ps, masks = [], []
        for b in data:
            if name == "mha":
                h = m.embed(b[0])
                ps.append(m.attn(h, h, h, need_weights=True, average_attn_weights=False)[1])
                masks.append(None)
            else:
                out = m(**{k: v for k, v in b.items() if k != "labels"}, output_attentions=True)
                idx = 0 if name == "gpt2" else 1
                ps.append(out.attentions[idx])
                masks.append(b["attention_mask"].bool())
    for p, mk in zip(ps, masks, strict=True):
        n = p.shape[0] * p.shape[2] if mk is None else int(mk.sum())
        sums += _hand_entropy(p, mk) * n
        counts += n
    want = sums / counts
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-9), (got, want)
    assert float(want.max() - want.min()) > 0.05  # the heads really differ: not a uniform-attention fluke


def test_attention_entropy_needs_reachable_weights():
    """Under fused (sdpa) attention the probabilities never exist: the metric is skipped, with how to
    get it; an nn.MultiheadAttention whose caller asked for no weights still gets none back."""
    m, data, layer, *_ = _bert()
    r = fitcli.audit(m, data, layers=[layer], metrics=["attn_entropy", "act_mean"], device="cpu")
    assert "attn_entropy" not in r.layer(layer).metrics
    assert any(s["metric"] == "attn_entropy" and "eager" in s["reason"] for s in r.to_dict()["skipped"])
    mm, mdata, mlayer, *_ = _mha()
    seen = []
    hook = mm.attn.register_forward_hook(lambda mod, a, out: seen.append(out[1]))
    try:
        fitcli.audit(mm, mdata, layers=[mlayer], metrics=["attn_entropy"], device="cpu")
        x = mdata[0][0]
        h = mm.embed(x)
        _, w = mm.attn(h, h, h, need_weights=False)
    finally:
        hook.remove()
    assert w is None and seen[-1] is None  # asked for none, got none
    assert len(seen) >= len(mdata) + 1 and all(x.dim() == 3 for x in seen[:-1])  # the model asked for averaged weights


def test_language_model_labels_are_not_class_targets():
    """A causal LM's batches may carry ``labels`` (one per token): ablation uses the lm loss and
    reports no accuracy change (there is no per-sample class to be right about)."""
    m, data, *_ = _gpt2()
    data = [dict(b, labels=b["input_ids"]) for b in data]
    r = fitcli.ablate(m, data, layers=["transformer.h.0.mlp.c_fc"], units=[0, 1, 2], device="cpu")
    lay = r.layer("transformer.h.0.mlp.c_fc")
    assert "ablation_accuracy" not in lay.metrics
    lm = [{k: v for k, v in b.items() if k != "labels"} for b in data]  # labels = input_ids: the lm loss
    with torch.no_grad():  # unit 1 zeroed by hand: the same loss change
        base = torch.cat([_loss(m, b, _run(m, b)) for b in lm]).double()
        h = m.transformer.h[0].mlp.c_fc.register_forward_hook(lambda mod, a, o: o.index_fill(-1, torch.tensor([1]), 0.0))
        try:
            abl = torch.cat([_loss(m, b, _run(m, b)) for b in lm]).double()
        finally:
            h.remove()
    assert abs(float(lay.metrics["ablation"][1]) - float((abl - base).mean())) <= TOL


def test_score_heads_cli_skips_what_a_head_cannot_have_with_the_reason(tmp_path, run_cli):
    """``score --layer '*.heads'`` on a BERT folder (fused attention): weight_norm_out (a head has
    no consuming layer) and attn_entropy (probabilities not reachable) are skipped with their
    reasons and the head layers; no head is flagged non-finite, no value is NaN."""
    import json

    from safetensors.torch import save_file

    m, data, layer, *_ = _bert()
    m.save_pretrained(tmp_path / "hf")
    save_file({k: v.contiguous() for k, v in data[0].items()}, str(tmp_path / "tokens.safetensors"))
    args = ["score", tmp_path / "hf", "--data", tmp_path / "tokens.safetensors", "--layer", "*.heads",
            "--device", "cpu", "--quiet"]
    res = run_cli([*args, "--format", "json"])
    assert res.code == 0, res.stderr
    report = json.loads(res.stdout)
    heads = [lay["name"] for lay in report["layers"]]
    assert layer in heads and all(n.endswith(".heads") for n in heads)
    skipped = {s["metric"]: s for s in report["skipped"]}
    assert "consuming" in skipped["weight_norm_out"]["reason"] and skipped["weight_norm_out"]["layers"] == heads
    assert "eager" in skipped["attn_entropy"]["reason"] and skipped["attn_entropy"]["layers"] == heads
    for lay in report["layers"]:
        assert lay["nonfinite"] == [], lay["name"]
        assert "weight_norm_out" not in lay["metrics"] and "attn_entropy" not in lay["metrics"]
        assert all(v is not None and math.isfinite(v) for vs in lay["metrics"].values() for v in vs), lay["name"]
    table = run_cli(args)
    assert table.code == 0, table.stderr
    assert "non-finite" not in table.stdout and "weight_norm_out" in table.stdout and "attn_entropy" in table.stdout
