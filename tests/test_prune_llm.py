"""`fitcli prune` on Hugging Face transformers (fitcli.prune_hf): tiny LLaMA (grouped-query) and
GPT-2 folders saved with a WordLevel tokenizer. References are computed here by hand: the
original model's logits, next-token losses from torch's cross entropy, parameter counts of the
folder loaded back with stock ``from_pretrained``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

WORDS = [f"w{i}" for i in range(60)]
DEAD_MLP = [1, 6, 9, 14, 17, 22, 25, 30]  # 8 of 32 channels per block
DEAD_HEADS = [2, 4]  # one per key-value group (groups of 3)
HD = 8


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def randomise(model, seed=0, scale=0.15):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name.lower() and "weight" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def llama():
    cfg = LlamaConfig(vocab_size=62, hidden_size=48, intermediate_size=32, num_hidden_layers=3, num_attention_heads=6,
                      num_key_value_heads=2, head_dim=HD, max_position_embeddings=64, tie_word_embeddings=True,
                      pad_token_id=0)
    model = randomise(LlamaForCausalLM(cfg))
    with torch.no_grad():  # planted: dead MLP channels (gate rows 0: silu(0)·up = 0), heads writing nothing
        for b in model.model.layers:
            b.mlp.gate_proj.weight[DEAD_MLP] = 0
            for h in DEAD_HEADS:
                b.self_attn.o_proj.weight[:, h * HD:(h + 1) * HD] = 0
    return model


def gpt2():
    cfg = GPT2Config(vocab_size=62, n_embd=32, n_head=4, n_layer=3, n_inner=48, n_positions=64, pad_token_id=0,
                     bos_token_id=1, eos_token_id=1)
    return randomise(GPT2LMHeadModel(cfg))


def lines(seed, n=12, length=10):
    g = torch.Generator().manual_seed(seed)
    return "\n".join(" ".join(WORDS[int(i)] for i in torch.randint(0, 60, (length,), generator=g)) for _ in range(n)) + "\n"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune_llm")
    out = {"root": root}
    for name, make in (("llama", llama), ("gpt2", gpt2)):
        m = make()
        m.save_pretrained(root / name)
        tokenizer().save_pretrained(root / name)
        out[name] = m
    (root / "calib.txt").write_text(lines(1))
    (root / "eval.txt").write_text(lines(2))
    save_file({"input_ids": torch.randint(2, 62, (8, 12), generator=torch.Generator().manual_seed(3))},
              str(root / "ids.safetensors"))
    return out


def snapshot_dir(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def params(model):
    return sum(p.numel() for p in model.parameters())


def heldout_loss(model, text_path, tok):
    """Mean next-token cross entropy per real token over the file, by hand (one line at a time)."""
    tot, n = 0.0, 0
    for line in text_path.read_text().splitlines():
        ids = torch.tensor([tok(line)["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].double()
        tot += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        n += ids.shape[1] - 1
    return tot / n


def test_llama_planted_units_removed_folder_loads_and_matches(folders, run_cli, tmp_path):
    """Budget = 8 MLP channels per block and one query head per key-value group: the planted dead
    ones go, ridge compensation adds nothing, the folder loads with stock from_pretrained and its
    logits equal the original's (whose planted units are zero already)."""
    root, model = folders["root"], folders["llama"]
    src = root / "llama"
    before = snapshot_dir(src)
    mlp_step, head_step = 3 * (48 + 48 + 48), 3 * 2 * HD * (48 + 48)  # per channel of every block; per head of every group
    target = params(model) - 2 * 8 * mlp_step  # each kind's share: 8 channels, round(0.75) = 1 head per group
    assert round(8 * mlp_step / head_step) == 1
    out = tmp_path / "small"
    r = run_cli(["prune", str(src), "--text", str(root / "calib.txt"), "--eval-text", str(root / "eval.txt"),
                 "--kinds", "mlp,heads", "--target-params", str(target), "-o", str(out), "--format", "json", "-q"])
    assert r.code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["counts"] == {"mlp": 8, "heads": 1} and d["rank_by"] == "flap" and d["compensate"] == "ridge"
    assert snapshot_dir(src) == before  # the input folder untouched
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (24, 4, 2, 8)
    keep_mlp = [j for j in range(32) if j not in DEAD_MLP]
    keep_q = [c for h in range(6) if h not in DEAD_HEADS for c in range(h * HD, (h + 1) * HD)]
    for b0, b1 in zip(model.model.layers, loaded.model.layers, strict=True):
        assert torch.equal(b1.mlp.up_proj.weight, b0.mlp.up_proj.weight[keep_mlp])  # exactly the planted ones went
        assert torch.equal(b1.self_attn.q_proj.weight, b0.self_attn.q_proj.weight[keep_q])
        assert b1.self_attn.k_proj.out_features == 2 * HD  # every key-value head kept: 2 query heads per group
    ids = torch.randint(2, 62, (2, 14), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() < 1e-5
    assert d["parameters"] == {"before": params(model), "after": params(loaded)}
    assert params(loaded) == params(model) - 8 * mlp_step - head_step  # counts rounded: near the target, not at it
    tok = tokenizer()
    want = heldout_loss(model, root / "eval.txt", tok)
    assert d["heldout_loss"]["before"] == pytest.approx(want, rel=1e-6)
    assert d["heldout_loss"]["after"] == pytest.approx(want, rel=1e-5)
    assert d["heldout_perplexity"]["before"] == pytest.approx(math.exp(want), rel=1e-6)
    assert abs(d["calibration_loss"]["predicted_change"]) < 1e-6
    assert d["heldout_loss"]["random_after"] > want + 1e-3  # random removal hits live units
    assert set(d["lambda_choices"]) <= {"lambda=0", "mean", "none"}
    assert any("retraining or distillation" in n for n in d["notes"])


def test_llama_blocks_and_predicted_change(folders, run_cli, tmp_path):
    """A block goes; the predicted change (the original with hooks: block skipped, removed MLP
    inputs replaced by their ridge fit) equals the measured one; generation with a cache runs."""
    root = folders["root"]
    out = tmp_path / "small"
    r = run_cli(["prune", str(root / "llama"), "--text", str(root / "calib.txt"), "--kinds", "mlp,blocks",
                 "--budget", "40", "-o", str(out), "--format", "json", "-q"])
    assert r.code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["counts"]["blocks"] == 1 and d["counts"]["mlp"] > 0
    cl = d["calibration_loss"]
    assert cl["predicted_change"] == pytest.approx(cl["after"] - cl["before"], abs=1e-5)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.num_hidden_layers == 2 and d["parameters"]["after"] == params(loaded)
    x = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        cached = loaded.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False, pad_token_id=0)
        plain = loaded.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False,
                                use_cache=False, pad_token_id=0)
    assert torch.equal(cached, plain)


