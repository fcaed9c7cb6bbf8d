"""Exact ablation of Hugging Face transformers (which torch.fx cannot trace) with the prefix shared at
block granularity: the blocks before the ablated layer's block run once per batch, the rest per chunk.
Per head and per MLP channel, the result equals a hook-and-rerun loop written here (one forward per
unit, the unit's slice zeroed at the input of the projection that reads it) to 1e-6 relative, on tiny
BERT, GPT-2 and LLaMA (grouped-query) models built from transformers configs, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fitcli

pytest.importorskip("transformers")
REL = 1e-6


def _ids(g, n=5, t=7):
    return torch.randint(1, 50, (n, t), generator=g)


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    m = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3,
                                                 num_attention_heads=4, intermediate_size=32,
                                                 max_position_embeddings=32, num_labels=3, initializer_range=0.3)).eval().double()
    g = torch.Generator().manual_seed(2)
    data = []
    for _ in range(2):
        ids = _ids(g)
        mask = torch.ones_like(ids)
        mask[2:, 5:] = 0  # padding: the attention mask must reach the replayed blocks
        data.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (5,), generator=g)})
    lay = m.bert.encoder.layer[1]
    return m, data, {"bert.encoder.layer.1.attention.self.heads": (lay.attention.output.dense, 4),
                     "bert.encoder.layer.1.intermediate.dense": (lay.output.dense, 1)}


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=3, n_head=4, n_positions=32,
                                   bos_token_id=0, eos_token_id=0, initializer_range=0.3)).eval().double()
    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": (i := _ids(g)), "attention_mask": torch.ones_like(i)} for _ in range(2)]
    blk = m.transformer.h[1]
    return m, data, {"transformer.h.1.attn.heads": (blk.attn.c_proj, 4), "transformer.h.1.mlp.c_fc": (blk.mlp.c_proj, 1)}


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                     bos_token_id=0, eos_token_id=0, initializer_range=0.3)).eval().double()
    g = torch.Generator().manual_seed(4)
    data = [{"input_ids": (i := _ids(g)), "attention_mask": torch.ones_like(i)} for _ in range(2)]
    blk = m.model.layers[1]
    return m, data, {"model.layers.1.self_attn.heads": (blk.self_attn.o_proj, 4),
                     "model.layers.1.mlp.down_proj.input": (blk.mlp.down_proj, 1)}


BUILDERS = {"bert": _bert, "gpt2": _gpt2, "llama": _llama}


def _loss(b, out):
    """The per-sample loss, its cross-entropy in float32 as fitcli's losses compute it."""
    if "labels" in b:
        return F.cross_entropy(out.logits.float(), b["labels"], reduction="none").double()
    logits, target = out.logits[:, :-1].float(), b["input_ids"][:, 1:]
    real = b["attention_mask"][:, 1:].bool()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return ((ce.reshape(target.shape) * real).sum(1) / real.sum(1)).double()


def _losses(m, data, proj=None, cols=None):
    """Per-sample losses over the data, with columns ``cols`` of ``proj``'s input zeroed (if given)."""
    def pre(mod, args):
        z = args[0].clone()
        z[..., cols] = 0
        return (z,)
    h = proj.register_forward_pre_hook(pre) if proj is not None else None
    try:
        with torch.no_grad():
            return torch.cat([_loss(b, m(**{k: v for k, v in b.items() if k != "labels"})) for b in data])
    finally:
        if h is not None:
            h.remove()


def _hook_and_rerun(m, data, proj, width, units):
    base = _losses(m, data)
    return torch.tensor([float((_losses(m, data, proj, slice(u * width, (u + 1) * width)) - base).mean())
                         for u in range(units)], dtype=torch.float64)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_block_prefix_equals_hook_and_rerun(name):
    m, data, layers = BUILDERS[name]()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    r = fitcli.ablate(m, data, layers=list(layers), device="cpu", chunk_size=3)
    for layer, (proj, kind_width) in layers.items():
        got = r.layer(layer).metrics["ablation"].double()
        units = got.numel()
        fan_in = proj.weight.shape[0] if hasattr(proj, "nf") else proj.in_features  # GPT-2's Conv1D: [in, out]
        width = fan_in // units if kind_width > 1 else 1
        want = _hook_and_rerun(m, data, proj, width, units)
        assert r.metric_info["ablation"]["method"][layer] == "block-prefix"
        assert float(want.abs().max()) > 1e-4  # the units matter: the comparison has teeth
        assert torch.allclose(got, want, rtol=REL, atol=REL * float(want.abs().max())), (layer, got, want)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # the model is never changed


def _count_calls(m, data, chunk, batches):
    blocks = m.model.layers
    counts = {"before": 0, "at": 0, "after": 0}
    hs = []
    for key, mod in (("before", blocks[0].self_attn), ("at", blocks[1].self_attn), ("after", blocks[2].mlp)):
        hs.append(mod.register_forward_hook(lambda *a, key=key: counts.__setitem__(key, counts[key] + 1)))
    try:
        fitcli.ablate(m, data, layers=["model.layers.1.self_attn.heads"], device="cpu", chunk_size=chunk,
                      max_batches=batches)
    finally:
        for h in hs:
            h.remove()
    return counts


def test_blocks_before_the_ablated_block_run_once_per_batch():
    m, data, _ = _llama()
    one_1, two_1, two_4 = _count_calls(m, data, 1, 1), _count_calls(m, data, 1, 2), _count_calls(m, data, 4, 2)
    # the block before: one more call for one more batch, whatever the chunk size (4 heads: 4 chunks or 1)
    assert two_1["before"] - one_1["before"] == 1
    assert two_1["before"] == two_4["before"]
    # the ablated block and the one after run once per batch and once per chunk
    assert two_1["at"] - one_1["at"] == 1 + 4 and two_1["after"] - one_1["after"] == 1 + 4
    assert two_1["after"] - two_4["after"] == 2 * (4 - 1)
