"""Never a silent pass: every report says what was audited and what share of the model that is,
lists what was not audited and why, and a gate refuses to pass on nothing. Also the text-data edges
and the readability of validation tables on models with many layers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fitcli

REPO = Path(__file__).resolve().parents[1]
SM = REPO / "sample_models"


def _n(mods) -> int:
    return sum(p.numel() for m in mods for p in m.parameters())


class Encoder(nn.Module):
    def __init__(self, activation: str = "relu"):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, activation=activation, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


def _enc_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 5, 16, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(2)]


def test_coverage_of_the_sample_mlp_is_everything():
    from fitcli.loading import resolve_callable

    r = fitcli.audit(str(SM / "mlp.safetensors"), str(SM / "mlp_data.safetensors"),
                     arch=resolve_callable(f"{SM / 'models.py'}:mlp"), device="cpu")
    c = r["coverage"]
    assert (c["units"], c["layers"], c["not_audited"]) == (68, 3, [])
    assert c["parameters"] == c["model_parameters"] == 16 * 32 + 32 + 32 * 32 + 32 + 32 * 4 + 4
    assert c["fraction"] == 1.0


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_transformer_encoder_layers_are_audited_at_their_activation(activation):
    """nn.TransformerEncoder in eval mode: linear1/linear2 of each layer audited, linear1 at its
    nonlinearity, with values equal to a hand loop with the fused fast path off; the fast-path
    setting is restored whatever it was."""
    torch.manual_seed(0)
    m = Encoder(activation).eval()
    data = _enc_data()
    for fast in (True, False):
        torch.backends.mha.set_fastpath_enabled(fast)
        # every Linear layer: a transformer's MLP channels and its projection rows (the default: heads, mlp, blocks)
        r = fitcli.audit(m, data, device="cpu", metrics=["act_mean", "apoz", "dormant"], kinds=["mlp", "rows"])
        assert torch.backends.mha.get_fastpath_enabled() is fast
    torch.backends.mha.set_fastpath_enabled(True)
    names = [lay.name for lay in r.layers]
    assert names == ["enc.layers.0.linear1", "enc.layers.0.linear2", "enc.layers.1.linear1",
                     "enc.layers.1.linear2", "head"]
    act = F.relu if activation == "relu" else F.gelu
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        got: dict[str, list[torch.Tensor]] = {}
        hooks = []
        for i in range(2):
            lay = m.enc.layers[i]
            hooks.append(lay.linear1.register_forward_hook(
                lambda mod, a, o, k=f"enc.layers.{i}.linear1": got.setdefault(k, []).append(act(o))))
            hooks.append(lay.linear2.register_forward_hook(
                lambda mod, a, o, k=f"enc.layers.{i}.linear2": got.setdefault(k, []).append(o)))
        with torch.no_grad():
            for x, _ in data:
                m(x)
        for h in hooks:
            h.remove()
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    for k, parts in got.items():
        h = torch.cat(parts).reshape(-1, parts[0].shape[-1]).double()
        assert torch.allclose(r.layer(k).metrics["act_mean"], h.abs().mean(0), atol=1e-6), k
        assert torch.allclose(r.layer(k).metrics["apoz"], (h == 0).double().mean(0)), k
    chain = r.layer("enc.layers.0.linear1").activation_chain
    assert chain.startswith(f"enc.layers.0.linear1 -> {activation}"), chain
    # coverage: the audited linears and the head; attention and the norms are listed, not dropped
    c = r["coverage"]
    covered = _n([m.enc.layers[i].linear1 for i in range(2)] + [m.enc.layers[i].linear2 for i in range(2)] + [m.head])
    assert c["parameters"] == covered and c["model_parameters"] == _n([m])
    assert abs(c["fraction"] - covered / _n([m])) < 1e-12
    not_audited = {x["name"]: x for x in c["not_audited"]}
    assert {"enc.layers.0.self_attn.heads", "enc.layers.0.norm1", "enc.layers.1.norm2"} <= set(not_audited)
    assert not_audited["enc.layers.0.norm1"]["parameters"] == 32
    assert "not an auditable layer type" in not_audited["enc.layers.0.norm1"]["reason"]


def test_a_model_with_no_auditable_layer_fails_the_gate(tmp_path):
    class Norms(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(4)
            self.scale = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return self.norm(x) * self.scale

    r = fitcli.audit(Norms(), [torch.randn(3, 4)], device="cpu", max_dead=5)
    c = r["coverage"]
    assert (c["units"], c["layers"], c["parameters"], c["fraction"]) == (0, 0, 0, 0.0)
    assert c["model_parameters"] == 12
    assert {x["name"]: (x["type"], x["parameters"]) for x in c["not_audited"]} == {
        "norm": ("LayerNorm", 8), "": ("Norms", 4)}  # "": the model's own parameter
    assert any("no auditable layer" in n for n in r["discovery"]["notes"])
    assert not r.gate_result.passed and "no unit was audited" in r.gate_result.failures[0]
    # a model whose only layer is the output: nothing can be checked for dead units
    out = fitcli.audit(nn.Sequential(nn.Linear(4, 2)), [torch.randn(3, 4)], device="cpu", max_dead=5)
    assert out.summary["units"] == 0
    assert not out.gate_result.passed and "no unit was audited" in out.gate_result.failures[0]
    path = out.save(tmp_path / "r.json")
    res = subprocess.run([sys.executable, "-m", "fitcli", "gate", str(path), "--max-dead", "5"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "no unit was audited" in res.stdout + res.stderr


def test_weights_only_report_audits_nothing_and_guesses_no_final_layer(tmp_path):
    res = subprocess.run([sys.executable, "-m", "fitcli", "score", str(SM / "mlp.safetensors"), "--format", "json",
                          "--max-dead", "5", "--quiet"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    report = json.loads(res.stdout)
    assert not any(lay["final"] for lay in report["layers"])
    assert any("output layer is unknown" in n for n in report["discovery"]["notes"])
    assert report["coverage"]["units"] == 0
    assert {x["name"] for x in report["coverage"]["not_audited"]} == {"fc1", "fc2", "fc3"}
    assert "no unit was audited" in res.stderr


def test_min_coverage_passes_and_fails_on_either_side(tmp_path):
    torch.manual_seed(0)
    r = fitcli.audit(Encoder().eval(), _enc_data(), device="cpu", metrics=["dormant"])
    pct = 100 * r["coverage"]["fraction"]
    assert 10 < pct < 90
    path = r.save(tmp_path / "r.json")
    for limit, code in ((pct - 0.5, 0), (pct + 0.5, 1)):
        res = subprocess.run([sys.executable, "-m", "fitcli", "gate", str(path), "--min-coverage", f"{limit:.3f}"],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == code, res.stdout + res.stderr
    assert "--min-coverage" in res.stdout + res.stderr
    assert fitcli.gate(r, min_coverage=pct - 0.5).passed and not fitcli.gate(r, min_coverage=pct + 0.5).passed


def test_coverage_is_in_every_format(tmp_path):
    args = [sys.executable, "-m", "fitcli", "score", str(SM / "resmlp.safetensors"), "--arch",
            f"{SM / 'models.py'}:resmlp", "--data", str(SM / "resmlp_data.safetensors"), "--device", "cpu", "--quiet"]
    table = subprocess.run(args, capture_output=True, text=True, timeout=300)
    md = subprocess.run(args + ["--format", "markdown"], capture_output=True, text=True, timeout=300)
    js = json.loads(subprocess.run(args + ["--format", "json"], capture_output=True, text=True, timeout=300).stdout)
    c = js["coverage"]
    line = f"coverage: {c['units']} units in {c['layers']} layers audited, {100 * c['fraction']:.1f}%"
    assert line in table.stdout and line in md.stdout
    assert "blocks.0.ln1" in table.stdout and "| blocks.0.ln1 | LayerNorm |" in md.stdout


def test_layers_off_the_loss_path_say_so():
    class Aux(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 8)
            self.aux = nn.Linear(4, 5)  # computed, never reaches the output
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            self.last_aux = torch.relu(self.aux(x))
            return self.head(torch.relu(self.fc(x)))

    torch.manual_seed(0)
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    r = fitcli.audit(Aux(), [(x, y)], device="cpu", metrics=["act_mean", "taylor", "grad_norm"])
    aux = r.layer("aux")
    assert "taylor" not in aux.metrics and "act_mean" in aux.metrics
    assert aux.extra.get("gradient") == "no gradient: not on the loss path"
    assert aux.nonfinite == []
    reasons = {(s["metric"], s.get("layer")): s["reason"] for s in r.skipped}
    assert reasons[("taylor", "aux")] == "no gradient: not on the loss path"
    assert reasons[("grad_norm", "aux")] == "no gradient: not on the loss path"
    assert torch.isfinite(r.layer("fc").metrics["taylor"]).all()


def test_random_token_spec():
    from fitcli.data import load_data

    ds = load_data("random:tokens=50,len=7,n=10,seed=3", batch_size=4)
    batches = list(ds)
    assert [b.kwargs["input_ids"].shape for b in batches] == [(4, 7), (4, 7), (2, 7)]
    ids = torch.cat([b.kwargs["input_ids"] for b in batches])
    assert ids.dtype == torch.int64 and int(ids.min()) >= 0 and int(ids.max()) < 50
    assert torch.equal(ids, torch.cat([b.kwargs["input_ids"] for b in load_data("random:tokens=50,len=7,n=10,seed=3",
                                                                                 batch_size=4)]))
    assert all(bool(b.mask.all()) for b in batches)
    for bad in ("random:tokens=0,len=4", "random:tokens=5,len=x", "random:tokens=5,width=3", "random:tokens="):
        with pytest.raises(fitcli.InputError):
            load_data(bad)


def test_fixed_batch_pt2_says_the_batch_size_must_match(tmp_path):
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    ep = torch.export.export(m, (torch.randn(5, 4),))
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    res = subprocess.run([sys.executable, "-m", "fitcli", "score", str(tmp_path / "m.pt2"), "--data",
                          "random:4,n=9", "--batch-size", "3", "--quiet"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 3
    assert "exported with a fixed batch size of 5" in res.stderr and "--batch-size 5" in res.stderr
    assert "channels" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "fitcli", "score", str(tmp_path / "m.pt2"), "--data",
                          "random:4,n=10", "--batch-size", "5", "--quiet", "--format", "json"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr


class Deep(nn.Module):
    """Dozens of layers with long Hugging Face style names."""

    def __init__(self, n: int = 12):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList()
        for _ in range(n):
            blk = nn.Module()
            blk.attention = nn.Module()
            blk.attention.self = nn.Module()
            blk.attention.self.query = nn.Linear(8, 8)
            blk.intermediate = nn.Linear(8, 8)
            self.encoder.layer.append(blk)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for blk in self.encoder.layer:
            x = x + torch.relu(blk.intermediate(torch.tanh(blk.attention.self.query(x))))
        return self.head(x)


def test_validate_table_fits_100_columns_with_whole_names(tmp_path):
    torch.manual_seed(0)
    model = Deep()
    g = torch.Generator().manual_seed(1)
    torch.save({"inputs": torch.randn(32, 8, generator=g), "targets": torch.randint(0, 3, (32,), generator=g)},
               tmp_path / "d.pt")
    here = str(Path(__file__).parent)
    (tmp_path / "deep.py").write_text(f"import sys\nsys.path.insert(0, {here!r})\nfrom test_coverage import Deep\n"
                                      "def make():\n    return Deep()\n")
    torch.save(model.state_dict(), tmp_path / "deep.pt")
    res = subprocess.run([sys.executable, "-m", "fitcli", "score", str(tmp_path / "deep.pt"), "--arch",
                          f"{tmp_path / 'deep.py'}:make", "--data", str(tmp_path / "d.pt"), "--validate",
                          "--validate-units", "3", "--metric", "act_mean", "--metric", "taylor", "--metric", "apoz",
                          "--quiet", "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("Validation:"))
    end = next(i for i, ln in enumerate(lines) if ln.startswith("for this model"))
    section = lines[start:end + 1]
    assert all(len(ln) <= 100 for ln in section), "\n".join(section)
    assert any(ln.strip().startswith("metric") and "best layer" in ln and "worst layer" in ln for ln in section)
    assert any("common prefix 'encoder.layer.'" in ln for ln in lines[start:])
    rows = [ln for ln in section if re.match(r"^\s*(act_mean|taylor|apoz)\b", ln)]
    assert len(rows) == 3
    for row in rows:  # names whole: ending in a full last component, never cut with a trailing ellipsis
        names = re.findall(r"(?:…)?[\w.]+\.(?:query|intermediate)\b", row)
        assert len(names) == 2, row
        assert not re.search(r"\w…", row), row


def test_ablate_reports_say_what_was_ablated_of_the_model():
    from fitcli.loading import resolve_callable

    r = fitcli.ablate(str(SM / "mlp.safetensors"), str(SM / "mlp_data.safetensors"), layers=["fc2"],
                      arch=resolve_callable(f"{SM / 'models.py'}:mlp"), device="cpu")
    c = r["coverage"]
    assert (c["units"], c["layers"], c["parameters"]) == (32, 1, 32 * 32 + 32)
    assert {x["name"]: x["reason"] for x in c["not_audited"]} == {
        "fc1": "not among the layers asked for", "fc3": "not among the layers asked for"}