def test_gpt2_token_data_mlp_folder_loads(folders, run_cli, tmp_path):
    root, model = folders["root"], folders["gpt2"]
    out = tmp_path / "g"
    r = run_cli(["prune", str(root / "gpt2"), "--data", str(root / "ids.safetensors"), "--kinds", "mlp",
                 "--budget", "10", "--compensate", "mean", "--rank-by", "flap", "-o", str(out), "--format", "json", "-q"])
    assert r.code == 0, r.stderr
    d = json.loads(r.stdout)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    step = 3 * (32 + 1 + 32)  # c_fc column + bias, c_proj row, per block
    assert d["counts"]["mlp"] == round(0.10 * params(model) / step)
    assert loaded.config.n_inner == 48 - d["counts"]["mlp"] and params(loaded) == d["parameters"]["after"]
    assert d["compensate"] == "mean" and d["rank_by"] == "flap"
    assert loaded.transformer.h[0].mlp.c_proj.bias is not None


def test_table_output_names_what_it_did(folders, run_cli, tmp_path):
    root = folders["root"]
    r = run_cli(["prune", str(root / "llama"), "--text", str(root / "calib.txt"), "--eval-text", str(root / "eval.txt"),
                 "--kinds", "mlp", "--budget", "5", "-o", str(tmp_path / "t")])
    assert r.code == 0, r.stderr
    for word in ("parameters", "FLOPs per token", "held-out perplexity", "random (same counts)", "ranked by: flap",
                 "compensation: ridge (chosen on held-out calibration tokens"):
        assert word in r.stdout
    assert "retraining or distillation" in r.stderr


