"""Apoptosis: train the sample MLP and, every K steps, remove (or reinitialise, as ReDo does) the
least-fit units by a fitcli metric; compare with removing random units and with removing none.

    python examples/apoptosis.py                       # the table in the README
    python examples/apoptosis.py --metric taylor --every 100 --per-round 6 --seeds 3

The task is the sample MLP's (``sample_models/train.py``): 16 standard-normal inputs, 4 classes
from a fixed random teacher, 10 % label noise on the training set. Strategies:

- ``none``: plain training.
- ``fit``: every K steps, the ``--per-round`` least-fit hidden units (fc1 and fc2, ranked across
  layers by ``fitcli.audit(...).ranked(by=METRIC)`` on held-out data) are removed: their incoming
  weights and bias and their outgoing weights are zeroed and kept at zero.
- ``random``: as ``fit``, the same number of units, chosen at random among the live ones.
- ``redo``: ReDo (Sokar et al., 2023): the least-fit units are reinitialised instead (fresh
  incoming weights, zero outgoing weights, their optimizer moments reset); nothing is removed.

At the end every model goes through ``fitcli.prune(..., remove="dead")``, which physically
removes the units that are zero on the data (the removed ones, and any that died on their own),
so the parameter count is that of a model you could ship. Accuracy is on a held-out test set.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # fitcli from this checkout when it is not installed
sys.path.insert(0, str(ROOT / "sample_models"))

import models  # noqa: E402  (sample_models/models.py)

import fitcli  # noqa: E402
from fitcli.pruning import prune  # noqa: E402

PRIOR = torch.tensor([0.4, 0.0, -0.2, -0.4])
HIDDEN = (("fc1", "fc2"), ("fc2", "fc3"))  # (layer, the layer reading its units)
STRATEGIES = ("none", "fit", "random", "redo")


def make_task(seed: int, n_train: int = 2048, n_val: int = 512, n_test: int = 2048, noise: float = 0.1):
    """The sample MLP's teacher task (sample_models/train.py), with held-out val and test sets."""
    g = torch.Generator().manual_seed(1000 + seed)
    w1, w2 = torch.randn(16, 8, generator=g), torch.randn(8, 4, generator=g)
    n = n_train + n_val + n_test
    x = torch.randn(n, 16, generator=g)
    logits = F.relu(x @ w1) @ w2
    z = (logits - logits.mean(dim=0, keepdim=True)) / logits.std(dim=0, keepdim=True)
    y = (z + PRIOR).argmax(dim=1)
    flip = torch.rand(n_train, generator=g) < noise  # label noise on the training set only
    y[:n_train] = torch.where(flip, torch.randint(0, 4, (n_train,), generator=g), y[:n_train])
    a, b = n_train, n_train + n_val
    return (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


@torch.no_grad()
def apply_masks(model, removed: dict[str, set[int]]) -> None:
    """Removed units: incoming weights, bias and outgoing weights held at zero."""
    for layer, reader in HIDDEN:
        us = sorted(removed[layer])
        if us:
            getattr(model, layer).weight[us] = 0
            getattr(model, layer).bias[us] = 0
            getattr(model, reader).weight[:, us] = 0


@torch.no_grad()
def redo(model, opt, units: dict[str, list[int]], g: torch.Generator) -> None:
    """ReDo: fresh incoming weights (the layer's default init scale), zero outgoing weights, and
    the optimizer's moments of those entries reset."""
    for layer, reader in HIDDEN:
        us = units.get(layer, [])
        if not us:
            continue
        lin, nxt = getattr(model, layer), getattr(model, reader)
        bound = 1 / lin.weight.shape[1] ** 0.5
        lin.weight[us] = (torch.rand(len(us), lin.weight.shape[1], generator=g) * 2 - 1) * bound
        lin.bias[us] = 0
        nxt.weight[:, us] = 0
        for p, rows in ((lin.weight, (us, slice(None))), (lin.bias, (us,)), (nxt.weight, (slice(None), us))):
            state = opt.state.get(p, {})
            for k in ("exp_avg", "exp_avg_sq"):
                if k in state:
                    state[k][rows] = 0


def least_fit(model, val, metric: str, n: int, removed: dict[str, set[int]]) -> dict[str, list[int]]:
    """The n least-fit live hidden units by ``metric``, ranked across fc1 and fc2 by fitcli."""
    report = fitcli.audit(model, batches(*val), metrics=[metric], layers=[layer for layer, _ in HIDDEN])
    out: dict[str, list[int]] = {}
    for row in report.ranked(by=metric, top=None):
        if len(sum(out.values(), [])) >= n:
            break
        if row["unit"] not in removed.get(row["layer"], set()):
            out.setdefault(row["layer"], []).append(int(row["unit"]))
    return out


def random_units(n: int, removed: dict[str, set[int]], g: torch.Generator) -> dict[str, list[int]]:
    live = [(layer, u) for layer, _ in HIDDEN for u in range(32) if u not in removed[layer]]
    pick = torch.randperm(len(live), generator=g)[:n].tolist()
    out: dict[str, list[int]] = {}
    for i in pick:
        out.setdefault(live[i][0], []).append(live[i][1])
    return out


def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).double().mean())


