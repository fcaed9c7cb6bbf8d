"""Transformer surgery on tiny LLaMA (grouped-query), GPT-2 and BERT models built from
transformers configs with random weights. References are the original model run with hooks:
removed units' inputs to their consumer zeroed, removed blocks skipped; folders are loaded back
with stock ``from_pretrained``."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoModelForMaskedLM, BertConfig, BertForMaskedLM, GPT2Config,
                          GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM)

from fitcli.errors import UsageError
from fitcli.surgery import Plan, collect_stats, prune_hf, save_pretrained_folder

V = 64


def randomise(model, seed=0, scale=0.15):
    """Weights large enough that removing a unit changes the logits visibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name.lower() and "weight" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def llama(dtype=torch.float32, layers=3, seed=0):
    cfg = LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                      tie_word_embeddings=True, attn_implementation="eager")
    return randomise(LlamaForCausalLM(cfg), seed).to(dtype)


def gpt2(dtype=torch.float32):
    cfg = GPT2Config(vocab_size=V, n_embd=32, n_head=4, n_layer=3, n_inner=48, n_positions=64,
                     attn_implementation="eager")
    return randomise(GPT2LMHeadModel(cfg)).to(dtype)


def bert(dtype=torch.float32):
    cfg = BertConfig(vocab_size=V, hidden_size=32, num_attention_heads=4, num_hidden_layers=3, intermediate_size=48,
                     max_position_embeddings=64, attn_implementation="eager")
    return randomise(BertForMaskedLM(cfg)).to(dtype)


MODELS = {"llama": llama, "gpt2": gpt2, "bert": bert}


def blocks(model):
    return {"llama": lambda m: m.model.layers, "gpt2": lambda m: m.transformer.h,
            "bert": lambda m: m.bert.encoder.layer}[family_name(model)](model)


def family_name(model):
    return {"LlamaForCausalLM": "llama", "GPT2LMHeadModel": "gpt2", "BertForMaskedLM": "bert"}[type(model).__name__]


def mlp_consumer(model, i):
    b = blocks(model)[i]
    return {"llama": lambda: b.mlp.down_proj, "gpt2": lambda: b.mlp.c_proj, "bert": lambda: b.output.dense}[family_name(model)]()


def head_consumer(model, i):
    b = blocks(model)[i]
    return {"llama": lambda: b.self_attn.o_proj, "gpt2": lambda: b.attn.c_proj,
            "bert": lambda: b.attention.output.dense}[family_name(model)]()


def ids(seed=1, batch=2, length=12):
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def zeroed(columns: dict):
    """Hooks: the listed input columns of each consumer module are zeroed."""
    def hook_for(cols):
        def hook(_m, args):
            x = args[0].clone()
            x[..., cols] = 0
            return (x,) + tuple(args[1:])
        return hook
    handles = [m.register_forward_pre_hook(hook_for(torch.as_tensor(c))) for m, c in columns.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def skipped(model, drop):
    """Hooks: the dropped blocks return their input hidden states."""
    def hook(_m, args, kwargs, out):
        h = args[0] if args else kwargs["hidden_states"]
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
    handles = [blocks(model)[i].register_forward_hook(hook, with_kwargs=True) for i in drop]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, snap):
    now = model.state_dict()
    assert now.keys() == snap.keys()
    assert all(torch.equal(now[k], snap[k]) for k in snap)


def tol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-10


def drop(total, removed):
    return [i for i in range(total) if i not in removed]


