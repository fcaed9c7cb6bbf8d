"""CSV: one row per (layer, unit), one column per metric."""

from __future__ import annotations

import csv
import io


def render_csv(report: dict) -> str:
    if report.get("command") == "blocks":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["block", "block_influence", "angular_distance", "ablation", "ablation_accuracy"])
        for r in report["blocks"]:
            w.writerow([r["name"], *("" if r.get(k) is None else repr(float(r[k]))
                                     for k in ("block_influence", "angular_distance", "ablation", "ablation_accuracy"))])
        return buf.getvalue()
    metrics = sorted({m for lay in report["layers"] for m in lay["metrics"]})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["layer", "unit", "dead", "nonfinite", *metrics])
    for lay in report["layers"]:
        dead, bad = set(lay["dead"]), set(lay["nonfinite"])
        for u in range(lay["units"]):
            vals = []
            for m in metrics:
                series = lay["metrics"].get(m)
                v = series[u] if series is not None and u < len(series) else None
                vals.append("" if v is None else repr(float(v)))
            w.writerow([lay["name"], u, int(u in dead), int(u in bad), *vals])
    return buf.getvalue()
