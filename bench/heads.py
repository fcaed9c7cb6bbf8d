"""Exact ablation of every attention head of a 12-layer, 12-head transformer (BERT-base shape,
random init), against the loop people write: mask one head with a hook and rerun the whole model.

    python bench/heads.py                    # BERT-base shape: 12 x 12 heads, hidden 768, 256 tokens
    python bench/heads.py --layers 4 --hidden 256 --heads 8   # a quicker look

Prints the time of each, the ratio, and the largest difference between the two sets of loss
changes; ``--json FILE`` writes the figures (before the figures line is printed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fitcli  # noqa: E402
from fitcli.runtime import keep_freed_memory  # noqa: E402


class Attention(nn.Module):
    """timm-style attention: one qkv projection, heads split by a reshape, an output projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) * self.head_dim ** -0.5, dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Encoder(nn.Module):
    def __init__(self, layers: int, dim: int, heads: int, classes: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x).mean(1))


def loop(model: Encoder, x: torch.Tensor, y: torch.Tensor, heads: int) -> torch.Tensor:
    """The baseline: for every head, a pre-hook zeroes its slice of the projection's input and the
    whole model runs again."""
    out = torch.zeros(len(model.blocks), heads, dtype=torch.float64)
    with torch.no_grad():
        base = F.cross_entropy(model(x), y, reduction="none").double()
        for i, blk in enumerate(model.blocks):
            d = blk.attn.head_dim
            for h in range(heads):
                def pre(m, args, h=h, d=d):
                    z = args[0].clone()
                    z[..., h * d:(h + 1) * d] = 0
                    return (z,)
                hook = blk.attn.proj.register_forward_pre_hook(pre)
                try:
                    out[i, h] = (F.cross_entropy(model(x), y, reduction="none").double() - base).mean()
                finally:
                    hook.remove()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per sample (batch x tokens in all)")
    ap.add_argument("--json")
    args = ap.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    model = Encoder(args.layers, args.hidden, args.heads).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.tokens, args.hidden, generator=g)
    y = torch.randint(0, 4, (args.batch,), generator=g)
    fitcli.ablate(model, [(x, y)], layers=["blocks.0.attn.heads"], device="cpu", units=[0])  # warm-up
    t0 = time.perf_counter()
    report = fitcli.ablate(model, [(x, y)], layers=["*.heads"], device="cpu")
    t_fit = time.perf_counter() - t0
    got = torch.stack([report.layer(f"blocks.{i}.attn.heads").metrics["ablation"] for i in range(args.layers)])
    t0 = time.perf_counter()
    want = loop(model, x, y, args.heads)
    t_loop = time.perf_counter() - t0
    method = report.metric_info["ablation"]["method"]["blocks.0.attn.heads"]
    figures = {"layers": args.layers, "hidden": args.hidden, "heads": args.heads, "tokens": args.batch * args.tokens,
               "fitcli_s": t_fit, "loop_s": t_loop, "speedup": t_loop / t_fit,
               "max_abs_diff": float((got - want).abs().max()), "method": method,
               "threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    print(f"[heads] {args.layers} layers x {args.heads} heads, hidden {args.hidden}, {args.batch * args.tokens} tokens: "
          f"fitcli {t_fit:.2f} s ({method}), hook-and-rerun loop {t_loop:.2f} s: {t_loop / t_fit:.2f}x faster "
          f"(goal >= 3x); max |difference| {figures['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
