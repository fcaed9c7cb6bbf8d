"""``--validate`` on a transformer's residual blocks: Block Influence and angular distance against
each block's exact removal, beside a random order, on a tiny grouped-query LLaMA built here.

The exact side is recomputed here without fitcli: a forward hook makes each block return its
input, and the next-token loss is computed by hand (cross-entropy of the shifted tokens, a mean
per sample, then over the samples). The correlations are recomputed with scipy from the report's
block scores and those hand loss changes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fitcli
from fitcli import report as rep
from fitcli import validate as fv

pytest.importorskip("transformers")
stats = pytest.importorskip("scipy.stats")

LAYERS = 4
TOL = 1e-5


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                     bos_token_id=0, eos_token_id=0, initializer_range=0.3)).eval()
    g = torch.Generator().manual_seed(4)
    data = []
    for _ in range(2):
        ids = torch.randint(1, 50, (4, 6), generator=g)
        data.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return m, data, [f"model.layers.{i}" for i in range(LAYERS)]


def _hand_loss(m, data, removed: str | None) -> float:
    """The mean over samples of each sample's mean next-token cross-entropy, with block ``removed``
    (if any) returning its own input."""
    mods = dict(m.named_modules())

    def skip(mod, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        return (x, *out[1:]) if isinstance(out, tuple) else x

    h = mods[removed].register_forward_hook(skip, with_kwargs=True) if removed else None
    total, n = 0.0, 0
    try:
        with torch.no_grad():
            for b in data:
                logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
                ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), b["input_ids"][:, 1:], reduction="none")
                total += float(ce.mean(dim=1).sum())
                n += ce.shape[0]
    finally:
        if h is not None:
            h.remove()
    return total / n


@pytest.fixture(scope="module")
def validated():
    m, data, blocks = _llama()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    report = fitcli.audit(m, data, device="cpu", validate=True)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "validation changed the model"
    return m, data, blocks, report


def test_blocks_kind_exact_side_equals_hand_removal(validated):
    m, data, blocks, report = validated
    k = report.validation.kinds["blocks"]
    assert k.layers == blocks
    base = _hand_loss(m, data, None)
    hand = {n: _hand_loss(m, data, n) - base for n in blocks}
    assert set(k.ablation) == set(blocks)
    for n in blocks:
        assert abs(k.ablation[n] - hand[n]) <= TOL, (n, k.ablation[n], hand[n])
    assert max(abs(v) for v in hand.values()) > 1e-3  # removing a block does change the loss


def test_blocks_kind_correlations_and_random_baseline(validated):
    m, data, blocks, report = validated
    k = report.validation.kinds["blocks"]
    base = _hand_loss(m, data, None)
    oracle = np.array([abs(_hand_loss(m, data, n) - base) for n in blocks])
    rows = {b.name: b for b in report.blocks}
    assert set(k.metrics) == {"block_influence", "angular_distance"}
    best = None
    for metric, got in k.metrics.items():
        x = np.array([getattr(rows[n], metric) for n in blocks])
        rho = stats.spearmanr(x, oracle).statistic
        tau = stats.kendalltau(x, oracle).statistic
        assert abs(got.spearman - rho) <= 1e-9 and abs(got.kendall - tau) <= 1e-9
        assert got.units == LAYERS
        # bottom 10% of 4 blocks: the single block each order puts last
        assert got.bottom10_overlap == float(np.argmin(x) == np.argmin(oracle))
        best = metric if best is None or rho > k.metrics[best].spearman else best
    assert k.best == best
    assert k.random.units == LAYERS and k.random.draws == fv.RANDOM_DRAWS
    assert abs(k.random.spearman) < 0.3  # 200 random orders of 4 blocks: near 0


def _cells(lines: list[str], head: str) -> dict[str, list[str]]:
    i = lines.index(head)
    rows = {}
    for ln in lines[i + 2:]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_blocks_beside_heads_and_mlp_in_the_json_schema_table_and_markdown(validated):
    from rich.console import Console

    from fitcli.render.markdown import render_markdown
    from fitcli.render.table import render_report

    _, _, _, report = validated
    d = json.loads(rep.dumps(report.to_dict()))
    rep.validate(d)  # the shipped schema covers the blocks kind
    kinds = d["validation"]["kinds"]
    assert set(kinds) == {"heads", "kv_groups", "mlp", "blocks"}  # the kinds of the tables (GQA: key-value groups too)
    assert all("ablation" not in k for name, k in kinds.items() if name != "blocks")  # units: per layer
    again = fitcli.AuditReport.from_dict(d).to_dict()
    assert again["validation"] == d["validation"]  # from_dict(to_dict) round trip
    console = Console(width=140, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(render_report(d, 140))
    text = console.export_text()
    assert "Validation per unit kind" in text
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("block_influence"))
    assert f"{kinds['blocks']['metrics']['block_influence']['spearman']:+.2f}" in line
    md = render_markdown(d).splitlines()
    rows = _cells(md, "| metric | " + " | ".join(kinds) + " |")
    assert set(rows) == {m for k in kinds.values() for m in k["metrics"]} | {"(random order)"}
    for col, (name, k) in enumerate(kinds.items()):
        for m, cells in rows.items():
            c = k["random"] if m == "(random order)" else k["metrics"].get(m)
            want = "" if c is None else ("n/a" if c["spearman"] is None else f"{c['spearman']:+.2f}")
            assert cells[col].strip("*") == want, (name, m)
            assert cells[col].startswith("**") == (k["best"] == m)


def test_blocks_only_validation():
    """An audit of blocks alone: the validation is the blocks kind, no unit layer."""
    m, data, blocks = _llama()
    report = fitcli.audit(m, data, device="cpu", kinds=["blocks"], validate=True)
    v = report.validation
    assert v.layers == {} and set(v.kinds) == {"blocks"} and v.best is None
    assert v.kinds["blocks"].layers == blocks
    assert v.oracle == "|Δloss| with the block replaced by the identity"
    assert v.recommendation.startswith(f"for this model's blocks, {v.kinds['blocks'].best} agrees best")
    rep.validate(json.loads(rep.dumps(report.to_dict())))
