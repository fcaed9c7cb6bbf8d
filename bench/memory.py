"""Memory benchmark: peak resident memory of ``fitcli score`` on a ResNet-style CNN against a
plain forward+backward at the same batch (goal: at most 1.3x; per-sample gradient buffers freed
as soon as their statistics are taken).

Each figure is the peak RSS (``ru_maxrss``) of a fresh child process, the least of ``--runs``
runs (allocator noise only adds):

- plain: for each batch, a forward, the per-sample cross-entropy summed, and
  ``torch.autograd.grad`` w.r.t. every parameter (a training step without the optimizer);
- score: ``fitcli.audit(model, batches, device="cpu")`` with the default metrics (all but the
  opt-in ablation).

Each child also reports its RSS before the loop (after imports, model and data), the baseline the
increase is taken over. The headline is the ratio of the peaks (score / plain); the ratio of the
increases over the baselines is printed too. Both children run under the malloc settings the
fitcli command gives its own process (``fitcli.runtime.keep_freed_memory``); ``--malloc default``
measures glibc's defaults instead, and ``--malloc live`` makes RSS follow the live bytes (big
blocks mmapped and returned on free: no allocator noise, for checking a fix). When the ratio is above the goal (or with ``--breakdown``),
fitcli runs again with subsets of the metrics, to show where the extra memory goes.

Usage: python bench/memory.py [--blocks 3] [--size 32] [--batch-size 32] [--batches 4] [--runs 3]
       [--malloc fitcli|default|live] [--breakdown | --no-breakdown] [--breakdown-runs 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fitcli.runtime import keep_freed_memory  # noqa: E402

GOAL = 1.3
CLASSES = 10

# metric subsets of the breakdown (``None``: fitcli's defaults); "all" is the score run itself
SUBSETS: dict[str, list[str] | None] = {
    "act_mean": ["act_mean"],
    "act_mean+taylor": ["act_mean", "taylor"],
    "all but act_entropy": "all-but-entropy",  # type: ignore[dict-item]  # resolved in the child
}

# --malloc live: big blocks come straight from mmap and go back on free, so RSS follows the bytes
# actually alive (deterministic to ~1 MiB; the malloc settings of the fitcli command are not used)
LIVE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


class BasicBlock(nn.Module):
    """ResNet's basic block: conv-bn-relu-conv-bn, plus the identity (or a 1x1 conv-bn
    downsample when the shape changes), then relu."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet(nn.Module):
    """Stem conv-bn-relu (64 channels), ``blocks`` basic blocks (64, 128, 256, 512 channels; the
    width doubles and the map halves from the second on), adaptive average pool, linear head."""

    def __init__(self, blocks: int = 3, classes: int = CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths = [64, 128, 256, 512][:blocks]
        layers, cin = [], 64
        for i, w in enumerate(widths):
            layers.append(BasicBlock(cin, w, 1 if i == 0 else 2))
            cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def make(blocks: int, size: int, batch_size: int, batches: int):
    torch.manual_seed(0)
    model = ResNet(blocks).eval()
    with torch.no_grad():  # random but non-trivial BatchNorm statistics, as a trained model has
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(batch_size, 3, size, size, generator=g), torch.randint(0, CLASSES, (batch_size,), generator=g))
            for _ in range(batches)]
    return model, data


def plain_loop(model, data) -> None:
    params = [p for p in model.parameters()]
    for x, y in data:
        loss = F.cross_entropy(model(x), y, reduction="none").sum()
        torch.autograd.grad(loss, params)


def score_run(model, data, metrics: list[str] | None) -> None:
    import fitcli

    fitcli.audit(model, data, metrics=metrics, device="cpu")


