"""Score benchmark.

1. Time: ``fitcli.audit`` with every default metric, divided by a plain forward+backward
   loop over the same data in the same process (goal: at most 2.0x).
2. Memory: peak RSS of a score run over 10x the batches, divided by the same run over 1x
   (goal: within 5%), each measured in a fresh subprocess.

Both run under the malloc settings the fitcli command gives its own process
(``fitcli.runtime.keep_freed_memory``); ``--malloc default`` measures glibc's defaults instead.

Usage: python bench/score.py [--model cnn|mlp|resnet18] [--batches 20] [--batch-size 128] [--repeat 7]
       [--malloc fitcli|default] [--threads N] [--no-memory]

``--model resnet18``: the ResNet-18 shape of bench/resnet.py on random 3x64x64 images
(``--batches 2 --batch-size 32``: 64 images).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fitcli.data import Batch, DataSource  # noqa: E402
from fitcli.loading import LoadedModel  # noqa: E402
from fitcli.runtime import keep_freed_memory  # noqa: E402


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 8 * 8, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class MLP(nn.Module):
    def __init__(self, width: int = 512):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(256, width), nn.Linear(width, width), nn.Linear(width, width)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(F.gelu(self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))))


def make(batches: int, batch_size: int, kind: str = "cnn"):
    torch.manual_seed(0)
    if kind == "resnet18":
        from resnet import resnet18

        model, shape = resnet18(10).eval(), (3, 64, 64)
    else:
        model = (CNN() if kind == "cnn" else MLP()).eval()
        shape = (3, 32, 32) if kind == "cnn" else (256,)

    def gen():
        g = torch.Generator().manual_seed(1)
        for _ in range(batches):
            yield Batch((torch.randn(batch_size, *shape, generator=g),), {},
                        torch.randint(0, 10, (batch_size,), generator=g))

    return model, DataSource("bench", gen, None)


CPU: list[float] = []  # the process CPU seconds of each timed call, beside its wall seconds


def plain_loop(model, data) -> float:
    t0, c0 = time.perf_counter(), time.process_time()
    for b in data:
        x = b.args[0]
        loss = F.cross_entropy(model(x), b.targets)
        torch.autograd.grad(loss, [p for p in model.parameters()])
    CPU.append(time.process_time() - c0)
    return time.perf_counter() - t0


def score_run(model, data) -> float:
    import fitcli

    t0, c0 = time.perf_counter(), time.process_time()
    fitcli.audit(LoadedModel("bench", "memory", "-", model.state_dict(), module=model), data, device="cpu")
    CPU.append(time.process_time() - c0)
    return time.perf_counter() - t0


def child(batches: int, batch_size: int, kind: str, malloc: str) -> None:
    if malloc == "fitcli":
        keep_freed_memory()
    model, data = make(batches, batch_size, kind)
    score_run(model, data)
    print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=7, help="back-to-back (plain, score) pairs timed")
    ap.add_argument("--model", choices=["cnn", "mlp", "resnet18"], default="cnn",
                    help="cnn: 2 conv + max-pool + 2 linear on 3x32x32; mlp: 3 hidden layers of 512; "
                         "resnet18: bench/resnet.py on 3x64x64")
    ap.add_argument("--threads", type=int, default=None, help="torch threads [default: torch's]")
    ap.add_argument("--no-memory", action="store_true", help="time only: skip the peak-RSS runs")
    ap.add_argument("--mem-batches", type=int, default=10, help="batches of the 1x memory run")
    ap.add_argument("--malloc", choices=["fitcli", "default"], default="fitcli",
                    help="fitcli: the malloc settings the fitcli command runs under (fitcli.runtime), for both "
                         "loops; default: glibc's own")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--json")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args.batches, args.batch_size, args.model, args.malloc)
        return
    # the same process settings as the fitcli command, for the plain loop and the score run alike
    tuned = args.malloc == "fitcli" and keep_freed_memory()
    model, data = make(args.batches, args.batch_size, args.model)
    plain_loop(model, data)  # warm-up
    score_run(model, data)
    # Back-to-back pairs, so that a slow spell of a shared machine hits both sides of a pair; the
    # figure is the median of the per-pair ratios (the ratio of the fastest runs is printed too).
    CPU.clear()
    pairs = [(plain_loop(model, data), score_run(model, data)) for _ in range(args.repeat)]
    # process CPU time: what other jobs on a shared machine disturb least (the cost with --threads 1)
    cpu_ratio = statistics.median(s / p for p, s in zip(CPU[0::2], CPU[1::2], strict=True))
    t_plain = min(p for p, _ in pairs)
    t_score = min(s for _, s in pairs)
    ratio = statistics.median(s / p for p, s in pairs)
    print(f"[{args.model}] plain forward+backward: {t_plain:.2f} s; fitcli score (all default metrics): {t_score:.2f} s "
          f"(fastest of {args.repeat}); ratio {ratio:.2f}x, median of {args.repeat} back-to-back pairs "
          f"(fastest/fastest {t_score / t_plain:.2f}x) (goal <= 2.0x); malloc: {'fitcli' if tuned else 'glibc default'}; "
          f"{torch.get_num_threads()} threads; CPU-time ratio {cpu_ratio:.2f}x (median)")
    if args.no_memory:
        return

    def rss(n: int) -> int:
        """Peak RSS of a fresh process scoring n batches: the least of three runs (allocator
        noise only ever adds)."""
        return min(rss_once(n) for _ in range(3))

    def rss_once(n: int) -> int:
        out = subprocess.run([sys.executable, __file__, "--child", "--batches", str(n), "--batch-size",
                              str(args.batch_size), "--model", args.model, "--malloc", args.malloc], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["maxrss_kb"]

    # the first ~10 batches warm up the allocator; 1x is therefore 10 batches and 10x is 100
    small = rss(args.mem_batches)
    big = rss(10 * args.mem_batches)
    growth = big / small - 1
    print(f"[{args.model}] peak RSS: {small / 1024:.0f} MiB over {args.mem_batches} batches, {big / 1024:.0f} MiB "
          f"over {10 * args.mem_batches} batches: {100 * growth:+.1f}% (goal within 5%)")
    figures = {"model": args.model, "plain_s": t_plain, "score_s": t_score, "ratio": ratio,
               "ratio_fastest": t_score / t_plain, "cpu_ratio": cpu_ratio, "pairs": [[p, s] for p, s in pairs], "rss_1x_kb": small, "rss_10x_kb": big,
               "rss_growth": growth, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "malloc": "fitcli" if tuned else "default"}
    if args.json:  # before printing: a closed stdout (| head) must not lose the file
        Path(args.json).write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
