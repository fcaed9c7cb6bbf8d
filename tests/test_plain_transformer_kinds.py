"""Plain-PyTorch transformers (``nn.TransformerEncoder``, no Hugging Face config) are audited in their
own units by default, like any transformer: attention heads, MLP channels and blocks, projection
rows only when asked for. A head planted dead (its value rows and its slice of ``out_proj`` zeroed)
is first in the heads table; the heads' statistics are computed here from the attention weights by
hand. Hidden channels (``kinds=["hidden"]``) are found for both ``norm_first`` settings and for
blocks of one's own that torch.fx traces: their statistics against the norm outputs read by hooks,
their exact ablation against a forward with the channel zeroed where the stream enters and at every
write into it; in memory and block by block (``max_memory``). A residual MLP without attention keeps every layer, as before."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fitcli

D, HEADS, FF, CLASSES = 16, 4, 32, 3
HD = D // HEADS
DEAD = ("enc.layers.1.self_attn.heads", 2)
TOL = 1e-5


class Encoder(nn.Module):
    def __init__(self, norm_first: bool, layers: int = 2):
        super().__init__()
        layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x):
        return self.head(self.enc(x).mean(dim=1))


def _encoder(norm_first: bool = False, layers: int = 2) -> Encoder:
    torch.manual_seed(0)
    m = Encoder(norm_first, layers)
    with torch.no_grad():
        for p in m.parameters():  # the layers are copies of one: make each its own
            p.copy_(torch.randn_like(p) * (0.4 if p.dim() > 1 else 0.2))
        for mod in m.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.uniform_(0.2, 2.0)
        attn = m.enc.layers[1].self_attn
        h = slice(DEAD[1] * HD, (DEAD[1] + 1) * HD)
        attn.in_proj_weight[2 * D:][h] = 0.0  # the dead head's value rows
        attn.in_proj_bias[2 * D:][h] = 0.0
        attn.out_proj.weight[:, h] = 0.0  # and its slice of the output projection's columns
    return m.eval()


def _data():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(n, 5, D, generator=g), torch.randint(0, CLASSES, (n,), generator=g)) for n in (6, 4)]


def _weights(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _unchanged(m, before):
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _layer_inputs(m, data):
    """The input of every encoder layer, per batch (hooks)."""
    ins: list[list[torch.Tensor]] = [[] for _ in m.enc.layers]
    hs = [lay.register_forward_pre_hook(lambda mod, a, i=i: ins[i].append(a[0].detach()))
          for i, lay in enumerate(m.enc.layers)]
    try:
        with torch.no_grad():
            for x, _ in data:
                m(x)
    finally:
        for h in hs:
            h.remove()
    return ins


def _hand_head_means(m, data):
    """Per layer, E|z_h| of every head's context by hand: softmax(q kᵀ / √d) v from the in-projection."""
    out = []
    for lay, xs in zip(m.enc.layers, _layer_inputs(m, data), strict=True):
        a = lay.self_attn
        sums, count = torch.zeros(HEADS, dtype=torch.float64), 0
        for x in xs:
            x = x.double()
            if lay.norm_first:
                x = F.layer_norm(x, (D,), lay.norm1.weight.double(), lay.norm1.bias.double(), lay.norm1.eps)
            w, b = a.in_proj_weight.detach().double(), a.in_proj_bias.detach().double()
            for h in range(HEADS):
                rows = [slice(j * D + h * HD, j * D + (h + 1) * HD) for j in range(3)]
                q, k, v = (x @ w[r].T + b[r] for r in rows)
                z = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(HD), dim=-1) @ v
                sums[h] += z.abs().sum()
            count += x.shape[0] * x.shape[1] * HD
        out.append(sums / count)
    return out


@pytest.fixture(scope="module")
def audited():
    m = _encoder()
    before = _weights(m)
    report = fitcli.audit(m, _data(), device="cpu")
    _unchanged(m, before)
    return m, report


def test_default_kinds_are_heads_mlp_and_blocks_without_projection_rows(audited):
    _, report = audited
    kinds = {lay.name: lay.kind for lay in report.layers}
    assert kinds == {**{f"enc.layers.{i}.self_attn.heads": "heads" for i in range(2)},
                     **{f"enc.layers.{i}.linear1": "mlp" for i in range(2)}}
    assert [b.name for b in report.blocks] == ["enc.layers.0", "enc.layers.1"]
    assert set(report.summary.kinds) == {"heads", "mlp"}


def test_head_statistics_equal_a_hand_computation_and_the_dead_head_is_first(audited):
    m, report = audited
    hand = _hand_head_means(m, _data())
    for i in range(2):
        got = torch.as_tensor(report.layer(f"enc.layers.{i}.self_attn.heads").metrics["act_mean"], dtype=torch.float64)
        assert torch.allclose(got, hand[i], rtol=1e-5, atol=1e-7), (i, got, hand[i])
    assert float(hand[1][DEAD[1]]) == 0.0 and float(min(hand[0].min(), hand[1][hand[1] > 0].min())) > 0.01
    heads = [r for r in report.to_dict()["ranked"] if r["kind"] == "heads"]
    assert (heads[0]["layer"], heads[0]["unit"], heads[0]["dead"]) == (*DEAD, True)
    assert not any(r["dead"] for r in heads[1:])


