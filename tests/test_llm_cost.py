"""Causal LMs at scale: tied weights under ``--max-memory`` (a Hugging Face folder, and its
``model.safetensors`` with ``--arch``), weight gradients consumed as autograd produces them,
``--text`` on every command that takes data, Hugging Face's own output silenced, and the ``lm``
loss for a causal LM built with ``--arch``.

The models are tiny GPT-2 and LLaMA (grouped-query attention) models with tied embeddings, built
from transformers configs and saved as Hugging Face folders here; every audit is checked against
the in-memory audit and ``grad_norm`` of the (tied) head against plain torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fitcli
from fitcli.offload import offloaded

WORDS = "the a cat dog sat on mat ran to and big small red blue".split()
TEXT = "the cat sat on the mat\na big dog ran\nthe small red cat and the blue dog sat\nthe dog sat on a mat\n"
ARCH = '''import transformers


def build(folder):
    cfg = transformers.AutoConfig.from_pretrained(folder)
    return getattr(transformers, cfg.architectures[0])(cfg)
'''
TOL = 1e-5


def _model(kind: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=16,
                                          bos_token_id=0, eos_token_id=0)).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)).eval()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Per kind: the folder (weights, config, tokenizer), the model, the token file (8 x 12, two
    batches of 4) and the architecture file."""
    root = tmp_path_factory.mktemp("llm")
    (root / "arch.py").write_text(ARCH)
    ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(3))
    save_file({"input_ids": ids}, str(root / "ids.safetensors"))
    (root / "s.txt").write_text(TEXT)
    out = {"root": root, "ids": ids}
    for kind in ("gpt2", "llama"):
        m = _model(kind)
        assert m.lm_head.weight is m.get_input_embeddings().weight  # tied
        m.save_pretrained(root / kind)
        _tokenizer().save_pretrained(root / kind)
        out[kind] = m
    return out


def _cli_args(tiny, kind: str, how: str, cap: int | None) -> list[str]:
    root = tiny["root"]
    model = [str(root / kind)] if how == "folder" else [
        str(root / kind / "model.safetensors"), "--arch", f"{root / 'arch.py'}:build",
        "--arch-kwargs", json.dumps({"folder": str(root / kind)})]
    args = ["score", *model, "--data", str(root / "ids.safetensors"), "--batch-size", "4", "--device", "cpu",
            "--format", "json", "-q", "--kinds", "mlp,rows"]  # every layer but the heads
    return args + (["--max-memory", str(cap)] if cap else [])


def _head_grad_norm(model, ids: torch.Tensor, batch: int) -> torch.Tensor:
    """grad_norm of the head by hand: per batch ‖∂L_batch/∂W_head[i]‖ (the batch-mean next-token
    cross-entropy, the tied weight's whole gradient), averaged over the batches."""
    total = torch.zeros(model.lm_head.weight.shape[0], dtype=torch.float64)
    n = 0
    for i in range(0, ids.shape[0], batch):
        x = ids[i : i + batch]
        loss = model(input_ids=x, labels=x).loss  # equal-length samples: the mean over every token
        (g,) = torch.autograd.grad(loss, [model.lm_head.weight])
        total += g.double().norm(dim=1)
        n += 1
    return total / n