# ---- units against hooks ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_mlp_channels_equal_zeroed_channels(arch, dtype):
    model = MODELS[arch](dtype)
    snap = snapshot(model)
    width = mlp_consumer(model, 0).weight.shape[1 if arch != "gpt2" else 0]
    removed = {i: sorted(torch.randperm(width, generator=torch.Generator().manual_seed(i))[: width // 4].tolist())
               for i in range(3)}
    pruned = prune_hf(model, Plan(mlp={i: drop(width, r) for i, r in removed.items()}), compensate="none")
    x = ids()
    with zeroed({mlp_consumer(model, i): r for i, r in removed.items()}):
        ref = logits(model, x)
    got = logits(pruned, x)
    assert (got - ref).abs().max() < tol(dtype)
    assert (logits(model, x) - ref).abs().max() > 1e-3  # the removed channels mattered
    assert_unchanged(model, snap)
    key = {"llama": "intermediate_size", "gpt2": "n_inner", "bert": "intermediate_size"}[arch]
    assert getattr(pruned.config, key) == width - width // 4 and getattr(model.config, key) == width


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_heads_equal_zeroed_heads(arch, dtype):
    model = MODELS[arch](dtype)
    snap = snapshot(model)
    removed = {"llama": [1, 5], "gpt2": [2], "bert": [0]}[arch]  # llama: one of each kv group of 3
    heads = 6 if arch == "llama" else 4
    hd = 8
    pruned = prune_hf(model, Plan(heads={0: drop(heads, removed), 2: drop(heads, removed)}), compensate="none")
    cols = [h * hd + j for h in removed for j in range(hd)]
    x = ids()
    with zeroed({head_consumer(model, 0): cols, head_consumer(model, 2): cols}):
        ref = logits(model, x)
    assert (logits(pruned, x) - ref).abs().max() < tol(dtype)
    assert (logits(model, x) - ref).abs().max() > 1e-3
    assert_unchanged(model, snap)
    if arch == "llama":
        attn = pruned.model.layers[0].self_attn
        assert attn.q_proj.out_features == 4 * hd and attn.k_proj.out_features == 2 * hd
        assert attn.num_key_value_groups == 2


def test_gqa_needs_equal_heads_per_group():
    model = llama()
    with pytest.raises(UsageError, match="same number of query heads"):
        prune_hf(model, Plan(heads={0: [0, 1, 2, 3]}))  # group 0 keeps 3, group 1 keeps 1


def test_bad_plans_refused():
    model = llama()
    for plan, msg in [(Plan(mlp={7: [0]}), "block 7 does not exist"), (Plan(mlp={0: []}), "nothing would be kept"),
                      (Plan(mlp={0: [0, 0]}), "listed twice"), (Plan(hidden=[99]), "out of range"),
                      (Plan(drop_blocks=[0, 1, 2]), "every block")]:
        with pytest.raises(UsageError, match=msg):
            prune_hf(model, plan)
    for arch in ("gpt2", "bert"):
        with pytest.raises(UsageError, match="no head_dim"):
            prune_hf(MODELS[arch](), Plan(hidden=list(range(16))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_hidden_channels_exact_where_zero_in_the_residual_stream(dtype):
    """RMSNorm over fewer channels is the same function only where the removed channels are zero
    everywhere: planted zero in the embedding and in every write to the residual stream."""
    model = llama(dtype)
    gone = [3, 11, 20, 29, 38, 47]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, gone] = 0  # tied: the head's columns too
        for b in model.model.layers:
            b.self_attn.o_proj.weight[gone] = 0
            b.mlp.down_proj.weight[gone] = 0
    snap = snapshot(model)
    pruned = prune_hf(model, Plan(hidden=drop(48, gone)))
    x = ids()
    # LlamaRMSNorm normalises in float32 whatever the model's dtype: float32 rounding either way
    assert (logits(pruned, x) - logits(model, x)).abs().max() < 1e-5
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight
    assert pruned.config.hidden_size == 42 and pruned.model.layers[1].mlp.gate_proj.in_features == 42
    assert_unchanged(model, snap)


@pytest.mark.parametrize("arch", list(MODELS))
def test_blocks_equal_skipped_blocks(arch):
    model = MODELS[arch]()
    snap = snapshot(model)
    pruned = prune_hf(model, Plan(drop_blocks=[1]))
    x = ids()
    with skipped(model, [1]):
        ref = logits(model, x)
    assert (logits(pruned, x) - ref).abs().max() < 1e-5
    assert len(blocks(pruned)) == 2
    assert_unchanged(model, snap)


def test_generation_with_cache_after_block_removal(tmp_path):
    model = llama(layers=4)
    pruned = prune_hf(model, Plan(drop_blocks=[0, 2]))
    assert [b.self_attn.layer_idx for b in pruned.model.layers] == [0, 1]
    save_pretrained_folder(pruned, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert loaded.config.num_hidden_layers == 2
    x = ids(batch=1, length=5)
    mask = torch.ones_like(x)
    with torch.no_grad():
        cached = loaded.generate(x, attention_mask=mask, max_new_tokens=3, do_sample=False, use_cache=True, pad_token_id=0)
        plain = loaded.generate(x, attention_mask=mask, max_new_tokens=3, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.shape == (1, 8) and torch.equal(cached, plain)
    with skipped(model, [0, 2]):  # greedy tokens by hand: argmax of the skipped original, step by step
        seq = x
        for _ in range(3):
            seq = torch.cat([seq, logits(model, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq)
