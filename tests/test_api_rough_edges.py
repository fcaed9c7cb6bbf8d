"""The library as a notebook user meets it: a script that builds a model, a DataLoader or a data
file, and calls ``fitcli.audit`` / ``ablate``. One test per rough edge a new user hit; every
expected value is computed here by hand, independently of fitcli."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fitcli
from fitcli.errors import FitcliError, InputError


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=16, pad_token_id=0)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 40, (6, 9), generator=g)
    mask = torch.ones(6, 9, dtype=torch.long)
    mask[1, 4:] = 0  # padding planted at the end of three samples
    mask[4, 6:] = 0
    mask[5, 2:] = 0
    ids[mask == 0] = 0
    return model, ids, mask


# 1. a token file with the ids under `inputs` beside an attention mask


def test_token_file_with_inputs_and_attention_mask_uses_the_mask(tmp_path):
    model, ids, mask = _bert()
    path = tmp_path / "tokens.pt"
    torch.save({"inputs": ids, "attention_mask": mask}, path)
    from_file = fitcli.audit(model, str(path), metrics=["act_mean"], batch_size=3, device="cpu", kinds=["mlp", "rows"])
    as_dicts = [{"input_ids": ids[i : i + 3], "attention_mask": mask[i : i + 3]} for i in (0, 3)]
    reference = fitcli.audit(model, as_dicts, metrics=["act_mean"], device="cpu", kinds=["mlp", "rows"])
    # by hand: the mean of the first FFN layer's GELU output over the real tokens only
    with torch.no_grad():
        hidden = []
        h = model.encoder.layer[0].intermediate
        handle = h.register_forward_hook(lambda m, i, o: hidden.append(o))
        model(input_ids=ids, attention_mask=mask)
        handle.remove()
    real = hidden[0][mask.bool()].double().abs()  # act_mean is E|h| over the real tokens: [tokens, 24]
    name = "encoder.layer.0.intermediate.dense"
    assert torch.allclose(from_file.layer(name).metrics["act_mean"], real.mean(0), atol=1e-6)
    compared = [lay for lay in reference.layers if "act_mean" in lay.metrics]
    assert len(compared) >= 6
    for lay in compared:
        assert torch.allclose(from_file.layer(lay.name).metrics["act_mean"], lay.metrics["act_mean"], atol=1e-6)


def test_a_tensor_the_data_file_does_not_use_is_named_not_dropped(tmp_path):
    model, ids, mask = _bert()
    path = tmp_path / "tokens.pt"
    torch.save({"inputs": ids, "attention_mask": mask, "position_weights": torch.ones(6, 9)}, path)
    with pytest.raises(InputError, match="position_weights"):
        fitcli.audit(model, str(path), metrics=["act_mean"], device="cpu")
    torch.save({"inputs": ids, "x": ids}, path)  # two tensors for one role: which one?
    with pytest.raises(InputError, match="'inputs' and 'x'"):
        fitcli.audit(model, str(path), metrics=["act_mean"], device="cpu")
    # `labels` beside `inputs` are the targets (they were dropped: no loss, no gradient metrics)
    mlp, x = _mlp().eval(), torch.randn(8, 6)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    torch.save({"inputs": x, "labels": y}, path)
    report = fitcli.audit(mlp, str(path), metrics=["taylor"], device="cpu")
    assert report.settings["loss"] == "cross_entropy" and "taylor" in report.layer("0").metrics


# 7. the caller's model is handed back where it was


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3), nn.BatchNorm1d(3))


def test_the_audit_device_does_not_keep_the_callers_model(monkeypatch):
    """The audit moves the model to its device (here the meta device, standing in for a GPU:
    the run then fails); afterwards every parameter and buffer is the caller's own tensor again,
    on its device, with its values."""
    import fitcli.engine

    model = _mlp()
    before = {k: (v.data_ptr(), v.device, v.clone()) for k, v in model.state_dict(keep_vars=True).items()}
    x = torch.randn(8, 6)
    monkeypatch.setattr(fitcli.engine, "pick_device", lambda spec="auto": torch.device("meta"))
    with pytest.raises(Exception):  # noqa: B017 - the meta device cannot give numbers back
        fitcli.audit(model, [x], metrics=["act_mean"], device="cpu")
    after = model.state_dict(keep_vars=True)
    for k, (ptr, dev, value) in before.items():
        assert after[k].device == dev, k
        assert after[k].data_ptr() == ptr, k
        assert torch.equal(after[k], value), k


# 15. loss callables: the batch as the loader yielded it, or PyTorch's (output, target)


def test_loss_callables_take_the_loaders_batch_or_the_target():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    # by hand: the mean change of each sample's cross entropy with hidden unit i set to 0
    with torch.no_grad():
        h = torch.relu(model[0](x))
        base = F.cross_entropy(model[2](h), y, reduction="none")
        want = []
        for i in range(5):
            hi = h.clone()
            hi[:, i] = 0
            want.append(float((F.cross_entropy(model[2](hi), y, reduction="none") - base).mean()))
    batch_form = fitcli.ablate(model, loader, layers=["0"], device="cpu",
                               loss=lambda out, batch: F.cross_entropy(out, batch[1], reduction="none"))
    target_form = fitcli.ablate(model, loader, layers=["0"], device="cpu",
                                loss=lambda out, y: F.cross_entropy(out, y, reduction="none"))
    for r in (batch_form, target_form):
        got = r.layer("0").metrics["ablation"]
        assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-6)

    def unpacking(out, batch):
        inputs, targets = batch
        assert inputs.shape[1] == 4
        return F.cross_entropy(out, targets, reduction="none")

    dicts = [{"x": x[i : i + 4], "labels": y[i : i + 4]} for i in (0, 4, 8)]

    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x)

    by_key = fitcli.ablate(Kw(), dicts, layers=["net.0"], device="cpu",
                           loss=lambda out, batch: F.cross_entropy(out, batch["labels"], reduction="none"))
    unpacked = fitcli.ablate(model, loader, layers=["0"], device="cpu", loss=unpacking)
    assert torch.allclose(by_key.layer("net.0").metrics["ablation"], torch.tensor(want, dtype=torch.float64),
                          atol=1e-6)
    assert torch.allclose(unpacked.layer("0").metrics["ablation"], torch.tensor(want, dtype=torch.float64),
                          atol=1e-6)


# 16. progress=True, a short LayerReport repr, typed keyword arguments


def test_progress_true_false_and_a_callback(capsys):
    model, x = _mlp().eval(), torch.randn(12, 6)
    data = [x[:4], x[4:8], x[8:]]
    quiet = fitcli.audit(model, data, metrics=["act_mean"], device="cpu", progress=False)
    shown = fitcli.audit(model, data, metrics=["act_mean"], device="cpu", progress=True)
    calls = []
    fitcli.audit(model, data, metrics=["act_mean"], device="cpu",
                 progress=lambda description, done, total: calls.append((description, done, total)))
    assert torch.equal(quiet.layer("0").metrics["act_mean"], shown.layer("0").metrics["act_mean"])
    assert ("scoring", 3, 3) in calls  # three batches, each reported as it is done
    assert [c[1] for c in calls if c[0] == "scoring"] == [0, 1, 2, 3]
    assert capsys.readouterr().out == ""  # a progress bar is on stderr, never on stdout
    with pytest.raises(FitcliError, match="progress"):
        fitcli.audit(model, data, metrics=["act_mean"], device="cpu", progress="yes")


def test_layer_report_repr_is_short():
    model = nn.Sequential(nn.Linear(6, 400), nn.ReLU(), nn.Linear(400, 3))
    with torch.no_grad():
        model[0].bias[:7] = -100.0  # 7 dead units, the others alive on any such input
        model[0].bias[7:] = 100.0
    report = fitcli.audit(model, [torch.randn(16, 6)], device="cpu", metrics=["act_mean", "dormant"])
    text = repr(report.layer("0"))
    assert len(text) < 200 and "tensor" not in text
    for word in ("'0'", "400", "7 dead", "act_mean", "dormant"):
        assert word in text, (word, text)


API = ("audit", "ablate", "blocks", "inspect", "gate", "load", "load_data", "compare", "prune")


@pytest.mark.parametrize("name", API)
def test_public_functions_have_typed_keywords_and_docstrings(name):
    fn = getattr(fitcli, name)
    sig = inspect.signature(fn)
    assert not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()), f"{name} takes **options"
    assert all(p.annotation is not inspect.Parameter.empty for p in sig.parameters.values()), name
    doc = inspect.getdoc(fn) or ""
    for section in ("Args:", "Returns:", "Examples:"):
        assert section in doc, (name, section)
    args = doc.split("Args:")[1].split("Returns:")[0]
    assert [p for p in sig.parameters if p not in args] == [], name  # every keyword is documented
    if name in ("audit", "ablate", "blocks", "compare", "prune"):
        assert {"tau", "device", "seed", "batch_size", "max_batches"} <= set(sig.parameters), name


# 17. library errors name the Python call, the command line names the command


def test_library_hints_name_python_calls_and_the_cli_names_commands(capsys, in_repo):
    model = _mlp()
    with pytest.raises(FitcliError) as e:
        fitcli.audit(model, [torch.randn(4, 6)], layers=["nope"], device="cpu")
    assert "fitcli.inspect(model)" in str(e.value) and "fitcli inspect" not in str(e.value)
    with pytest.raises(FitcliError) as e:
        fitcli.audit(model, [torch.randn(4, 6)], metrics=["act_meen"], device="cpu")
    assert "fitcli.metrics.available_metrics()" in str(e.value) and "fitcli metrics" not in str(e.value)
    from fitcli.cli import main

    with pytest.raises(SystemExit):
        main(["score", "sample_models/mlp.safetensors", "--arch", "sample_models/models.py:mlp",
              "--data", "sample_models/mlp_data.safetensors", "--layer", "nope", "--quiet"])
    err = capsys.readouterr().err
    assert "fitcli inspect" in err and "fitcli.inspect(" not in err