def run(strategy: str, seed: int, args) -> dict:
    torch.manual_seed(seed)  # a script: its own global seed (the library never touches it)
    g = torch.Generator().manual_seed(seed)
    train, val, test = make_task(seed)
    model = models.mlp()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    removed: dict[str, set[int]] = {layer: set() for layer, _ in HIDDEN}
    x, y = train
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x), (args.batch,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        apply_masks(model, removed)
        if strategy == "none" or step % args.every or step == args.steps:
            continue
        if strategy == "random":
            chosen = random_units(args.per_round, removed, g)
        else:
            chosen = least_fit(model, val, args.metric, args.per_round, removed)
        if strategy == "redo":
            redo(model, opt, chosen, g)
        else:
            for layer, us in chosen.items():
                removed[layer].update(us)
            apply_masks(model, removed)
    model.eval()
    pruned = prune(model, batches(*val), remove="dead")  # physically drops the zeroed (and dead) units
    assert abs(pruned.loss_change) < 1e-5, pruned.loss_change
    return {"accuracy": accuracy(model, *test), "pruned_accuracy": accuracy(pruned.module, *test),
            "params": pruned.params_after, "params_before": pruned.params_before,
            "removed": sum(len(v) for v in pruned.removed.values())}


def table(results: dict[str, list[dict]], args) -> str:
    def ms(vals: list[float], pct: bool = False, dec: int = 0) -> str:
        k, dec = (100, 1) if pct else (1, dec)
        m = statistics.mean(vals) * k
        if len(vals) < 2:
            return f"{m:,.{dec}f}"
        return f"{m:,.{dec}f} ± {statistics.stdev(vals) * k:,.{dec}f}"

    lines = [f"| strategy ({args.metric}, every {args.every} steps, {args.per_round} units a round) "
             "| test accuracy % | parameters after `prune --remove dead` | hidden units removed |",
             "|---|---:|---:|---:|"]
    for s, rs in results.items():
        lines.append(f"| {s} | {ms([r['pruned_accuracy'] for r in rs], pct=True)} | {ms([r['params'] for r in rs])} "
                     f"| {ms([r['removed'] for r in rs], dec=1)} |")
    full = results[next(iter(results))][0]["params_before"]
    lines.append(f"\n{len(next(iter(results.values())))} seed(s), {args.steps} steps; the unpruned MLP has "
                 f"{full:,} parameters.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--metric", default="act_mean", help="fitcli metric ranking the units [act_mean]")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=100, help="K: steps between rounds")
    p.add_argument("--per-round", type=int, default=6, help="units removed (or reinitialised) a round")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads cost more than they give
    t0 = time.time()
    try:
        results = {s: [run(s, seed, args) for seed in range(args.seeds)] for s in args.strategies.split(",")}
    finally:
        torch.set_num_threads(threads)
    out = table(results, args)
    sys.stdout.write(out)
    sys.stderr.write(f"({time.time() - t0:.0f} s)\n")
    return out


if __name__ == "__main__":
    main()
