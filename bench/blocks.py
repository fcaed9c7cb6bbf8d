"""Greedy block removal (the layer-removal curve) on a 12-block transformer of BERT-base shape
(random init), against the loop people write: for every step and every remaining block, replace
it (and the blocks already removed) by the identity with a hook and rerun the whole model.

    python bench/blocks.py                         # 12 blocks, hidden 768, 256 tokens, 4 steps
    python bench/blocks.py --layers 6 --hidden 256 --steps 3   # a quicker look

Prints both times, the ratio, whether both removed the same blocks in the same order, and the
largest difference between the two curves' losses; ``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from heads import Encoder  # noqa: E402  (the same BERT-base-shaped model as the heads benchmark)

import fitcli  # noqa: E402
from fitcli.runtime import keep_freed_memory  # noqa: E402


def loop(model: Encoder, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[tuple[int, float]]:
    """The baseline: identity hooks on the removed blocks and the candidate, whole model rerun;
    each step removes the block whose removal changes the current loss least (as fitcli does)."""
    def loss() -> float:
        return float(F.cross_entropy(model(x), y, reduction="none").double().mean())

    skip = lambda m, args, out: args[0]  # noqa: E731  the block's output is its input
    removed: list[int] = []
    curve: list[tuple[int, float]] = []
    with torch.no_grad():
        current = loss()
        for _ in range(steps):
            best = None
            for i in range(len(model.blocks)):
                if i in removed:
                    continue
                hooks = [model.blocks[j].register_forward_hook(skip) for j in [*removed, i]]
                try:
                    value = loss()
                finally:
                    for h in hooks:
                        h.remove()
                if best is None or abs(value - current) < abs(best[1] - current):
                    best = (i, value)
            removed.append(best[0])
            curve.append(best)
            current = best[1]
    return curve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per sample (batch x tokens in all)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json")
    args = ap.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    model = Encoder(args.layers, args.hidden, args.heads).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.tokens, args.hidden, generator=g)
    y = torch.randint(0, 4, (args.batch,), generator=g)
    fitcli.blocks(model, [(x[:1], y[:1])], device="cpu")  # warm-up
    t0 = time.perf_counter()
    report = fitcli.blocks(model, [(x, y)], greedy=args.steps, device="cpu")
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    want = loop(model, x, y, args.steps)
    t_loop = time.perf_counter() - t0
    got = [(int(c["removed"].rsplit(".", 1)[1]), c["loss"]) for c in report["greedy"]]
    same = [a for a, _ in got] == [a for a, _ in want]
    diff = max(abs(a[1] - b[1]) for a, b in zip(got, want, strict=True))
    figures = {"layers": args.layers, "hidden": args.hidden, "tokens": args.batch * args.tokens, "steps": args.steps,
               "fitcli_s": t_fit, "loop_s": t_loop, "speedup": t_loop / t_fit, "same_order": same,
               "max_abs_diff": diff, "removed": [a for a, _ in got], "threads": torch.get_num_threads(),
               "torch": torch.__version__}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    print(f"[blocks] greedy removal of {args.steps} of {args.layers} blocks, hidden {args.hidden}, "
          f"{args.batch * args.tokens} tokens: fitcli {t_fit:.2f} s (with Block Influence and the first full "
          f"measurement), hook-and-rerun loop {t_loop:.2f} s: {t_loop / t_fit:.2f}x faster; same blocks in the "
          f"same order: {same}; max |loss difference| {diff:.2e}")


if __name__ == "__main__":
    main()
