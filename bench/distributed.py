"""Distributed benchmark: the same audit in one process and in two gloo processes on this CPU.

A 4-layer MLP (width ``--width``) on ``--batches`` batches of ``--batch-size`` samples, every
default metric (two passes: entropy), then exact ablation of one layer (``--ablate-layer``):

1. one process, ``--threads`` intra-op threads (all the cores);
2. two ranks started with ``torch.multiprocessing`` (gloo, the CPU backend torchrun would use),
   ``--threads / 2`` threads each, the same data: batch i on rank i % 2.

Times are the audit alone: the processes are started, the model built and one small warm-up
audit run (fx tracing, first-call allocations) before the clock starts; a barrier starts and
stops it on both ranks; each side runs ``--repeat`` times and the fastest run counts (shared
machines are noisy). Prints the wall times, the ratio, and the max |difference| and max
relative difference between the two reports' metric values.
Usage: python bench/distributed.py [--width 512] [--batches 16] [--batch-size 256] [--threads 2] [--repeat 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fitcli  # noqa: E402


class MLP(nn.Module):
    def __init__(self, width: int, classes: int = 10):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        self.fc3, self.head = nn.Linear(width, width), nn.Linear(width, classes)

    def forward(self, x):
        return self.head(F.relu(self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))))


def setup(args) -> tuple[nn.Module, list]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = MLP(args.width)
    x = torch.randn(args.batches * args.batch_size, args.width, generator=g)
    y = torch.randint(0, 10, (x.shape[0],), generator=g)
    data = [(x[i : i + args.batch_size], y[i : i + args.batch_size]) for i in range(0, x.shape[0], args.batch_size)]
    return model, data


def run_audit(model, data, args, group=None) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    score = fitcli.audit(model, data, device="cpu", group=group).to_dict()
    t1 = time.perf_counter()
    ab = fitcli.ablate(model, data, layers=[args.ablate_layer], device="cpu", group=group).to_dict()
    t2 = time.perf_counter()
    return {"score": score, "ablate": ab}, {"score": t1 - t0, "ablate": t2 - t1}


def best_of(model, data, args, group=None, barrier=None) -> tuple[dict, dict, float]:
    """A warm-up on two batches, then ``--repeat`` timed runs: the fastest of each part."""
    run_audit(model, data[: min(2, len(data))], args, group)
    best: dict[str, float] = {}
    wall = float("inf")
    for _ in range(args.repeat):
        if barrier:
            barrier()
        t0 = time.perf_counter()
        reports, parts = run_audit(model, data, args, group)
        if barrier:
            barrier()
        wall = min(wall, time.perf_counter() - t0)
        best = {k: min(v, best.get(k, float("inf"))) for k, v in parts.items()}
    return reports, best, wall


def worker(rank: int, world: int, port: int, args, out: str) -> None:
    import torch.distributed as td

    torch.set_num_threads(max(1, args.threads // world))
    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, data = setup(args)
        reports, parts, wall = best_of(model, data, args, td.group.WORLD, td.barrier)
        if rank == 0:
            Path(out).write_text(json.dumps({"reports": reports, "wall": wall, "parts": parts}))
    finally:
        td.destroy_process_group()


def _values(report: dict) -> list[tuple[str, float]]:
    vals = []
    for lay in report["layers"]:
        for m, v in sorted(lay["metrics"].items()):
            vals += [(f"{lay['name']}.{m}[{i}]", x) for i, x in enumerate(v) if x is not None]
    return vals


def compare(a: dict, b: dict) -> tuple[float, float, bool]:
    va, vb = _values(a), _values(b)
    assert [k for k, _ in va] == [k for k, _ in vb], "the reports hold different values"
    diff = max((abs(x - y) for (_, x), (_, y) in zip(va, vb, strict=True)), default=0.0)
    rel = max((abs(x - y) / abs(x) for (_, x), (_, y) in zip(va, vb, strict=True) if abs(x) > 1e-12), default=0.0)
    same_dead = [lay["dead"] for lay in a["layers"]] == [lay["dead"] for lay in b["layers"]]
    return diff, rel, same_dead and a["data"] == b["data"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--ablate-layer", default="fc2")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    model, data = setup(args)
    single, single_parts, single_wall = best_of(model, data, args)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank0.json")
        mp.spawn(worker, args=(2, port, args, out), nprocs=2, join=True)
        got = json.loads(Path(out).read_text())

    rows = {}
    for kind in ("score", "ablate"):
        diff, rel, same = compare(single[kind], got["reports"][kind])
        rows[kind] = {"one_process_s": single_parts[kind], "two_ranks_s": got["parts"][kind],
                      "speedup": single_parts[kind] / got["parts"][kind], "max_abs_diff": diff,
                      "max_rel_diff": rel, "same_counts_and_dead": same}
    result = {"width": args.width, "batches": args.batches, "batch_size": args.batch_size, "threads": args.threads,
              "repeat": args.repeat,
              "one_process_s": single_wall, "two_ranks_s": got["wall"], "speedup": single_wall / got["wall"],
              "parts": rows}
    print(f"distributed audit: MLP width {args.width}, {args.batches} batches of {args.batch_size}, "
          f"{args.threads} threads in all, best of {args.repeat}")
    print(f"{'part':<8} {'1 process':>10} {'2 ranks':>9} {'speed-up':>9} {'max|diff|':>10} {'max rel':>9}  counts+dead")
    for kind, r in rows.items():
        print(f"{kind:<8} {r['one_process_s']:>9.2f}s {r['two_ranks_s']:>8.2f}s {r['speedup']:>8.2f}x "
              f"{r['max_abs_diff']:>10.2e} {r['max_rel_diff']:>9.2e}  {'equal' if r['same_counts_and_dead'] else 'DIFFER'}")
    print(f"{'total':<8} {single_wall:>9.2f}s {got['wall']:>8.2f}s {single_wall / got['wall']:>8.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