@pytest.mark.parametrize("args, code, msg", [
    (["--kinds", "mlp", "--budget", "0"], 2, "above 0 and below 100"),
    (["--kinds", "mlp", "--budget", "100"], 2, "above 0 and below 100"),
    (["--kinds", "mlp", "--budget", "150"], 2, "between 0 and 100"),
    (["--kinds", "mlp", "--target-params", "99999999"], 2, "below the model's"),
    (["--kinds", "mlp", "--budget", "0.01"], 2, "smaller than one step"),
    (["--kinds", "mlp,fins", "--budget", "10"], 2, "unknown kind 'fins'"),
    (["--kinds", "mlp", "--budget", "10", "--rank-by", "vibes"], 2, "unknown ranking"),
    (["--kinds", "mlp", "--budget", "10", "--compensate", "lsq"], 2, "unknown compensation"),
    (["--kinds", "mlp,heads", "--budget", "10", "--per-layer"], 2, "MLP channels only"),
    (["--kinds", "mlp"], 2, "give a budget"),
    (["--remove", "dead"], 2, "--remove is for"),
])
def test_bad_requests_exit_2_nothing_written(folders, run_cli, tmp_path, args, code, msg):
    root = folders["root"]
    out = tmp_path / "out"
    r = run_cli(["prune", str(root / "llama"), "--text", str(root / "calib.txt"), "-o", str(out), *args])
    assert r.code == code, r.stderr
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kinds, msg", [("heads", "no head_dim"), ("hidden", "cannot be removed exactly")])
def test_units_gpt2_cannot_lose_are_refused(folders, run_cli, tmp_path, kinds, msg):
    root = folders["root"]
    r = run_cli(["prune", str(root / "gpt2"), "--text", str(root / "calib.txt"), "--kinds", kinds, "--budget", "10",
                 "-o", str(tmp_path / "out")])
    assert r.code == 2 and msg in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_output_over_an_input_is_refused(folders, run_cli, tmp_path):
    root = folders["root"]
    before = {n: snapshot_dir(root / n) for n in ("llama", "gpt2")}
    calib = (root / "calib.txt").read_bytes()
    for out in (root / "llama", root / "calib.txt"):
        r = run_cli(["prune", str(root / "llama"), "--text", str(root / "calib.txt"), "--kinds", "mlp", "--budget", "10",
                     "-o", str(out)])
        assert r.code == 2 and "refusing to overwrite" in r.stderr or "not a folder" in r.stderr
    assert {n: snapshot_dir(root / n) for n in ("llama", "gpt2")} == before
    assert (root / "calib.txt").read_bytes() == calib