def _block_bytes(model) -> int:
    blocks = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    return sum(p.numel() * p.element_size() for p in blocks[0].parameters())


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_max_memory_on_the_folder_and_on_its_safetensors_equal_the_in_memory_audit(tiny, run_cli, kind):
    """A tied head stored once: --max-memory on the folder and on model.safetensors with --arch
    both run (tie kept) and equal the in-memory audit on every layer, the head included; the head's
    grad_norm equals plain torch; the resident weights stay under the cap, which is below the
    model's weight bytes (the offload really releases blocks)."""
    model = tiny[kind]
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    cap = int(1.3 * _block_bytes(model)) + model.lm_head.weight.numel() * 4
    assert cap < total
    reports = {}
    for how in ("folder", "arch"):
        for c in (None, cap):
            res = run_cli(_cli_args(tiny, kind, how, c))
            assert res.code == 0, res.stderr
            reports[how, c] = json.loads(res.stdout)
    ref = reports["folder", None]
    names = [lay["name"] for lay in ref["layers"]]
    assert "lm_head" in names
    head = torch.tensor(ref["layers"][names.index("lm_head")]["metrics"]["grad_norm"], dtype=torch.float64)
    assert torch.allclose(head, _head_grad_norm(model, tiny["ids"], 4), rtol=1e-5, atol=1e-8)
    for key, rep in reports.items():
        assert rep["settings"]["loss"] == "lm", key  # --arch builds a causal LM: the lm loss, as its folder
        assert not [s for s in rep["skipped"] if s["metric"] in ("grad_norm", "taylor")], key
        assert [lay["name"] for lay in rep["layers"]] == names, key
        if key[1] is not None:  # blocks checkpointed (no key/value cache) and recomputed in the backward
            assert 0 < rep["offload"]["high_water"] <= cap and rep["offload"]["recomputed"] > 0, key
        for la, lb in zip(ref["layers"], rep["layers"], strict=True):
            assert set(la["metrics"]) == set(lb["metrics"]), (key, la["name"])
            for metric, vals in la["metrics"].items():
                for x, y in zip(vals, lb["metrics"][metric], strict=True):
                    assert (x is None) == (y is None), (key, la["name"], metric)
                    assert x is None or abs(x - y) <= TOL * max(1.0, abs(x)), (key, la["name"], metric, x, y)


class LiveGrads:
    """Weak references to every weight gradient autograd hands the weights' hooks: how many are
    still alive each time a new one arrives (a hook registered before the audit's runs first)."""

    def __init__(self, model):
        self.refs: list[weakref.ref] = []
        self.peak = 0
        self.handles = [p.register_hook(self.hook) for p in model.parameters() if p.requires_grad]

    def hook(self, g):
        self.refs.append(weakref.ref(g))
        self.peak = max(self.peak, sum(r() is not None for r in self.refs))

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_weight_gradients_are_consumed_one_at_a_time(tiny, kind, tmp_path):
    """grad_norm reads every layer's weight gradient, yet at most one (and the one arriving) is
    alive at any moment of the backward, in memory and under the cap; the user's .grad stays None
    and the values equal plain torch."""
    model = tiny[kind]
    ids = tiny["ids"]
    data = [{"input_ids": ids[:4]}, {"input_ids": ids[4:]}]
    live = LiveGrads(model)
    try:
        rep = fitcli.audit(model, data, metrics=["grad_norm"], device="cpu", kinds=["mlp", "rows"])
        in_memory = live.peak
        live.peak, live.refs = 0, []
        with offloaded(model, max_bytes=10**6, source=tiny["root"] / kind / "model.safetensors"):
            capped = fitcli.audit(model, data, metrics=["grad_norm"], device="cpu", kinds=["mlp", "rows"])
    finally:
        live.close()
    owners = [lay for lay in rep.layers if "grad_norm" in lay.metrics]
    assert len(owners) > 8  # many layers' weight gradients went through the hooks
    assert len(live.refs) >= len(owners)  # each batch: every audited weight's gradient, under the cap too
    assert in_memory <= 2 and live.peak <= 2, (in_memory, live.peak)
    assert all(p.grad is None for p in model.parameters())
    head = torch.as_tensor(rep.layer("lm_head").metrics["grad_norm"], dtype=torch.float64)
    assert torch.allclose(head, _head_grad_norm(model, ids, 4), rtol=1e-5, atol=1e-8)
    for la in owners:
        got = torch.as_tensor(capped.layer(la.name).metrics["grad_norm"], dtype=torch.float64)
        assert torch.allclose(torch.as_tensor(la.metrics["grad_norm"], dtype=torch.float64), got, rtol=TOL, atol=1e-9)


