"""Hidden (residual stream) channels as a unit kind, on tiny LLaMA and GPT-2 models built from
transformers configs: statistics against a hand computation over the normalisation outputs (hooks
here, loops over channels), exact ablation against a forward with the channel zeroed by hooks at
the embeddings and every attention and MLP output, the weights bitwise unchanged."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import fitcli

TOL = 1e-5


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                     bos_token_id=0, eos_token_id=0)).eval()
    with torch.no_grad():  # norm weights away from 1: a hidden channel's gain shows in its statistics
        for mod in m.modules():
            if type(mod).__name__ == "LlamaRMSNorm":
                mod.weight.uniform_(0.2, 2.0)
    norms = [mod for mod in m.modules() if type(mod).__name__ == "LlamaRMSNorm"]
    writes = [mod for layer in m.model.layers for mod in (layer.self_attn, layer.mlp)]
    return m, norms, [m.model.embed_tokens], writes


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=4, n_positions=32,
                                   bos_token_id=0, eos_token_id=0)).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.uniform_(0.2, 2.0)
                mod.bias.uniform_(-0.5, 0.5)
    norms = [mod for mod in m.modules() if isinstance(mod, torch.nn.LayerNorm)]
    writes = [mod for block in m.transformer.h for mod in (block.attn, block.mlp)]
    # the stream starts as the token embedding plus the position embedding: both are its embedding entries
    return m, norms, [m.transformer.wte, m.transformer.wpe], writes


MODELS = {"llama": _llama, "gpt2": _gpt2}


def _data():
    """Two batches; the first with padding at the end of two samples."""
    g = torch.Generator().manual_seed(5)
    out = []
    for b in range(2):
        ids = torch.randint(1, 50, (3, 7), generator=g)
        mask = torch.ones_like(ids)
        if b == 0:
            mask[0, 5:] = 0
            mask[2, 3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _lm_loss(out, b):
    """Per-sample next-token cross-entropy over the real targets (padding never a target)."""
    logits, target = out.logits[:, :-1], b["input_ids"][:, 1:]
    real = b["attention_mask"][:, 1:].bool()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return (ce.reshape(target.shape) * real).sum(1) / real.sum(1)


def _weights(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _unchanged(m, before):
    after = m.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _norm_outputs(m, norms, b):
    """Every norm's output (grads retained) and the per-sample losses of one forward."""
    outs = []

    def keep(_mod, _a, o):
        o.retain_grad()
        outs.append(o)

    hs = [n.register_forward_hook(keep) for n in norms]
    try:
        losses = _lm_loss(m(**b), b)
    finally:
        for h in hs:
            h.remove()
    losses.sum().backward()  # samples do not interact: the gradient at sample x is ∂L_x/∂y
    return outs


def _hand_stats(m, norms, data, width):
    """Per channel, by loops: Minitron's act_mean (mean |y| over the real tokens of each norm output,
    summed over the norms), the pooled variance, and taylor / taylor_delta summed over the norms."""
    abs_sum = torch.zeros(len(norms), width, dtype=torch.float64)
    vals: list[list[float]] = [[] for _ in range(width)]
    hg_abs = torch.zeros(len(norms), width, dtype=torch.float64)
    hg = torch.zeros(len(norms), width, dtype=torch.float64)
    tokens = samples = 0
    for b in data:
        outs = _norm_outputs(m, norms, b)
        real = b["attention_mask"].bool()
        tokens += int(real.sum())
        samples += real.shape[0]
        for li, y in enumerate(outs):
            yv, gv = y.detach().double(), y.grad.double()
            for c in range(width):
                for x in range(real.shape[0]):
                    h, g = yv[x, real[x], c], gv[x, real[x], c]
                    abs_sum[li, c] += h.abs().sum()
                    vals[c].extend(h.tolist())
                    hg_abs[li, c] += (h * g).sum().abs()
                    hg[li, c] += (h * g).sum()
    m.zero_grad(set_to_none=True)
    act_mean = (abs_sum / tokens).sum(0)
    act_var = torch.tensor([torch.tensor(v, dtype=torch.float64).var(unbiased=False) for v in vals])
    return {"act_mean": act_mean, "act_var": act_var, "taylor": (hg_abs / samples).sum(0),
            "taylor_delta": -(hg / samples).sum(0)}


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_hidden_layer_is_found_opt_in_and_named_hidden(arch, hook_free):
    from fitcli.data import Batch
    from fitcli.discovery import discover, kind_of_point

    m, norms, _, _ = MODELS[arch]()
    g = discover(m, example=Batch(args=(), kwargs=_data()[0]))
    lay = g.layer("hidden")
    assert lay.kind.name == "hidden" and lay.kind.opt_in and lay.units == 16
    assert len(lay.norms) == len(norms) == 5  # two per block and the final norm
    assert len(lay.writes) == 4  # an attention and an MLP per block
    assert kind_of_point(lay.point_kind) is lay.kind
    assert lay.kind.removal(lay) is not None
    default = fitcli.audit(m, _data(), metrics=["act_mean"], device="cpu")
    assert "hidden" not in [x.name for x in default.layers]  # opt-in: never audited by default
    hook_free(m)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_hidden_channel_statistics_equal_a_hand_computation_over_the_norm_outputs(arch):
    m, norms, _, _ = MODELS[arch]()
    data = _data()
    before = _weights(m)
    names = ["act_mean", "act_var", "taylor", "taylor_delta"]
    r = fitcli.audit(m, data, layers=["hidden"], metrics=names, loss="lm", device="cpu")
    _unchanged(m, before)
    lay = r.layer("hidden")
    hand = _hand_stats(m, norms, data, 16)
    for n in names:
        got = torch.as_tensor(lay.metrics[n], dtype=torch.float64)
        assert torch.allclose(got, hand[n], rtol=TOL, atol=1e-7), (n, got, hand[n])
    _unchanged(m, before)


