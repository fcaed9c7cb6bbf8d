"""Size of the HTML report for a ResNet-50-sized model (about 26.5k units), against the 5 MB limit.

Builds a synthetic report with ResNet-50's 53 convolutions (64..2048 channels) and its final
layer, five metrics per unit with values spanning decades, planted dead units and a
``--validate``-style validation of 32 units per layer; renders it with ``--format html``'s
renderer; prints the file size, its ratio to 5 MB and the time to render. With Chromium on the
machine it also loads the page headless (network cut off) and prints the load times: the first
screen (charts drawn as they scroll into view) and every chart at once.

    python bench/html_size.py [--out build/html/resnet50.html] [--json FILE] [--no-browser]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fitcli.render.html import browser_check, find_chromium, render_html  # noqa: E402

LIMIT = 5 * 1024 * 1024
METRICS = {"taylor": True, "act_mean": True, "weight_norm": True, "apoz": False, "dormant": True}


def resnet50_layers() -> list[tuple[str, int]]:
    layers = [("conv1", 64)]
    for stage, (blocks, width) in enumerate([(3, 64), (4, 128), (6, 256), (3, 512)], start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            layers += [(f"{p}.conv1", width), (f"{p}.conv2", width), (f"{p}.conv3", 4 * width)]
            if b == 0:
                layers.append((f"{p}.downsample.0", 4 * width))
    return layers


def synthetic_report(seed: int = 0) -> dict:
    rng = random.Random(seed)
    layers, ranked_pool = [], []
    for name, units in resnet50_layers():
        dead = sorted(rng.sample(range(units), k=units // 50))
        vals = {}
        for m in METRICS:
            scale = 10 ** rng.uniform(-3, 1)
            xs = [scale * math.exp(rng.gauss(0, 2.0)) for _ in range(units)]
            if m == "apoz":
                xs = [min(1.0, rng.random()) for _ in range(units)]
            for u in dead:
                xs[u] = 1.0 if m == "apoz" else 0.0
            vals[m] = xs
        agg = {m: {"mean": sum(v) / len(v), "max": max(v), "min": min(v), "var": 0.0} for m, v in vals.items()}
        layers.append({"name": name, "type": "Conv2d", "units": units, "activation_point": f"relu({name})",
                       "activation_point_kind": "function", "activation_chain": name, "final": False,
                       "metrics": vals, "aggregate": agg, "nonfinite": [], "dead": dead,
                       "dead_fraction": len(dead) / units})
        ranked_pool += [(name, u) for u in dead]
    fc = {m: [rng.random() for _ in range(1000)] for m in METRICS}
    layers.append({"name": "fc", "type": "Linear", "units": 1000, "activation_point": "fc",
                   "activation_point_kind": "output", "activation_chain": "fc", "final": True, "metrics": fc,
                   "aggregate": {}, "nonfinite": [], "dead": [], "dead_fraction": 0.0})
    units = sum(lay["units"] for lay in layers if not lay["final"])
    dead = sum(len(lay["dead"]) for lay in layers)
    corr = {"spearman": 0.8, "kendall": 0.6, "bottom10_overlap": 0.7, "units": 32}
    vlayers = {}
    for lay in layers[:-1]:
        idx = sorted(rng.sample(range(lay["units"]), k=32))
        vlayers[lay["name"]] = {"units": idx, "metrics": {m: corr for m in METRICS if m != "dormant"}, "best": "taylor",
                                "ablation": [abs(lay["metrics"]["taylor"][u]) * rng.uniform(0.5, 2) for u in idx]}
    return {
        "schema": "fitcli.report/1", "tool": {"name": "fitcli", "version": "bench"}, "created": "2026-11-30T00:00:00Z",
        "command": "score",
        "model": {"path": "resnet50.safetensors", "format": "safetensors", "sha256": "0" * 64, "arch": "torchvision.models:resnet50"},
        "data": {"spec": "imagenet_val_512.safetensors", "samples": 512, "batches": 8},
        "settings": {"tau": 0.0, "seed": 0, "ablation_mode": "zero", "model_mode": "eval", "metrics": sorted(METRICS),
                     "rank_by": "taylor", "loss": "cross_entropy", "device": "cpu"},
        "discovery": {"method": "fx", "notes": []}, "layers": layers,
        "summary": {"layers": len(layers), "units": units, "dead": dead, "dead_fraction": dead / units,
                    "dead_known": True, "nonfinite_loss_batches": 0},
        "ranked": [], "skipped": [], "unsupported": [],
        "metric_info": {m: {"higher_is_better": h, "rank_priority": 2 if m == "taylor" else (1 if m == "act_mean" else 0)}
                        for m, h in METRICS.items()},
        "validation": {"oracle": "|ablation| (zero mode, exact)", "seed": 0, "layers": vlayers,
                       "across_layers": {m: corr for m in METRICS if m != "dormant"}, "best": "taylor",
                       "recommendation": "for this model, rank by taylor: Spearman 0.80 with exact ablation across layers"},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="build/html/resnet50.html")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-browser", action="store_true")
    a = ap.parse_args()
    report = synthetic_report()
    t0 = time.perf_counter()
    page = render_html(report)
    render_s = time.perf_counter() - t0
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    size = out.stat().st_size
    units = report["summary"]["units"] + sum(lay["units"] for lay in report["layers"] if lay["final"])
    fig = {"layers": len(report["layers"]), "units": units, "bytes": size, "mb": round(size / 2**20, 2),
           "ratio_to_5mb": round(size / LIMIT, 3), "render_s": round(render_s, 2)}
    browser = None if a.no_browser else find_chromium()
    if browser:
        for key, frag in (("first_screen", ""), ("all_charts", "all")):
            t0 = time.perf_counter()
            r = browser_check(str(out), browser, fragment=frag, size=(1280, 900), budget_ms=30000, timeout=180)
            fig[f"{key}_s"] = round(time.perf_counter() - t0, 2)
            fig[f"{key}_drawn"] = f"{r['rendered']}/{r['charts']}"
            fig[f"{key}_errors"] = len(r["errors"]) + len(r["warnings"])
    if a.json:
        Path(a.json).write_text(json.dumps(fig, indent=2) + "\n")
    print(f"HTML report, ResNet-50-sized ({fig['layers']} layers, {units} units): {fig['mb']} MB "
          f"({size} bytes), {100 * fig['ratio_to_5mb']:.0f}% of the 5 MB limit; rendered in {fig['render_s']} s")
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