def test_rows_only_when_asked_and_name_patterns_select_as_before():
    m, data = _encoder(), _data()
    r = fitcli.audit(m, data, device="cpu", kinds=["rows"], metrics=["act_mean"])
    names = {lay.name for lay in r.layers}
    assert {"enc.layers.0.linear2", "enc.layers.1.linear2", "head"} <= names
    assert {lay.kind for lay in r.layers} == {"rows"} and r.blocks is None
    r = fitcli.audit(m, data, device="cpu", kinds=["mlp", "rows"], metrics=["act_mean"])
    assert {"enc.layers.0.linear1", "enc.layers.0.linear2"} <= {lay.name for lay in r.layers}
    r = fitcli.audit(m, data, device="cpu", layers=["enc.layers.0.linear2"], metrics=["act_mean"])
    assert [lay.name for lay in r.layers] == ["enc.layers.0.linear2"]


def test_a_residual_mlp_without_attention_keeps_every_layer():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(D, FF), nn.Linear(FF, D)

        def forward(self, x):
            return x + self.fc2(torch.relu(self.fc1(x)))

    class ResMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])
            self.head = nn.Linear(D, CLASSES)

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return self.head(x.mean(dim=1))

    torch.manual_seed(0)
    d = fitcli.audit(ResMLP().eval(), _data(), device="cpu", metrics=["act_mean"]).to_dict()
    assert [lay["name"] for lay in d["layers"]] == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2",
                                                    "head"]
    assert all("kind" not in lay for lay in d["layers"]) and "blocks" not in d


# ---------------------------------------------------------------------------------------------
# hidden channels of nn.TransformerEncoderLayer stacks, both norm_first settings


def _norm_outputs(m, x, y):
    """Every norm's output (gradients retained) of one forward, and the backward of the summed losses."""
    outs = []

    def keep(_mod, _a, o):
        o.retain_grad()
        outs.append(o)

    hs = [mod.register_forward_hook(keep) for mod in m.modules() if isinstance(mod, nn.LayerNorm)]
    try:
        F.cross_entropy(m(x), y, reduction="sum").backward()
    finally:
        for h in hs:
            h.remove()
    m.zero_grad(set_to_none=True)
    return outs