def _tokens(max_len: int, batch: int = 16) -> list[dict]:
    """The text file's batches, tokenised here with the folder's tokenizer (right padding)."""
    tok = _tokenizer()
    lines = [s for s in TEXT.splitlines() if s.strip()]
    enc = tok(lines, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return [{"input_ids": enc["input_ids"][i : i + batch], "attention_mask": enc["attention_mask"][i : i + batch]}
            for i in range(0, len(lines), batch)]


def _same_batches(got, want) -> None:
    got = list(got)
    assert len(got) == len(want)
    for b, w in zip(got, want, strict=True):
        assert torch.equal(b.kwargs["input_ids"], w["input_ids"])
        assert torch.equal(b.kwargs["attention_mask"], w["attention_mask"])


def test_text_on_inspect_prune_and_compare(tiny, run_cli, monkeypatch, tmp_path):
    """--text FILE --max-seq-len N reaches inspect, prune and compare as the batches the folder's
    tokenizer makes of the file (each command's library call sees exactly those)."""
    import fitcli.api
    import fitcli.comparison
    import fitcli.pruning

    folder, text = str(tiny["root"] / "llama"), str(tiny["root"] / "s.txt")
    seen: dict[str, object] = {}
    real_inspect = fitcli.api.inspect

    def spy_inspect(loaded, data=None):
        seen["inspect"] = data
        return real_inspect(loaded, data)

    def spy_prune(loaded, data, **kw):
        seen["prune"] = data
        raise fitcli.errors.InputError("stop here")

    def spy_compare(base, new, data=None, **kw):
        seen["compare"] = data
        raise fitcli.errors.InputError("stop here")

    monkeypatch.setattr(fitcli.api, "inspect", spy_inspect)
    import fitcli.prune_hf

    monkeypatch.setattr(fitcli.prune_hf, "prune_transformer", spy_prune)  # a Hugging Face folder's prune
    monkeypatch.setattr(fitcli.comparison, "compare", spy_compare)
    res = run_cli(["inspect", folder, "--text", text, "--max-seq-len", "5", "--format", "json"])
    assert res.code == 0, res.stderr
    assert json.loads(res.stdout)["discovery"]["method"] == "runtime"  # run on the text's tokens
    _same_batches(seen["inspect"], _tokens(5))
    res = run_cli(["prune", folder, "--text", text, "--max-seq-len", "6", "--batch-size", "2", "--budget", "10",
                   "-o", str(tmp_path / "p"), "-q"])
    assert res.code == 3 and "stop here" in res.stderr
    _same_batches(seen["prune"], _tokens(6, batch=2))
    res = run_cli(["compare", folder, folder, "--text", text, "-q"])
    assert res.code == 3 and "stop here" in res.stderr
    _same_batches(seen["compare"], _tokens(128))


def test_text_without_a_tokenizer_or_a_folder(tiny, run_cli, tmp_path):
    """--text with a folder that has no tokenizer: exit 3 saying so; with a single file (no
    tokenizer to be had): exit 2; never 'needs --data'."""
    bare = tmp_path / "bare"
    tiny["gpt2"].save_pretrained(bare)
    text = str(tiny["root"] / "s.txt")
    for cmd in (["inspect", str(bare)], ["prune", str(bare), "-o", str(tmp_path / "p")],
                ["compare", str(bare), str(bare)], ["score", str(bare)]):
        res = run_cli([*cmd, "--text", text, "-q"])
        assert res.code == 3 and "no tokenizer" in res.stderr, (cmd, res.stderr)
    res = run_cli(["prune", str(bare / "model.safetensors"), "--text", text, "-o", str(tmp_path / "p"), "-q"])
    assert res.code == 2 and "--text needs a Hugging Face model folder" in res.stderr, res.stderr


def test_hugging_face_output_silenced_unless_verbose(tiny):
    """transformers' "Loading weights" bar and its warnings do not reach stderr (with or without
    --quiet); with --verbose they do."""
    root = tiny["root"]
    args = [sys.executable, "-m", "fitcli", "inspect", str(root / "gpt2"), "--format", "json"]
    env = {k: v for k, v in __import__("os").environ.items()
           if not k.startswith(("HF_HUB_DISABLE", "TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY"))}
    env["PYTHONPATH"] = str(Path(fitcli.__file__).resolve().parents[1])
    quiet = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert "Loading weights" not in quiet.stderr and "it/s" not in quiet.stderr
    loud = subprocess.run([*args, "--verbose"], capture_output=True, text=True, env=env, timeout=300)
    assert loud.returncode == 0, loud.stderr
    assert "Loading weights" in loud.stderr  # the check above would have seen it


def test_lm_loss_per_sample_with_padding_and_no_logits_copy():
    """The lm loss per sample equals a loop of plain cross-entropies over each sample's real tokens,
    and it makes no copy of the logits: the only tensor of their size it allocates is the
    cross-entropy's own log-softmax."""
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    from fitcli.data import Batch
    from fitcli.losses import lm

    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    ids = torch.randint(0, 11, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 1:] = 0  # one real token: nothing to predict

    class Big(TorchDispatchMode):
        made = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.numel() == logits.numel() and out.data_ptr() != logits.data_ptr():
                Big.made += 1
            return out

    with Big():
        got = lm(logits, Batch((), {"input_ids": ids, "attention_mask": mask}))
    want = [F.cross_entropy(logits[i, : int(mask[i].sum()) - 1], ids[i, 1 : int(mask[i].sum())]).item()
            if mask[i].sum() > 1 else 0.0 for i in range(3)]
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)
    assert Big.made == 1  # log_softmax; no sliced or reshaped copy


