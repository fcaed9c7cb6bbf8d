"""Tracker overhead per training step on the sample CNN at every=1 (every step observed and one
record appended), against the same plain step, alternated in one process.

    python bench/tracker.py                       # batch 128 of the CNN's data, 7 rounds of 40 steps
    python bench/tracker.py --batch-size 512 --steps 20

Two identical copies of the model and optimizer train on the same batches; each round runs
``--steps`` plain steps on one copy, then ``--steps`` tracked steps on the other (the order
alternates between rounds). Prints the median time per step of each and the median ratio of
the rounds (target: at most 1.15x); ``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "sample_models"))
from models import cnn  # noqa: E402

from fitcli.tracker import Tracker  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40, help="steps per round and side")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--metric", action="append", default=None, help="tracked metric (repeatable) [default: the tracker's]")
    ap.add_argument("--threads", type=int, default=None, help="torch threads [default: torch's]")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    data = load_file(str(ROOT / "sample_models" / "cnn_data.safetensors"))
    x_all, y_all = data["inputs"], data["targets"]
    n = x_all.shape[0]
    batches = [(x_all[i % n: i % n + a.batch_size], y_all[i % n: i % n + a.batch_size])
               for i in range(0, a.steps * a.batch_size, a.batch_size)]
    batches = [(x, y) for x, y in batches if x.shape[0] == a.batch_size] or batches[:1]
    model = cnn()
    model.load_state_dict(load_file(str(ROOT / "sample_models" / "cnn.safetensors")))
    plain_m, tracked_m = model, copy.deepcopy(model)
    plain_o = torch.optim.Adam(plain_m.parameters(), lr=1e-4)
    tracked_o = torch.optim.Adam(tracked_m.parameters(), lr=1e-4)

    def run(m, opt, steps) -> float:
        t0 = time.perf_counter()
        for i in range(steps):
            x, y = batches[i % len(batches)]
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (time.perf_counter() - t0) / steps

    with tempfile.TemporaryDirectory() as tmp:
        hist = Path(tmp) / "history.jsonl"
        with Tracker(tracked_m, hist, every=a.every, optimizer=tracked_o, metrics=a.metric) as tracker:
            run(plain_m, plain_o, 5)  # warm-up (the tracker discovers its points on its first step)
            run(tracked_m, tracked_o, 5)
            plain, tracked, ratios = [], [], []
            for r in range(a.rounds):
                if r % 2 == 0:
                    p = run(plain_m, plain_o, a.steps)
                    t = run(tracked_m, tracked_o, a.steps)
                else:
                    t = run(tracked_m, tracked_o, a.steps)
                    p = run(plain_m, plain_o, a.steps)
                plain.append(p)
                tracked.append(t)
                ratios.append(t / p)
        records = sum(1 for _ in hist.open())
        metrics = sorted(tracker.classes)
    fig = {"model": "cnn", "batch_size": a.batch_size, "every": a.every, "steps_per_round": a.steps,
           "rounds": a.rounds, "metrics": metrics, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "plain_ms": 1e3 * statistics.median(plain), "tracked_ms": 1e3 * statistics.median(tracked),
           "ratio_median": statistics.median(ratios), "records_written": records}
    if a.json:
        Path(a.json).write_text(json.dumps(fig, indent=2) + "\n")
    print(f"plain step {fig['plain_ms']:.3f} ms, tracked step {fig['tracked_ms']:.3f} ms "
          f"(every={a.every}, batch {a.batch_size}, {len(metrics)} metrics, {records} records, "
          f"{fig['threads']} threads): "
          f"ratio {fig['ratio_median']:.3f}x (median of {a.rounds} rounds; target <= 1.15x)")


if __name__ == "__main__":
    main()
