"""LSTM and GRU layers (two layers, bidirectional): every layer and direction is audited, its units
are hidden units, observations are time steps. Statistics and exact ablation are checked against
a brute-force unrolled loop written here (the unit's hidden state zeroed at every step, fed back
into the recurrence); a unit planted dead is found dead."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fitcli

TOL = 1e-5


class Tagger(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.rnn = getattr(nn, kind)(6, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(10, 3)

    def forward(self, ids):
        out, _ = self.rnn(self.emb(ids))
        return self.head(out.mean(1))


DEAD = ("rnn.l1", 2)


def _model(kind: str) -> Tagger:
    torch.manual_seed(0)
    m = Tagger(kind).eval()
    h = 5
    with torch.no_grad():
        for name in ("weight_ih_l1", "weight_hh_l1", "bias_ih_l1", "bias_hh_l1"):
            p = getattr(m.rnn, name)
            if kind == "LSTM":  # the cell candidate g of unit 2 is tanh(0) = 0: c and h stay 0
                p[2 * h + DEAD[1]] = 0.0
            else:  # GRU: the candidate n of unit 2 is tanh(0 + r * 0) = 0, so h = z * h = 0
                p[2 * h + DEAD[1]] = 0.0
    return m


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 20, (6, 7), generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(2)]


def _unroll(m: Tagger, ids: torch.Tensor, kill: tuple[str, int] | None = None):
    """Hidden states of every layer and direction, step by step; ``kill``: (layer, unit) held at 0
    at every step. Returns ({layer: [batch, steps, hidden]}, logits)."""
    rnn = m.rnn
    x = m.emb(ids)
    states = {}
    for k in range(2):
        outs = []
        for d in range(2):
            sfx = f"_l{k}" + ("_reverse" if d else "")
            name = f"rnn.l{k}" + ("_reverse" if d else "")
            w_ih, w_hh = getattr(rnn, "weight_ih" + sfx), getattr(rnn, "weight_hh" + sfx)
            b_ih, b_hh = getattr(rnn, "bias_ih" + sfx), getattr(rnn, "bias_hh" + sfx)
            h = torch.zeros(x.shape[0], 5)
            c = torch.zeros(x.shape[0], 5)
            seq = [None] * x.shape[1]
            for t in (range(x.shape[1] - 1, -1, -1) if d else range(x.shape[1])):
                gi, gh = x[:, t] @ w_ih.T + b_ih, h @ w_hh.T + b_hh
                if isinstance(rnn, nn.LSTM):
                    i, f, g, o = (gi + gh).chunk(4, 1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                else:
                    r = torch.sigmoid(gi[:, :5] + gh[:, :5])
                    z = torch.sigmoid(gi[:, 5:10] + gh[:, 5:10])
                    n = torch.tanh(gi[:, 10:] + r * gh[:, 10:])
                    h = (1 - z) * n + z * h
                if kill is not None and kill[0] == name:
                    h = h.clone()
                    h[:, kill[1]] = 0.0
                seq[t] = h
            states[name] = torch.stack(seq, 1)
            outs.append(states[name])
        x = torch.cat(outs, 2)
    return states, m.head(x.mean(1))


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_recurrent_units_statistics_and_exact_ablation(kind):
    m = _model(kind)
    data = _data()
    with torch.no_grad():  # the test's own unroll is right: it reproduces the fused module
        for ids, _ in data:
            assert torch.allclose(_unroll(m, ids)[1], m(ids), atol=1e-5)
    report = fitcli.audit(m, data, device="cpu")
    names = [lay.name for lay in report.layers if lay.activation_point_kind == "recurrent"]
    assert names == ["rnn.l0", "rnn.l0_reverse", "rnn.l1", "rnn.l1_reverse"]
    with torch.no_grad():
        hs = {n: torch.cat([_unroll(m, ids)[0][n] for ids, _ in data]) for n in names}
    for n in names:
        h = hs[n].reshape(-1, 5).double()
        assert torch.allclose(report.layer(n).metrics["act_mean"], h.abs().mean(0), atol=TOL), n
        assert torch.allclose(report.layer(n).metrics["act_var"], h.var(0, unbiased=False), atol=TOL), n
    assert {k: v for k, v in report.dead.items() if v} == {DEAD[0]: [DEAD[1]]}
    # weight rows across the gates: unit i owns row i of every gate block of weight_ih and weight_hh
    g = 4 if kind == "LSTM" else 3
    w = torch.cat([m.rnn.weight_ih_l0.reshape(g, 5, -1), m.rnn.weight_hh_l0.reshape(g, 5, -1)], 2)
    assert torch.allclose(report.layer("rnn.l0").metrics["weight_norm"],
                          w.transpose(0, 1).reshape(5, -1).double().norm(dim=1).detach(), atol=1e-9)
    ab = fitcli.ablate(m, data, layers=["rnn.l0", "rnn.l1_reverse", "rnn.l1"], device="cpu")
    with torch.no_grad():
        base = torch.cat([F.cross_entropy(_unroll(m, ids)[1], y, reduction="none") for ids, y in data])
        for layer in ("rnn.l0", "rnn.l1_reverse", "rnn.l1"):
            for u in range(5):
                loss = torch.cat([F.cross_entropy(_unroll(m, ids, (layer, u))[1], y, reduction="none")
                                  for ids, y in data])
                want = float((loss - base).mean())
                got = float(ab.layer(layer).metrics["ablation"][u])
                assert abs(got - want) <= TOL, (layer, u, got, want)
    assert float(ab.layer(DEAD[0]).metrics["ablation"][DEAD[1]]) == 0.0
    assert "forward" not in m.rnn.__dict__  # the module's own forward is back


def test_gru_model_coverage():
    m = _model("GRU")
    r = fitcli.audit(m, _data(), device="cpu", metrics=["dormant"])
    c = r["coverage"]
    assert c["units"] == 4 * 5 + 3 and c["layers"] == 5
    want = sum(p.numel() for p in m.rnn.parameters()) + sum(p.numel() for p in m.head.parameters())
    assert c["parameters"] == want
    assert c["model_parameters"] == sum(p.numel() for p in m.parameters())
    assert [x["name"] for x in c["not_audited"]] == ["emb"]  # embedding rows: weights only