def test_per_layer_counts_write_pt2(folders, run_cli, tmp_path):
    """--per-layer: the planted dead channels all go (they rank last over every block), counts
    differ where the ranking says so; written as .pt2 + safetensors with the reason."""
    root, model = folders["root"], folders["llama"]
    out = tmp_path / "p"
    r = run_cli(["prune", str(root / "llama"), "--text", str(root / "calib.txt"), "--kinds", "mlp", "--budget", "5",
                 "--per-layer", "-o", str(out), "--format", "json", "-q"])
    assert r.code == 0, r.stderr
    d = json.loads(r.stdout)
    assert (tmp_path / "p.pt2").is_file() and (tmp_path / "p.safetensors").is_file()
    prog = torch.export.load(str(tmp_path / "p.pt2")).module()
    ids = torch.randint(2, 62, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = prog(input_ids=ids)["logits"]
        want = model(input_ids=ids).logits
    n = d["counts"]["mlp"] * 3
    if n <= 3 * len(DEAD_MLP):  # only dead channels removed: the function is unchanged
        assert (got - want).abs().max() < 1e-5


def test_folder_keeps_the_source_cache_setting_and_table_words(folders, run_cli, tmp_path):
    """The pruned folder generates with its key/value cache as the source did (fitcli audits without it),
    the FLOPs change is a whole number, and one unit per block is worded in the singular."""
    root = folders["root"]
    assert json.loads((root / "llama" / "config.json").read_text())["use_cache"] is True
    r = run_cli(["prune", str(root / "llama"), "--text", str(root / "calib.txt"), "--kinds", "mlp,heads",
                 "--budget", "20", "-o", str(tmp_path / "t")])
    assert r.code == 0, r.stderr
    assert json.loads((tmp_path / "t" / "config.json").read_text())["use_cache"] is True
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "t").config.use_cache is True
    row = next(line for line in r.stdout.splitlines() if line.startswith("FLOPs per token"))
    before, after, change = row.split()[3:6]
    assert change == f"{int(after.replace(',', '')) - int(before.replace(',', '')):+,}"
    assert "removed: " in r.stdout and "1 query head per key-value group" in r.stdout
    src = tmp_path / "nocache"  # a source that says use_cache false keeps it
    folders["llama"].save_pretrained(src)
    tokenizer().save_pretrained(src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "use_cache": False}))
    r = run_cli(["prune", str(src), "--text", str(root / "calib.txt"), "--kinds", "mlp", "--budget", "20",
                 "-o", str(tmp_path / "u")])
    assert r.code == 0, r.stderr
    assert json.loads((tmp_path / "u" / "config.json").read_text())["use_cache"] is False


def test_text_batches_of_16_unless_batch_size_says(folders, run_cli, tmp_path):
    """--text reads 16 samples per batch by default (64 x 128 tokens of a 135M causal LM in one
    batch take over 20 GB); --batch-size still sets it."""
    root = folders["root"]
    (tmp_path / "t.txt").write_text(lines(4, n=40))
    for extra, batches in (([], 3), (["--batch-size", "40"], 1), (["--batch-size", "7"], 6)):
        r = run_cli(["score", str(root / "llama"), "--text", str(tmp_path / "t.txt"), "--max-seq-len", "8",
                     "--kinds", "mlp", "--metric", "act_mean", "-o", str(tmp_path / "r.json"), "-q", *extra])
        assert r.code == 0, r.stderr
        assert json.loads((tmp_path / "r.json").read_text())["data"] == {
            "spec": str(tmp_path / "t.txt"), "samples": 40, "batches": batches}


@pytest.mark.parametrize("fmt, first", [("table", "fitcli ablate --blocks "), ("markdown", "## fitcli ablate --blocks: `")])
def test_block_table_names_the_command_that_made_it(folders, run_cli, fmt, first):
    """There is no `fitcli blocks` command: the block table's title names `fitcli ablate --blocks`."""
    root = folders["root"]
    r = run_cli(["ablate", str(root / "llama"), "--text", str(root / "calib.txt"), "--blocks", "--format", fmt, "-q"])
    assert r.code == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith(first + str(root / "llama"))


def test_api_prune_of_a_llama_without_a_budget_runs_the_graph_on_its_logits():
    """``fitcli.prune(llama, data)`` (dead units, the graph's path) on a LLaMA that keeps its KV
    cache: Torch-Pruning's graph is built on the logits (before: "'tuple' object has no attribute
    'grad_fn'"); a dead gated MLP channel is refused with the reason, the model is unchanged."""
    import copy

    import transformers

    import fitcli

    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, use_cache=True)).eval()
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight[:, 3] = 0
        m.model.layers[0].mlp.up_proj.weight[3] = 0
    before = copy.deepcopy(m.state_dict())
    data = [{"input_ids": torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(i))} for i in range(2)]
    r = fitcli.prune(m, data, device="cpu")
    assert r.removed == {}
    assert any("not supported" in x["reason"] for x in r.refused)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
