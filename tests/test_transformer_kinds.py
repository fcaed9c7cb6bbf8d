"""A transformer's own units by default: attention heads (and key-value groups under grouped-query
attention), MLP channels and blocks, on tiny LLaMA, GPT-2 and BERT models built here. A head and
an MLP channel planted dead are each first in their kind's table; the dead counts per kind, the
Block Influence of each block and the planted zeros are computed here with hooks, independently
of fitcli; --kinds picks kinds and says which ones a model has when asked for another."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fitcli
from fitcli.errors import UsageError

pytest.importorskip("transformers")
TAU = 0.5


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                     bos_token_id=0, eos_token_id=0)).eval()
    with torch.no_grad():
        m.model.layers[1].self_attn.v_proj.weight[4:8] = 0.0  # kv head 1 -> query heads 2 and 3, group 1
        m.model.layers[0].mlp.gate_proj.weight[5] = 0.0  # channel 5: silu(0) * 0
        m.model.layers[0].mlp.up_proj.weight[5] = 0.0
    ids = torch.randint(1, 50, (4, 6), generator=torch.Generator().manual_seed(4))
    data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    blocks = [f"model.layers.{i}" for i in range(2)]
    heads = [(f"model.layers.{i}.self_attn.heads", m.model.layers[i].self_attn.o_proj, 4) for i in range(2)]
    groups = [(f"model.layers.{i}.self_attn.kv_groups", m.model.layers[i].self_attn.o_proj, 8) for i in range(2)]
    mlp = [(f"model.layers.{i}.mlp.down_proj.input", m.model.layers[i].mlp.down_proj) for i in range(2)]
    return dict(model=m, data=data, blocks=blocks, heads=heads, groups=groups, mlp=mlp,
                dead_head=("model.layers.1.self_attn.heads", {2, 3}), dead_group=("model.layers.1.self_attn.kv_groups", {1}),
                dead_mlp=("model.layers.0.mlp.down_proj.input", 5), rows=["model.layers.0.self_attn.q_proj"])


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=4, n_positions=32,
                                   bos_token_id=0, eos_token_id=0)).eval()
    with torch.no_grad():
        c = m.transformer.h[0].attn.c_attn  # Conv1D [in, 3 * 16]: q | k | v; head 3 of v is columns 44:48
        c.weight[:, 44:48] = 0.0
        c.bias[44:48] = 0.0
        f = m.transformer.h[1].mlp.c_fc  # channel 7: gelu(0) = 0
        f.weight[:, 7] = 0.0
        f.bias[7] = 0.0
    ids = torch.randint(1, 50, (4, 6), generator=torch.Generator().manual_seed(3))
    data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    h = m.transformer.h
    return dict(model=m, data=data, blocks=[f"transformer.h.{i}" for i in range(2)],
                heads=[(f"transformer.h.{i}.attn.heads", h[i].attn.c_proj, 4) for i in range(2)], groups=[],
                mlp=[(f"transformer.h.{i}.mlp.c_fc", h[i].mlp.c_proj) for i in range(2)],
                dead_head=("transformer.h.0.attn.heads", {3}), dead_mlp=("transformer.h.1.mlp.c_fc", 7),
                rows=["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj"])


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    m = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=32,
                                                 max_position_embeddings=32, num_labels=3)).eval()
    with torch.no_grad():
        v = m.bert.encoder.layer[1].attention.self.value  # head 2 of layer 1
        v.weight[8:12] = 0.0
        v.bias[8:12] = 0.0
        d = m.bert.encoder.layer[0].intermediate.dense  # channel 11: gelu(0) = 0
        d.weight[11] = 0.0
        d.bias[11] = 0.0
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 50, (6, 7), generator=g)
    mask = torch.ones(6, 7, dtype=torch.long)
    mask[3:, 5:] = 0
    data = [{"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (6,), generator=g)}]
    lay = m.bert.encoder.layer
    return dict(model=m, data=data, blocks=[f"bert.encoder.layer.{i}" for i in range(2)],
                heads=[(f"bert.encoder.layer.{i}.attention.self.heads", lay[i].attention.output.dense, 4)
                       for i in range(2)], groups=[],
                mlp=[(f"bert.encoder.layer.{i}.intermediate.dense", lay[i].output.dense) for i in range(2)],
                dead_head=("bert.encoder.layer.1.attention.self.heads", {2}),
                dead_mlp=("bert.encoder.layer.0.intermediate.dense", 11),
                rows=["bert.encoder.layer.0.attention.self.query", "bert.pooler.dense", "classifier"])


MODELS = {"llama": _llama, "gpt2": _gpt2, "bert": _bert}


def _inputs_of(case, modules: list[nn.Module]) -> list[torch.Tensor]:
    """The input of each module (its first argument) on the data, by forward pre-hooks; [batch, tokens, features]."""
    seen: list[list[torch.Tensor]] = [[] for _ in modules]
    handles = [mod.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].detach().clone()))
               for i, mod in enumerate(modules)]
    try:
        with torch.no_grad():
            for b in case["data"]:
                case["model"](**{k: v for k, v in b.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(s) for s in seen]


def _mask(case) -> torch.Tensor:
    return torch.cat([b["attention_mask"] for b in case["data"]]).bool()


def _mean_abs(x: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
    """Per unit (a slice of ``width`` features), the mean |x| over the real tokens and the slice."""
    real = x[mask]  # [positions, features]
    return real.abs().reshape(real.shape[0], -1, width).mean(dim=(0, 2)).to(torch.float64)


def _hand_dead(case) -> dict[str, int]:
    """Per kind, the units whose dormancy (mean |h| over the layer's mean) is at most TAU, from the
    activations read here: heads and groups at the output projection's input, MLP channels at the
    down projection's input."""
    mask = _mask(case)
    out = {}
    for kind, specs in (("heads", case["heads"]), ("kv_groups", case["groups"])):
        if specs:
            acts = _inputs_of(case, [proj for _, proj, _ in specs])
            out[kind] = sum(int((m / m.mean() <= TAU).sum()) for m in
                            (_mean_abs(a, mask, w) for a, (_, _, w) in zip(acts, specs, strict=True)))
    acts = _inputs_of(case, [down for _, down in case["mlp"]])
    out["mlp"] = sum(int((m / m.mean() <= TAU).sum()) for m in (_mean_abs(a, mask, 1) for a in acts))
    return out


@pytest.fixture(scope="module", params=list(MODELS))
def audited(request):
    case = MODELS[request.param]()
    before = {k: v.clone() for k, v in case["model"].state_dict().items()}
    report = fitcli.audit(case["model"], case["data"], device="cpu", tau=TAU)
    after = case["model"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the audit changed the model"
    return request.param, case, report


def test_default_units_are_heads_mlp_channels_and_blocks(audited):
    name, case, report = audited
    want = {n: "heads" for n, _, _ in case["heads"]}
    want.update({n: "kv_groups" for n, _, _ in case["groups"]})
    want.update({n: "mlp" for n, _ in case["mlp"]})
    assert {lay.name: lay.kind for lay in report.layers} == want
    names = {lay.name for lay in report.layers}
    assert not names & set(case["rows"])  # no projection rows, no output head
    assert [b.name for b in report.blocks] == case["blocks"]
    d = report.to_dict()
    assert all(lay["kind"] == want[lay["name"]] for lay in d["layers"])


def test_planted_dead_units_are_first_in_their_kind_table(audited):
    _, case, report = audited
    d = report.to_dict()
    rows = {}
    for r in d["ranked"]:
        rows.setdefault(r["kind"], []).append(r)
    layer, heads = case["dead_head"]
    first = rows["heads"][: len(heads)]
    assert {(r["layer"], r["unit"]) for r in first} == {(layer, h) for h in heads}
    assert all(r["dead"] for r in first)
    layer, unit = case["dead_mlp"]
    assert (rows["mlp"][0]["layer"], rows["mlp"][0]["unit"], rows["mlp"][0]["dead"]) == (layer, unit, True)
    if "dead_group" in case:
        layer, groups = case["dead_group"]
        assert {(r["layer"], r["unit"]) for r in rows["kv_groups"][: len(groups)]} == {(layer, g) for g in groups}
    # every table ranks one kind only, and the tables come one after the other
    kinds = [r["kind"] for r in d["ranked"]]
    assert kinds == sorted(kinds, key=["heads", "kv_groups", "mlp"].index)


def test_planted_units_are_exactly_zero_where_they_are_read(audited):
    """The plants do what the test says: the head's slice of the projection input and the MLP
    channel at the down projection's input are 0 on every real token (read here by hooks)."""
    _, case, _ = audited
    mask = _mask(case)
    layer, heads = case["dead_head"]
    proj = next(p for n, p, _ in case["heads"] if n == layer)
    x = _inputs_of(case, [proj])[0][mask].reshape(int(mask.sum()), -1, 4)
    assert all(float(x[:, h].abs().max()) == 0.0 for h in heads)
    assert all(float(x[:, h].abs().max()) > 0.0 for h in range(x.shape[1]) if h not in heads)
    layer, unit = case["dead_mlp"]
    down = next(p for n, p in case["mlp"] if n == layer)
    y = _inputs_of(case, [down])[0][mask]
    assert float(y[:, unit].abs().max()) == 0.0


def test_dead_counts_per_kind_equal_a_hand_count(audited):
    _, case, report = audited
    hand = _hand_dead(case)
    per_kind = report.summary.kinds
    assert {k: v["dead"] for k, v in per_kind.items()} == hand
    for k, v in per_kind.items():
        units = sum(lay.units for lay in report.layers if lay.kind == k)
        assert v["units"] == units and v["dead_fraction"] == pytest.approx(hand[k] / units)
    assert report.summary.dead == sum(hand.values())


def test_block_influence_equals_a_hand_computation(audited):
    """1 - cos(block input, block output) per real token, averaged; arccos(cos) / pi likewise."""
    _, case, report = audited
    m = case["model"]
    mods = dict(m.named_modules())
    ins: dict[str, list] = {n: [] for n in case["blocks"]}
    outs: dict[str, list] = {n: [] for n in case["blocks"]}
    hs = []
    for n in case["blocks"]:
        hs.append(mods[n].register_forward_pre_hook(
            lambda mod, a, kw, n=n: ins[n].append((a[0] if a else kw["hidden_states"]).detach()), with_kwargs=True))
        hs.append(mods[n].register_forward_hook(
            lambda mod, a, o, n=n: outs[n].append((o[0] if isinstance(o, tuple) else o).detach())))
    try:
        with torch.no_grad():
            for b in case["data"]:
                m(**{k: v for k, v in b.items() if k != "labels"})
    finally:
        for h in hs:
            h.remove()
    mask = _mask(case)
    by_name = {b.name: b for b in report.blocks}
    for n in case["blocks"]:
        x, y = torch.cat(ins[n])[mask].double(), torch.cat(outs[n])[mask].double()
        cos = [float((x[i] @ y[i]) / (x[i].norm() * y[i].norm())) for i in range(x.shape[0])]
        bi = sum(1 - c for c in cos) / len(cos)
        ang = sum(math.acos(max(-1.0, min(1.0, c))) / math.pi for c in cos) / len(cos)
        assert by_name[n].block_influence == pytest.approx(bi, rel=1e-6, abs=1e-9)
        assert by_name[n].angular_distance == pytest.approx(ang, rel=1e-6, abs=1e-9)


def test_kinds_pick_kinds_and_rows_are_there_when_asked():
    case = _gpt2()
    r = fitcli.audit(case["model"], case["data"], device="cpu", kinds=["rows"])
    names = {lay.name for lay in r.layers}
    assert set(case["rows"]) <= names and not any(n.endswith(".heads") for n in names)
    assert {lay.kind for lay in r.layers} == {"rows"} and r.blocks is None
    r = fitcli.audit(case["model"], case["data"], device="cpu", kinds=["mlp"])
    assert [lay.name for lay in r.layers] == [n for n, _ in case["mlp"]] and r.summary.kinds is None


def test_a_model_without_attention_is_audited_as_before():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    data = [(torch.randn(5, 4), torch.randint(0, 3, (5,)))]
    d = fitcli.audit(m, data, device="cpu").to_dict()
    assert [lay["name"] for lay in d["layers"]] == ["0", "2"]
    assert all("kind" not in lay for lay in d["layers"]) and "kinds" not in d["summary"]
    assert "blocks" not in d and all("kind" not in r for r in d["ranked"])
    with pytest.raises(UsageError, match="no heads units .*this model has: rows"):
        fitcli.audit(m, data, device="cpu", kinds=["heads"])


@pytest.mark.parametrize("build, kinds, says, has", [
    (_llama, "nope", "'nope' is not a unit kind", "heads, mlp, hidden, blocks, rows"),
    (_bert, "hidden", "no hidden units", "heads, mlp, blocks, rows"),  # post-norm: no hidden-channel kind
    (_llama, "heads,blocks,foo", "'foo' is not a unit kind", "heads, mlp, hidden, blocks, rows")])
def test_kinds_the_model_lacks_exit_2_naming_the_kinds_it_has(tmp_path, run_cli, build, kinds, says, has):
    case = build()
    case["model"].save_pretrained(tmp_path / "m")
    torch.save({"input_ids": case["data"][0]["input_ids"]}, tmp_path / "d.pt")
    res = run_cli(["score", tmp_path / "m", "--data", tmp_path / "d.pt", "--device", "cpu", "--quiet",
                   "--kinds", kinds])
    assert res.code == 2, res.stderr
    assert says in res.stderr and "--kinds" in res.stderr
    assert f"the kinds this model has: {has}" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_score_tables_one_per_kind_and_a_per_kind_gate(tmp_path, run_cli):
    case = _llama()
    case["model"].save_pretrained(tmp_path / "llama")
    torch.save({"input_ids": case["data"][0]["input_ids"]}, tmp_path / "d.pt")
    res = run_cli(["score", tmp_path / "llama", "--data", tmp_path / "d.pt", "--device", "cpu", "--quiet",
                   "--max-dead", "10"])
    assert res.code == 1, res.stderr  # heads: 2 of 8 dead (25 %) > 10 %, though 4 of 76 units overall (5.3 %)
    for title in ("Least-fit attention heads by", "Least-fit key-value groups by", "Least-fit MLP channels by",
                  "Blocks by Block Influence"):
        assert title in res.stdout
    assert "heads: 2/8 units dead (25.00%) > max_dead 10%" in res.stdout
    assert "kv_groups: 1/4 units dead (25.00%) > max_dead 10%" in res.stdout
    assert "mlp:" not in res.stdout.split("gate FAILED")[1]


def test_ablate_by_kind_ablates_the_heads_exactly():
    """fitcli.ablate(kinds=["heads"]): every head of the model; the planted head's removal changes
    nothing (its slice is already 0), a live head's equals a hook that zeroes its slice."""
    case = _gpt2()
    m, data = case["model"], case["data"]
    r = fitcli.ablate(m, data, kinds=["heads"], device="cpu")
    assert [lay.name for lay in r.layers] == [n for n, _, _ in case["heads"]]
    layer, heads = case["dead_head"]
    assert float(r.layer(layer).metrics["ablation"][next(iter(heads))]) == 0.0

    def loss():
        b = data[0]
        out = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        lp = torch.log_softmax(out.logits[:, :-1].double(), -1)
        nll = -lp.gather(-1, b["input_ids"][:, 1:, None])[..., 0]
        return nll.mean(1)

    proj = case["heads"][1][1]

    def zero_head(mod, a):
        x = a[0].clone()
        x[..., 0:4] = 0.0
        return (x, *a[1:])

    with torch.no_grad():
        base = loss()
        h = proj.register_forward_pre_hook(zero_head)
        try:
            moved = float((loss() - base).mean())
        finally:
            h.remove()
    assert float(r.layer(case["heads"][1][0]).metrics["ablation"][0]) == pytest.approx(moved, rel=1e-4, abs=1e-7)
    with pytest.raises(UsageError, match="blocks"):
        fitcli.ablate(m, data, kinds=["blocks"], device="cpu")
