"""Ablation benchmark: every unit of the second hidden layer of a 4x1024 MLP on 1024 samples,
three ways in one process:

1. the plain loop: zero the unit's weights in place, run the whole model, restore;
2. Captum's ``LayerFeatureAblation`` with ``perturbations_per_eval`` (benchmark-only dependency);
3. ``fitcli.ablate``.

Prints the times, the ratios, and the max difference between the results.
Usage: python bench/ablation.py [--width 1024] [--samples 1024] [--device cpu|cuda] [--skip-captum]
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

from fitcli.data import Batch, DataSource  # noqa: E402
from fitcli.loading import LoadedModel  # noqa: E402


class MLP(nn.Module):
    def __init__(self, width: int, classes: int = 10):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        self.fc3, self.fc4 = nn.Linear(width, width), nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = F.relu(self.fc3(x))
        x = F.relu(self.fc4(x))
        return self.head(x)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def inplace_loop(model, x, y, layer: nn.Linear) -> torch.Tensor:
    """The plain loop: zero weights, full forward, restore (mutates the model while it runs)."""
    out = torch.empty(layer.out_features, dtype=torch.float64)
    with torch.no_grad():
        base = F.cross_entropy(model(x), y).item()
        for i in range(layer.out_features):
            w, b = layer.weight[i].clone(), layer.bias[i].clone()
            layer.weight[i].zero_()
            layer.bias[i].zero_()
            out[i] = F.cross_entropy(model(x), y).item() - base
            layer.weight[i].copy_(w)
            layer.bias[i].copy_(b)
    return out


def captum_ablation(model, x, y, layer: nn.Module, per_eval: int) -> torch.Tensor:
    from captum.attr import LayerFeatureAblation

    def forward(inp):
        n = inp.shape[0]
        return F.cross_entropy(model(inp), y.repeat(n // y.shape[0]), reduction="none")

    # ablate the output of relu(fc2): hook the activation via a wrapper layer
    lfa = LayerFeatureAblation(forward, layer)
    with torch.no_grad():
        attr = lfa.attribute(x, layer_baselines=0.0, perturbations_per_eval=per_eval)  # [N, units]
    # captum: attribution = original − ablated, per example
    return (-attr.to(torch.float64)).mean(dim=0).cpu()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-captum", action="store_true")
    ap.add_argument("--skip-loop", action="store_true")
    ap.add_argument("--per-eval", type=int, default=16, help="Captum perturbations_per_eval")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = MLP(args.width).to(dev).eval()
    x = torch.randn(args.samples, args.width, device=dev)
    y = torch.randint(0, 10, (args.samples,), device=dev)
    figures: dict = {"device": str(dev), "width": args.width, "samples": args.samples,
                     "torch": torch.__version__, "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        figures["gpu"] = torch.cuda.get_device_name(dev)

    # the activation of fc2 is relu(fc2(x)); Captum hooks a module, so give it an identity after relu
    class Tap(nn.Module):
        def forward(self, t):
            return t

    tap = Tap()

    class Wrapped(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m, self.tap = m, tap

        def forward(self, t):
            m = self.m
            t = F.relu(m.fc1(t))
            t = self.tap(F.relu(m.fc2(t)))
            t = F.relu(m.fc3(t))
            t = F.relu(m.fc4(t))
            return m.head(t)

    ds = DataSource("bench", lambda: iter([Batch((x,), {}, y)]), None)
    loaded = LoadedModel("bench", "memory", "-", model.state_dict(), module=model, arch="bench MLP")
    import fitcli

    fitcli.ablate(loaded, ds, layers=["fc2"], device=str(dev), units=list(range(8)))  # warm-up
    sync(dev)
    t0 = time.perf_counter()
    rep = fitcli.ablate(loaded, ds, layers=["fc2"], device=str(dev)).to_dict()
    sync(dev)
    t_fit = time.perf_counter() - t0
    fit = torch.tensor(rep["layers"][0]["metrics"]["ablation"], dtype=torch.float64)
    figures["fitcli_s"] = t_fit
    figures["fitcli_method"] = rep["metric_info"]["ablation"]["method"]
    print(f"fitcli         {t_fit:8.2f} s   ({figures['fitcli_method']['fc2']})")

    if not args.skip_loop:
        t0 = time.perf_counter()
        ref = inplace_loop(model, x, y, model.fc2)
        sync(dev)
        t_loop = time.perf_counter() - t0
        figures.update(loop_s=t_loop, speedup_vs_loop=t_loop / t_fit, maxdiff_vs_loop=float((ref - fit).abs().max()))
        print(f"in-place loop  {t_loop:8.2f} s   fitcli is {t_loop / t_fit:5.1f}x faster; max |diff| {figures['maxdiff_vs_loop']:.2e}")
    if not args.skip_captum:
        try:
            import captum  # noqa: F401
        except ImportError:
            print("captum not installed (pip install 'fitcli[bench]'); skipping it")
        else:
            wrapped = Wrapped(model).eval()
            t0 = time.perf_counter()
            cap = captum_ablation(wrapped, x, y, tap, args.per_eval)
            sync(dev)
            t_cap = time.perf_counter() - t0
            figures.update(captum_s=t_cap, captum_per_eval=args.per_eval, speedup_vs_captum=t_cap / t_fit,
                           maxdiff_vs_captum=float((cap - fit).abs().max()))
            print(f"captum (ppe={args.per_eval}) {t_cap:8.2f} s   fitcli is {t_cap / t_fit:5.1f}x faster; "
                  f"max |diff| {figures['maxdiff_vs_captum']:.2e}")
    if dev.type == "cuda":
        # matmul work of the suffix actually needed: fc4 for every unit, on every sample
        flops = 2.0 * args.width * args.width * args.samples * args.width
        figures["achieved_tflops"] = flops / t_fit / 1e12
    if args.json:  # before printing: a closed stdout (| head) must not lose the file
        Path(args.json).write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
