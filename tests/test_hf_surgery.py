"""Transformer surgery on tiny LLaMA (grouped-query), GPT-2 and BERT models built from
transformers configs with random weights. References are the original model run with hooks:
removed units' inputs to their consumer zeroed, removed blocks skipped; folders are loaded back
with stock ``from_pretrained``."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

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
    with pytest.raises(UsageError, match="unknown compensation"):
        prune_hf(model, Plan(mlp={0: [1]}), compensate="lsq")
    with pytest.raises(UsageError, match=r"needs calibration sums \(collect_stats\) for block 0 mlp"):
        prune_hf(model, Plan(mlp={0: [1]}), compensate="ridge")
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


# ---- folders ----------------------------------------------------------------------------------

def source_folder(path, model):
    """A model folder as a user has it: the model, a tokenizer file, generation settings."""
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "marker": "from the source"}))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "max_new_tokens": 7}))
    return path


def test_llama_folder_loads_with_stock_from_pretrained(tmp_path):
    model = llama()
    src = source_folder(tmp_path / "src", model)
    plan = Plan(mlp={i: list(range(0, 32, 4)) + list(range(1, 32, 2)) for i in range(3)},
                heads={i: [0, 2, 3, 4] for i in range(3)}, hidden=list(range(2, 42)), drop_blocks=[1])
    pruned = prune_hf(model, plan)
    out = save_pretrained_folder(pruned, tmp_path / "out", source_dir=src)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
            cfg["hidden_size"], cfg["num_hidden_layers"]) == (24, 4, 2, 8, 40, 2)
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "tokenizer_config.json").read_text())["marker"] == "from the source"
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded) is LlamaForCausalLM and loaded.generation_config.max_new_tokens == 7
    x = ids()
    assert (logits(loaded, x) - logits(pruned, x)).abs().max() < 1e-5  # eager here, sdpa loaded
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in pruned.parameters())


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_mlp_and_blocks_folders_load(arch, tmp_path):
    model = MODELS[arch]()
    pruned = prune_hf(model, Plan(mlp={i: list(range(0, 48, 2)) for i in range(3)}, drop_blocks=[2]))
    out = save_pretrained_folder(pruned, tmp_path / "out")
    auto = AutoModelForCausalLM if arch == "gpt2" else AutoModelForMaskedLM
    loaded = auto.from_pretrained(out).eval()
    x = ids()
    assert (logits(loaded, x) - logits(pruned, x)).abs().max() < 1e-5  # eager here, sdpa loaded
    assert len(blocks(loaded)) == 2


def test_folders_that_a_stock_config_cannot_hold_are_refused(tmp_path):
    model = llama()
    cases = [
        (Plan(mlp={0: list(range(24)), 1: list(range(16))}), "different numbers of MLP channels"),
        (Plan(heads={0: [0, 1, 3, 4]}), "different numbers of query heads"),
        (Plan(hidden=list(range(44))), "LlamaConfig refuses"),  # 44 channels over 6 heads
    ]
    for plan, msg in cases:
        with pytest.raises(UsageError, match=msg):
            save_pretrained_folder(prune_hf(model, plan), tmp_path / "out")
        assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="no head_dim"):
        save_pretrained_folder(prune_hf(gpt2(), Plan(heads={i: [0, 1, 2] for i in range(3)})), tmp_path / "out")
    src = source_folder(tmp_path / "src", model)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    with pytest.raises(UsageError, match="source folder"):
        save_pretrained_folder(prune_hf(model, Plan(drop_blocks=[0])), src, source_dir=src)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".fitcli-")] == []


# ---- compensation on the tiny LLaMA -------------------------------------------------------------

def plant(model):
    """In every block, 8 of 32 MLP channels removable exactly (4 dead, 4 duplicates of kept
    channels) and one query head per key-value group (head 1 duplicates head 0 of its group,
    head 5 writes nothing)."""
    dead, dups = [3, 10, 17, 24], {7: 0, 14: 2, 21: 4, 30: 6}
    with torch.no_grad():
        for b in model.model.layers:
            m, a = b.mlp, b.self_attn
            m.gate_proj.weight[dead] = 0
            for r, k in dups.items():
                m.gate_proj.weight[r] = m.gate_proj.weight[k]
                m.up_proj.weight[r] = m.up_proj.weight[k]
            a.q_proj.weight[8:16] = a.q_proj.weight[0:8]
            a.o_proj.weight[:, 40:48] = 0
    return dead + list(dups), [1, 5]


def calibration(n=6):
    return [{"input_ids": ids(seed=10 + s, batch=2, length=16), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
            for s in range(n)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_planted_units_removed_with_ridge_compensation_load_and_match(dtype, tmp_path):
    model = llama(dtype)
    channels, heads = plant(model)
    snap = snapshot(model)
    plan = Plan(mlp={i: drop(32, channels) for i in range(3)}, heads={i: drop(6, heads) for i in range(3)})
    stats = collect_stats(model, calibration(), plan)
    log = []
    pruned = prune_hf(model, plan, stats=stats, compensate="ridge", log=log)
    assert_unchanged(model, snap)
    assert not model.training and all(not m._forward_pre_hooks for m in model.modules())
    out = save_pretrained_folder(pruned, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    x = ids(seed=99)
    ref = logits(model, x)
    # dead units: the original equals the original with them zeroed; duplicates: compensation
    # puts their contribution back, so the pruned folder equals the original itself
    assert (logits(loaded, x) - ref).abs().max() < 1e-5
    assert [e["choice"] for e in log] == ["lambda=0"] * 6
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (24, 4, 2)
    bare = prune_hf(model, plan, compensate="none")
    assert (logits(bare, x) - ref).abs().max() > 1e-3  # the duplicates mattered


def test_linear_combination_unit_removed_exactly():
    """A channel planted as 2·c0 − 0.5·c1 (its up row a combination of theirs, gate shared) is
    removed with no change; so is a constant-free dead one, with mean compensation as well."""
    model = llama(layers=2)
    with torch.no_grad():
        for b in model.model.layers:
            m = b.mlp
            m.gate_proj.weight[5] = m.gate_proj.weight[0]
            m.gate_proj.weight[6] = m.gate_proj.weight[0]
            m.up_proj.weight[6] = 2 * m.up_proj.weight[0] - 0.5 * m.up_proj.weight[5]
    plan = Plan(mlp={i: drop(32, [6]) for i in range(2)})
    pruned = prune_hf(model, plan, stats=collect_stats(model, calibration(), plan), compensate="ridge")
    x = ids(seed=5)
    assert (logits(pruned, x) - logits(model, x)).abs().max() < 1e-5


def test_mean_compensation_moves_the_bias_by_the_removed_mean():
    model = llama(layers=1)
    plan = Plan(mlp={0: drop(32, [2, 9])})
    data = calibration(3)
    stats = collect_stats(model, data, plan)
    pruned = prune_hf(model, plan, stats=stats, compensate="mean")
    acts = []
    h = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda _m, a: acts.append(a[0].reshape(-1, 32)))
    for b in data:
        logits(model, b["input_ids"])
    h.remove()
    mean = torch.cat(acts)[:, [2, 9]].double().mean(0)
    want = model.model.layers[0].mlp.down_proj.weight.double()[:, [2, 9]] @ mean
    assert torch.allclose(pruned.model.layers[0].mlp.down_proj.bias.double(), want, atol=1e-6)
    assert pruned.config.mlp_bias and pruned.model.layers[0].mlp.gate_proj.bias is not None


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_duplicates_removed_with_compensation_gpt2_bert(arch):
    """MLP channel 5 duplicates channel 0, head 1 duplicates head 0 (its q, k and v slices): with
    ridge compensation the pruned model (heads: in memory only) equals the original."""
    model = MODELS[arch]()
    with torch.no_grad():
        for b in blocks(model):
            if arch == "gpt2":
                fc, qkv = b.mlp.c_fc, b.attn.c_attn  # Conv1D: weight [in, out]
                fc.weight[:, 5], fc.bias[5] = fc.weight[:, 0], fc.bias[0]
                for base in (0, 32, 64):
                    qkv.weight[:, base + 8:base + 16] = qkv.weight[:, base:base + 8]
                    qkv.bias[base + 8:base + 16] = qkv.bias[base:base + 8]
            else:
                fc = b.intermediate.dense
                fc.weight[5], fc.bias[5] = fc.weight[0], fc.bias[0]
                s = b.attention.self
                for lin in (s.query, s.key, s.value):
                    lin.weight[8:16], lin.bias[8:16] = lin.weight[0:8], lin.bias[0:8]
    plan = Plan(mlp={i: drop(48, [5]) for i in range(3)}, heads={i: [0, 2, 3] for i in range(3)})
    log = []
    pruned = prune_hf(model, plan, stats=collect_stats(model, calibration(), plan), log=log)
    x = ids(seed=7)
    assert (logits(pruned, x) - logits(model, x)).abs().max() < 1e-5
    assert all(e["choice"] == "lambda=0" for e in log) and len(log) == 6


def test_gpt2_scaled_by_layer_index_refuses_block_removal(tmp_path):
    model = gpt2()
    model.config.scale_attn_by_inverse_layer_idx = True
    for j, b in enumerate(model.transformer.h):
        b.attn.scaling = b.attn.head_dim ** -0.5 / (j + 1)
    save_pretrained_folder(prune_hf(model, Plan(mlp={i: list(range(24)) for i in range(3)})), tmp_path / "ok")
    with pytest.raises(UsageError, match="scale_attn_by_inverse_layer_idx"):
        save_pretrained_folder(prune_hf(model, Plan(drop_blocks=[0])), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_uniform_plan_from_scores():
    from fitcli.surgery import uniform_plan
    model = llama(layers=2)
    mlp = {0: torch.arange(32.0).flip(0), 1: torch.tensor([5.0] * 32).index_fill(0, torch.tensor([4, 9]), -1.0)}
    heads = {0: torch.tensor([0.3, 0.1, 0.2, 0.9, 0.8, 0.7]), 1: torch.tensor([1.0, 2, 3, 4, 5, float("nan")])}
    plan = uniform_plan(model, mlp, 2, heads, 1)
    assert plan.mlp[0] == list(range(30)) and plan.mlp[1] == drop(32, [4, 9])
    assert plan.heads[0] == [0, 2, 3, 4] and plan.heads[1] == [1, 2, 3, 4]  # NaN counts as least fit
    lower_fit = uniform_plan(model, head_scores={0: heads[0]}, heads_remove_per_group=1, higher_is_better=False)
    assert lower_fit.heads[0] == [1, 2, 4, 5]
    with pytest.raises(UsageError, match="groups of 3"):
        uniform_plan(model, head_scores={0: heads[0]}, heads_remove_per_group=3)


def test_hidden_channels_of_an_untied_classifier():
    """LlamaForSequenceClassification: the score head reads the hidden channels too."""
    from transformers import LlamaForSequenceClassification
    cfg = LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=32, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, head_dim=8, num_labels=3, pad_token_id=0, attn_implementation="eager")
    model = randomise(LlamaForSequenceClassification(cfg))
    gone = [0, 7, 13, 22, 31, 40]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, gone] = 0
        for b in model.model.layers:
            b.self_attn.o_proj.weight[gone] = 0
            b.mlp.down_proj.weight[gone] = 0
    pruned = prune_hf(model, Plan(hidden=drop(48, gone)))
    x = ids() % (V - 1) + 1  # no padding token
    assert pruned.score.in_features == 42
    assert (logits(pruned, x) - logits(model, x)).abs().max() < 1e-5


def test_hidden_channels_refused_for_unknown_norm_layouts():
    """A LLaMA-shaped model of another type (Gemma's norms scale by 1 + w, and it has more of
    them) is refused rather than rescaled wrongly."""
    from transformers import GemmaConfig, GemmaForCausalLM
    cfg = GemmaConfig(vocab_size=V, hidden_size=48, intermediate_size=32, num_hidden_layers=1, num_attention_heads=6,
                      num_key_value_heads=2, head_dim=8)
    with pytest.raises(UsageError, match="'gemma' models are not supported"):
        prune_hf(GemmaForCausalLM(cfg), Plan(hidden=list(range(42))))