def test_block_influence_is_read_from_the_audits_own_forward(monkeypatch):
    """Block Influence and angular distance come from the audit's forward (hooks on the blocks), not
    from a second pass over the data: with the separate pass disabled the values are still there,
    equal to a hand computation of 1 - cos(block input, block output) per token, and the model
    runs as many forwards as an audit without the blocks."""
    from fitcli import residual

    def no_second_pass(*a, **k):
        raise AssertionError("a second pass over the data for Block Influence")

    monkeypatch.setattr(residual, "influence", no_second_pass)
    model = _model("llama").eval()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 64, (4, 8), generator=g)} for _ in range(3)]
    calls = []
    h = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        fitcli.audit(model, data, device="cpu", kinds=["heads", "mlp"])
        without = len(calls)
        report = fitcli.audit(model, data, device="cpu")  # heads, MLP channels and blocks
    finally:
        h.remove()
    assert len(calls) - without == without  # the blocks add no forward
    blocks = {b.name: b for b in report.blocks}
    assert set(blocks) == {"model.layers.0", "model.layers.1"}
    mods = dict(model.named_modules())
    for n, row in blocks.items():
        seen = []
        hs = [mods[n].register_forward_pre_hook(
                  lambda m, a, kw, seen=seen: seen.append(["in", (a[0] if a else kw["hidden_states"])]), with_kwargs=True),
              mods[n].register_forward_hook(
                  lambda m, a, o, seen=seen: seen[-1].append(o[0] if isinstance(o, tuple) else o))]
        try:
            with torch.no_grad():
                for b in data:
                    model(**b)
        finally:
            for x in hs:
                x.remove()
        cos = []
        for _, x, y in seen:
            x, y = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
            cos += [float(x[i] @ y[i] / (x[i].norm() * y[i].norm())) for i in range(x.shape[0])]
        assert row.block_influence == pytest.approx(sum(1 - c for c in cos) / len(cos), rel=1e-6)