def _zeroed_losses(m, embeds, writes, data, c):
    """Per-sample losses with channel c zeroed (c None: untouched) at every embedding output and
    every attention and MLP module's output."""
    def zero(_mod, _a, o):
        if c is None:
            return o
        if isinstance(o, tuple):
            return (o[0].index_fill(-1, torch.tensor([c]), 0.0), *o[1:])
        return o.index_fill(-1, torch.tensor([c]), 0.0)

    hs = [mod.register_forward_hook(zero) for mod in [*embeds, *writes]]
    try:
        with torch.no_grad():
            return torch.cat([_lm_loss(m(**b), b) for b in data]).double()
    finally:
        for h in hs:
            h.remove()


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_exact_hidden_channel_ablation_equals_zeroing_every_write_by_hooks(arch):
    m, _, embeds, writes = MODELS[arch]()
    data = _data()
    before = _weights(m)
    r = fitcli.ablate(m, data, layers=["hidden"], loss="lm", device="cpu", chunk_size=5)
    _unchanged(m, before)
    got = torch.as_tensor(r.layer("hidden").metrics["ablation"], dtype=torch.float64)
    base = _zeroed_losses(m, embeds, writes, data, None)
    for c in range(16):
        want = float((_zeroed_losses(m, embeds, writes, data, c) - base).mean())
        assert abs(float(got[c]) - want) <= TOL, (c, float(got[c]), want)
    assert float(got.abs().max()) > 1e-4  # the channels matter: the comparison is not of zeros
    _unchanged(m, before)


def test_hidden_channels_refuse_mean_ablation_with_the_setting_named():
    m, *_ = _llama()
    with pytest.raises(fitcli.UsageError, match="zeroing"):
        fitcli.ablate(m, _data(), layers=["hidden"], loss="lm", device="cpu", ablation_mode="mean")


def test_cli_ablate_layer_hidden_on_a_hugging_face_folder(tmp_path, run_cli):
    from safetensors.torch import save_file

    m, _, embeds, writes = _llama()
    m.save_pretrained(tmp_path / "hf")
    data = _data()[1:]  # one batch, no padding
    save_file({k: v.contiguous() for k, v in data[0].items()}, str(tmp_path / "tokens.safetensors"))
    res = run_cli(["ablate", tmp_path / "hf", "--data", tmp_path / "tokens.safetensors", "--layer", "hidden",
                   "--device", "cpu", "--quiet", "--format", "json"])
    assert res.code == 0, res.stderr
    lay = next(x for x in json.loads(res.stdout)["layers"] if x["name"] == "hidden")
    assert lay["activation_point_kind"] == "hidden"
    base = _zeroed_losses(m, embeds, writes, data, None)
    want = float((_zeroed_losses(m, embeds, writes, data, 3) - base).mean())
    assert abs(lay["metrics"]["ablation"][3] - want) <= TOL
    mean = run_cli(["ablate", tmp_path / "hf", "--data", tmp_path / "tokens.safetensors", "--layer", "hidden",
                    "--device", "cpu", "--quiet", "--mode", "mean"])
    assert mean.code == 2 and "--mode 'mean'" in mean.stderr and "Traceback" not in mean.stderr, mean.stderr


def test_tracker_reports_hidden_channels_as_the_hand_computation(tmp_path):
    """A training step tracked with ``layers=["hidden"]`` gives the same Minitron sums (the
    model's dropout is 0: a training-mode forward is the eval forward)."""
    m, norms, _, _ = _llama()
    data = _data()
    hand = _hand_stats(m, norms, data, 16)
    before = _weights(m)
    m.train()
    hist = tmp_path / "h.jsonl"
    with fitcli.Tracker(m, hist, layers=["hidden"], metrics=["act_mean", "taylor"], loss_reduction="sum") as tr:
        for b in data:
            _lm_loss(m(**b), b).sum().backward()
        tr.step()
    m.eval()
    _unchanged(m, before)
    got = json.loads(hist.read_text().splitlines()[0])["layers"]["hidden"]["metrics"]
    for n in ("act_mean", "taylor"):
        assert torch.allclose(torch.tensor(got[n], dtype=torch.float64), hand[n], rtol=TOL, atol=1e-7), n