def rss_now_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def child(args) -> None:
    if args.malloc == "fitcli":
        keep_freed_memory()
    import fitcli  # noqa: F401  # both children import the same modules before the baseline
    from fitcli.metrics.registry import default_metrics

    model, data = make(args.blocks, args.size, args.batch_size, args.batches)
    metrics = None
    if args.child == "score" and args.metrics:
        if args.metrics == "all-but-entropy":
            metrics = [m for m in default_metrics() if m != "act_entropy"]
        else:
            metrics = args.metrics.split(",")
    base_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    base_now = rss_now_kb()
    t0 = time.perf_counter()
    if args.child == "plain":
        plain_loop(model, data)
    else:
        score_run(model, data, metrics)
    seconds = time.perf_counter() - t0
    print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "baseline_kb": base_peak,
                      "baseline_now_kb": base_now, "seconds": seconds}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=3, choices=[2, 3, 4], help="basic blocks (64, 128, 256, 512 channels)")
    ap.add_argument("--size", type=int, default=32, choices=[32, 64], help="input 3 x size x size")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=4,
                    help="batches per child (the peaks of 2, 4 and 8 batches agree to 2 MiB with --malloc live)")
    ap.add_argument("--runs", type=int, default=3, help="fresh processes per figure; the least peak is kept")
    ap.add_argument("--malloc", choices=["fitcli", "default", "live"], default="fitcli",
                    help="fitcli: the malloc settings the fitcli command runs under (fitcli.runtime), for both "
                         "loops; default: glibc's own; live: RSS follows the live bytes (diagnosis)")
    bd = ap.add_mutually_exclusive_group()
    bd.add_argument("--breakdown", dest="breakdown", action="store_true", default=None,
                    help="always measure the metric subsets (default: only when the ratio is above the goal)")
    bd.add_argument("--no-breakdown", dest="breakdown", action="store_false")
    ap.add_argument("--breakdown-runs", type=int, default=2, help="fresh processes per metric subset")
    ap.add_argument("--child", choices=["plain", "score"])
    ap.add_argument("--metrics", help="(child) comma-separated metrics of the score run, or all-but-entropy")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    common = ["--blocks", str(args.blocks), "--size", str(args.size), "--batch-size", str(args.batch_size),
              "--batches", str(args.batches), "--malloc", args.malloc]

    def once(kind: str, metrics: str | None = None) -> dict:
        cmd = [sys.executable, __file__, "--child", kind, *common] + (["--metrics", metrics] if metrics else [])
        env = {**os.environ, **LIVE_ENV} if args.malloc == "live" else None
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            sys.exit(f"[memory] child {kind} {metrics or ''} failed:\n{out.stderr}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def summary(runs: list[dict]) -> dict:
        """The least peak of the runs (fresh processes), and the least baseline (each a minimum
        over the same runs: allocator noise only adds)."""
        return {"peak_kb": min(r["maxrss_kb"] for r in runs), "baseline_kb": min(r["baseline_kb"] for r in runs),
                "baseline_now_kb": min(r["baseline_now_kb"] for r in runs),
                "seconds": min(r["seconds"] for r in runs), "peaks_kb": [r["maxrss_kb"] for r in runs]}

    def mib(kb: float) -> str:
        return f"{kb / 1024:.0f}"

    # alternate the two kinds, so that a change of the machine's state hits both
    plain_runs, score_runs = [], []
    for _ in range(args.runs):
        plain_runs.append(once("plain"))
        score_runs.append(once("score"))

    plain, score = summary(plain_runs), summary(score_runs)
    inc_p = plain["peak_kb"] - plain["baseline_kb"]
    inc_s = score["peak_kb"] - score["baseline_kb"]
    ratio = score["peak_kb"] / plain["peak_kb"]
    inc_ratio = inc_s / inc_p if inc_p > 0 else float("inf")
    name = f"resnet{args.blocks} {args.size}x{args.size}"

    breakdown: dict[str, dict] = {}
    want = args.breakdown if args.breakdown is not None else ratio > GOAL
    if want:
        for label, subset in SUBSETS.items():
            m = subset if isinstance(subset, str) else ",".join(subset)
            breakdown[label] = summary([once("score", m) for _ in range(args.breakdown_runs)])
        breakdown["all (default metrics)"] = score
        breakdown["plain fwd+bwd"] = plain

    figures = {"model": name, "blocks": args.blocks, "size": args.size, "batch_size": args.batch_size,
               "batches": args.batches, "runs": args.runs, "plain": plain, "score": score,
               "ratio": ratio, "increase_ratio": inc_ratio, "goal": GOAL, "goal_met": ratio <= GOAL,
               "breakdown": breakdown, "breakdown_runs": args.breakdown_runs, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "malloc": args.malloc}
    if args.json:  # before printing: a closed stdout (| head) must not lose the file
        Path(args.json).write_text(json.dumps(figures, indent=2))
    print(f"[memory] {name} batch {args.batch_size}: plain fwd+bwd peak {mib(plain['peak_kb'])} MiB "
          f"(+{mib(inc_p)} over baseline {mib(plain['baseline_kb'])}), fitcli score peak {mib(score['peak_kb'])} MiB "
          f"(+{mib(inc_s)} over baseline {mib(score['baseline_kb'])}); ratio {ratio:.2f}x (goal <= {GOAL}x: "
          f"{'met' if ratio <= GOAL else 'NOT met'}); increase ratio {inc_ratio:.2f}x "
          f"(least of {args.runs} fresh processes each; malloc: {args.malloc})")
    if breakdown:
        print(f"[memory] where the memory goes: fitcli.audit with subsets of the metrics (least of {args.breakdown_runs} "
              f"fresh processes each; the last two rows are the runs above)")
    for label, r in breakdown.items():
        print(f"[memory]   {label:24s} peak {mib(r['peak_kb']):>5} MiB (+{mib(r['peak_kb'] - r['baseline_kb'])} "
              f"over baseline), {r['peak_kb'] / plain['peak_kb']:.2f}x plain")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