def _hand_hidden(m, data):
    """act_mean (mean |y| over tokens, summed over the norms) and taylor (mean over samples of
    |Σ_tokens y·g|, summed over the norms), by loops over channels."""
    act, tay, tokens, samples = torch.zeros(D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64), 0, 0
    per_norm = []
    for x, y in data:
        outs = _norm_outputs(m, x, y)
        per_norm.append(outs)
        tokens += x.shape[0] * x.shape[1]
        samples += x.shape[0]
    for li in range(len(per_norm[0])):
        a, t = torch.zeros(D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
        for outs in per_norm:
            yv, gv = outs[li].detach().double(), outs[li].grad.double()
            for c in range(D):
                a[c] += yv[..., c].abs().sum()
                for s in range(yv.shape[0]):
                    t[c] += (yv[s, :, c] * gv[s, :, c]).sum().abs()
        act += a / tokens
        tay += t / samples
    return act, tay


class Block(nn.Module):
    """A pre-norm block of one's own: self-attention and a GELU MLP, both residual."""

    def __init__(self):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(D), nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.ln2, self.fc_in, self.fc_out = nn.LayerNorm(D), nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc_out(F.gelu(self.fc_in(self.ln2(x))))


class Blocks(nn.Module):
    """Embedding, two blocks, a final norm, a head: torch.fx traces it (the blocks are inlined)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(D, D)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x).mean(dim=1))


def _case(arch):
    """(model, the module whose output enters the stream (None: the input does), the modules
    writing the stream: every attention and MLP output, and in a post-norm layer its norms too,
    the discovery method)."""
    if arch == "blocks":
        torch.manual_seed(0)
        m = Blocks()
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, nn.LayerNorm):
                    mod.weight.uniform_(0.2, 2.0)
                    mod.bias.uniform_(-0.5, 0.5)
        return m.eval(), m.embed, [w for b in m.blocks for w in (b.attn, b.fc_out)], "fx"
    m = _encoder(norm_first=arch == "pre-norm")
    writes = [w for lay in m.enc.layers for w in (lay.self_attn, lay.linear2)
              + (() if lay.norm_first else (lay.norm1, lay.norm2))]
    return m, None, writes, "runtime"


def _zeroed_losses(m, entry, writes, data, c):
    """Per-sample losses with channel c zeroed where the stream enters (the input, or ``entry``'s
    output) and at every write into it (None: untouched)."""
    def zero(t):
        return t if c is None else t.index_fill(-1, torch.tensor([c]), 0.0)

    hs = [mod.register_forward_hook(lambda _m, _a, o: (zero(o[0]), *o[1:]) if isinstance(o, tuple) else zero(o))
          for mod in writes + ([entry] if entry is not None else [])]
    try:
        with torch.no_grad():
            return torch.cat([F.cross_entropy(m(x if entry is not None else zero(x)), y, reduction="none")
                              for x, y in data]).double()
    finally:
        for h in hs:
            h.remove()


def _hidden_layer(report):
    return next(lay for lay in report.layers if lay.kind == "hidden")


@pytest.mark.parametrize("arch", ["pre-norm", "post-norm", "blocks"])
def test_hidden_channels_equal_hand_statistics_and_exact_ablation(arch, hook_free):
    m, entry, writes, method = _case(arch)
    data = _data()
    before = _weights(m)
    r = fitcli.audit(m, data, kinds=["hidden"], metrics=["act_mean", "taylor"], device="cpu")
    assert r.to_dict()["discovery"]["method"] == method
    lay = _hidden_layer(r)
    assert lay.units == D and [x.kind for x in r.layers] == ["hidden"]
    act, tay = _hand_hidden(m, data)
    assert torch.allclose(torch.as_tensor(lay.metrics["act_mean"], dtype=torch.float64), act, rtol=TOL, atol=1e-7)
    assert torch.allclose(torch.as_tensor(lay.metrics["taylor"], dtype=torch.float64), tay, rtol=1e-4, atol=1e-7)
    ab = fitcli.ablate(m, data, layers=[lay.name], device="cpu", chunk_size=5)
    got = torch.as_tensor(ab.layer(lay.name).metrics["ablation"], dtype=torch.float64)
    base = _zeroed_losses(m, entry, writes, data, None)
    want = torch.tensor([float((_zeroed_losses(m, entry, writes, data, c) - base).mean()) for c in range(D)],
                        dtype=torch.float64)
    assert torch.allclose(got, want, atol=TOL), (got, want)
    assert float(want.abs().max()) > 1e-3  # the channels matter: not a comparison of zeros
    _unchanged(m, before)
    hook_free(m)


@pytest.mark.parametrize("norm_first", [True, False])
def test_hidden_channels_block_by_block_equal_the_in_memory_audit(norm_first, tmp_path, hook_free):
    from safetensors.torch import save_model

    from fitcli.offload import offloaded

    m, data = _encoder(norm_first, layers=3), _data()
    src = tmp_path / "enc.safetensors"
    save_model(m, str(src))
    metrics = ["act_mean", "act_var", "taylor"]
    ref = fitcli.audit(m, data, kinds=["hidden"], metrics=metrics, device="cpu")
    name = _hidden_layer(ref).name
    ref_ab = fitcli.ablate(m, data, layers=[name], device="cpu")
    before = _weights(m)
    block = sum(p.numel() * p.element_size() for p in m.enc.layers[0].parameters())
    with offloaded(m, max_bytes=int(1.5 * block), source=src) as off:
        got = fitcli.audit(m, data, kinds=["hidden"], metrics=metrics, device="cpu")
        got_ab = fitcli.ablate(m, data, layers=[name], device="cpu")
        recomputed = off.recomputed
    # as the command line does it: the checkpoint's path, the weights mapped, never read up front
    lazy = fitcli.audit(str(src), data, arch=functools.partial(Encoder, norm_first, 3), kinds=["hidden"],
                        metrics=metrics, device="cpu", max_memory=int(1.5 * block))
    assert recomputed == lazy.to_dict()["offload"]["recomputed"] == 3 * len(data)  # checkpointed, rerun backward
    for k in metrics:
        a = torch.as_tensor(ref.layer(name).metrics[k], dtype=torch.float64)
        for other in (got, lazy):
            b = torch.as_tensor(other.layer(name).metrics[k], dtype=torch.float64)
            assert torch.allclose(a, b, rtol=TOL, atol=1e-8), k
    a = torch.as_tensor(ref_ab.layer(name).metrics["ablation"], dtype=torch.float64)
    b = torch.as_tensor(got_ab.layer(name).metrics["ablation"], dtype=torch.float64)
    assert torch.allclose(a, b, atol=TOL)
    _unchanged(m, before)
    hook_free(m)


def test_the_docs_example_runs_and_names_the_blocks_of_a_wrapped_encoder():
    """docs/unit_kinds.md's example (an encoder inside nn.Sequential: its blocks are the encoder's
    layers, not the Sequential's item), run as a user would: it prints what it says."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    text = (repo / "docs" / "unit_kinds.md").read_text()
    section = text[text.index("## The kinds an audit covers"):text.index("## Register a kind")]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=repo)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.splitlines() == ["['heads', 'mlp'] ['0.layers.0', '0.layers.1']",
                                       "['0.layers.0.linear2', '0.layers.1.linear2', '2']"]
