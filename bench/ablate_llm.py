"""Exact ablation at LLM scale: a LLaMA-shaped causal LM of the SmolLM2-135M configuration (the
model of ``bench/llm.py``, random seeded weights), all query heads of one middle layer and MLP
channels of the same layer, against the hook-and-rerun loop (one whole forward per unit, the unit's
slice zeroed by a pre-hook on the projection reading it), on the same batch in the same process.

Three ways, each timed over the ablation alone (the layers found beforehand, outside the timing):

- loop: the hook-and-rerun loop (the unablated forward, then one forward per unit);
- expansion: fitcli's former fallback for models torch.fx cannot trace (the whole input expanded
  per chunk of units: every block runs per chunk);
- block-prefix: the prefix shared at block granularity (the blocks before the unit's block run once
  per batch, the rest per chunk).

Times are CPU seconds of this process (``time.process_time``; one torch thread by default): on a
shared machine, wall time mostly measures the other jobs. Each gives ablations per CPU second and
its ratio to the loop; beside it, the bound the suffix sets:
1 / (the fraction of the model's multiply-adds per token in the unit's block, the blocks after it
and the head), what skipping the prefix alone can gain. Every fitcli value is checked against the
loop's (max relative difference printed: float32 model).

Usage: python bench/ablate_llm.py [--layer 15] [--batch-size 2] [--seq 64] [--mlp-units 32]
       [--threads 1] [--skip-expansion]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fitcli import ablation  # noqa: E402
from fitcli.data import Batch  # noqa: E402
from fitcli.discovery import discover  # noqa: E402
from fitcli.losses import lm  # noqa: E402


def llm_config() -> dict:
    spec = importlib.util.spec_from_file_location("bench_llm", Path(__file__).with_name("llm.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return dict(mod.CONFIG)


def suffix_bound(model: nn.Module, layer: int) -> tuple[float, float]:
    """(fraction of the Linear multiply-adds per token from block ``layer`` on, incl. the head; 1 / it)."""
    total = after = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            macs = m.in_features * m.out_features
            total += macs
            parts = name.split(".")
            if name.startswith("model.layers.") and int(parts[2]) >= layer or not name.startswith("model.layers."):
                after += macs
    return after / total, total / after


def loop(model, batch: Batch, proj: nn.Module, width: int, units: list[int]) -> tuple[torch.Tensor, float]:
    """The hook-and-rerun loop: per unit, a whole forward with its slice of ``proj``'s input zeroed."""
    with torch.no_grad():
        t0 = time.process_time()  # the unablated forward counted, as fitcli's is
        base = lm(model(**batch.kwargs), batch).double()
        out = []
        for u in units:
            def pre(mod, args, u=u):
                z = args[0].clone()
                z[..., u * width:(u + 1) * width] = 0
                return (z,)
            h = proj.register_forward_pre_hook(pre)
            try:
                out.append(float((lm(model(**batch.kwargs), batch).double() - base).mean()))
            finally:
                h.remove()
        return torch.tensor(out, dtype=torch.float64), time.process_time() - t0


def engine(graph, name: str, batch: Batch, units: list[int], expansion: bool) -> tuple[torch.Tensor, float, str]:
    saved = ablation.prefix_blocks
    if expansion:  # the former fallback: no blocks to share a prefix at
        ablation.prefix_blocks = lambda *a, **k: []
    try:
        t0 = time.process_time()
        r = ablation.ablate_layers(graph, [name], [batch], lm, units={name: units})
        dt = time.process_time() - t0
    finally:
        ablation.prefix_blocks = saved
    return r.delta(name)[units], dt, r.method[name]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--mlp-units", type=int, default=32, help="MLP channels ablated, evenly spaced (0: all 1536)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-expansion", action="store_true", help="leave out the former fallback's timing")
    args = ap.parse_args()
    import transformers

    torch.set_num_threads(args.threads)
    cfg = llm_config()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    model.config.use_cache = False
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg["vocab_size"], (args.batch_size, args.seq), generator=g)
    batch = Batch(args=(), kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    graph = discover(model, example=batch)
    frac, bound = suffix_bound(model, args.layer)
    blk = model.model.layers[args.layer]
    n_mlp = cfg["intermediate_size"]
    mlp_units = list(range(n_mlp)) if args.mlp_units <= 0 else \
        sorted({round(i * (n_mlp - 1) / max(args.mlp_units - 1, 1)) for i in range(args.mlp_units)})
    cases = [(f"model.layers.{args.layer}.self_attn.heads", blk.self_attn.o_proj, cfg["head_dim"],
              list(range(cfg["num_attention_heads"])), "heads"),
             (f"model.layers.{args.layer}.mlp.down_proj.input", blk.mlp.down_proj, 1, mlp_units, "MLP channels")]
    print(f"LLaMA-shaped (SmolLM2-135M config, random weights), {args.batch_size} x {args.seq} tokens, layer "
          f"{args.layer} of {cfg['num_hidden_layers']}, torch threads {args.threads}; suffix = {frac:.3f} of the "
          f"model's multiply-adds per token: bound {bound:.2f}x")
    for name, proj, width, units, what in cases:
        want, t_loop = loop(model, batch, proj, width, units)
        rows = [("loop", t_loop, "hook-and-rerun", want)]
        for expansion in ([True] if not args.skip_expansion else []) + [False]:
            got, dt, method = engine(graph, name, batch, units, expansion)
            rows.append(("expansion" if expansion else "block-prefix", dt, method, got))
        scale = float(want.abs().max())
        for label, dt, method, vals in rows:
            err = float((vals - want).abs().max()) / scale
            print(f"  {what:12s} ({len(units):4d}) {label:12s} {dt:7.1f} CPU s  {len(units) / dt:6.2f} abl/s  "
                  f"{t_loop / dt:5.2f}x the loop (bound {bound:.2f}x)  max rel diff {err:.1e}  [{method}]")


if __name__ == "__main__":
    main()
