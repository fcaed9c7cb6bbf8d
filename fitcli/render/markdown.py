"""Markdown: a summary line, the per-layer table and the ranked table (CI job summaries)."""

from __future__ import annotations

from fitcli.render._common import (
    KIND_TITLES,
    ablation_counts,
    ablation_rows,
    by_kind,
    coverage_line,
    fmt,
    key_metrics,
    kind_validation_rows,
    pct,
)


def _ablate_markdown(report: dict) -> str:
    """An ablate report: units removable, per-layer loss and accuracy changes, the units of
    smallest |Δloss| (exact changes share one scale), the removable units by layer."""
    rem, tot = ablation_counts(report)
    mode = report["settings"].get("ablation_mode", "zero")
    lines = [f"## fitcli ablate: `{report['model']['path']}`", "",
             f"**{rem} of {tot} ablated units removable** (|Δloss| ≤ 1e-6, {mode} mode); data "
             f"`{report['data']['spec']}`, {report['data']['samples']} samples.", "", coverage_line(report) + ".", "",
             "| layer | type | units ablated | removable | mean Δloss | whole layer Δloss | whole layer Δaccuracy |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for lay in report["layers"]:
        done = [v for v in lay["metrics"].get("ablation") or [] if v is not None]
        whole, acc = lay.get("layer_ablation"), lay.get("layer_ablation_accuracy")
        lines.append(f"| {lay['name']} | {lay['type']} | {len(done)} | {len(lay.get('removable') or [])} | "
                     f"{fmt(sum(done) / len(done)) if done else ''} | {'' if whole is None else fmt(whole)} | "
                     f"{'' if acc is None else fmt(acc)} |")
    ranked = ablation_rows(report)
    if ranked:
        lines += ["", f"Units by |Δloss| when ablated, smallest first ({len(ranked)} shown):", "",
                  "| # | layer | unit | Δloss | Δaccuracy |", "|---:|---|---:|---:|---:|"]
        lines += [f"| {i} | {r['layer']} | {r['unit']} | {fmt(r['value'])} | "
                  f"{'' if r['accuracy_change'] is None else fmt(r['accuracy_change'])} |" for i, r in enumerate(ranked, 1)]
    removable = [(lay["name"], lay["removable"]) for lay in report["layers"] if lay.get("removable")]
    if removable:
        lines += ["", "Removable units (|Δloss| ≤ 1e-6):", ""]
        lines += [f"- `{name}`: {', '.join(map(str, units))}" for name, units in removable]
    return "\n".join(lines) + "\n"


def _blocks_markdown(report: dict) -> str:
    lines = [f"## fitcli ablate --blocks: `{report['model']['path']}`", "", "Blocks by |Δloss| when removed, smallest first:", "",
             "| block | block influence | angular distance | Δloss removed |",
             "|---|---:|---:|---:|"]
    for r in sorted(report["blocks"], key=lambda r: (r["ablation"] is None, abs(r["ablation"] or 0.0), r["name"])):
        lines.append(f"| {r['name']} | {fmt(r.get('block_influence'))} | {fmt(r.get('angular_distance'))} | {fmt(r['ablation'])} |")
    if report.get("greedy"):
        lines += ["", "| step | removed | loss | Δloss | Block Influence would remove |", "|---:|---|---:|---:|---|"]
        lines += [f"| {r['step']} | {r['removed']} | {fmt(r['loss'])} | {fmt(r['delta_loss'])} | {r.get('block_influence_pick') or ''} |"
                  for r in report["greedy"]]
    return "\n".join(lines) + "\n"


def _validation_markdown(v: dict) -> list[str]:
    """Metric x layer Spearman with exact ablation, the best per layer in bold."""
    lines: list[str] = []
    layers = list(v["layers"])
    lines += ["", f"Validation (Spearman with {v['oracle']}):", "",
              "| metric | " + " | ".join(layers) + " | across layers |", "|---|" + "---:|" * (len(layers) + 1)]
    for m in sorted(v["across_layers"]):
        cells = []
        for name in layers:
            c = v["layers"][name]["metrics"].get(m)
            x = c["spearman"] if c else None
            s = "n/a" if x is None else f"{x:+.2f}"
            cells.append(f"**{s}**" if v["layers"][name].get("best") == m else s)
        a = v["across_layers"][m]["spearman"]
        sa = "n/a" if a is None else f"{a:+.2f}"
        cells.append(f"**{sa}**" if v.get("best") == m else sa)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", v["recommendation"]]
    return lines


def _kind_validation_markdown(v: dict) -> list[str]:
    """Per unit kind: metric x kind Spearman with exact ablation (blocks: each block removed)."""
    kinds, rows = kind_validation_rows(v)
    if not kinds:
        return []
    lines = ["", "Validation per unit kind (Spearman with exact ablation; blocks: each block removed):", "",
             "| metric | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for r in rows:
        cells = []
        for k in kinds:
            rho, best = r["cells"].get(k, (None, False))
            s = ("n/a" if rho is None else f"{rho:+.2f}") if k in r["cells"] else ""
            cells.append(f"**{s}**" if best else s)
        lines.append(f"| {r['metric']} | " + " | ".join(cells) + " |")
    if not v["layers"]:
        lines += ["", v["recommendation"]]
    return lines


def render_markdown(report: dict) -> str:
    if report.get("command") == "blocks":
        return _blocks_markdown(report)
    if report.get("command") == "ablate":
        return _ablate_markdown(report)
    s = report["summary"]
    keys = key_metrics(report)
    lines = [
        f"## fitcli {report.get('command', 'score')}: `{report['model']['path']}`",
        "",
        f"**{s['dead']} of {s['units']} units dead ({pct(s['dead_fraction'])})** across {s['layers']} layers "
        f"(τ = {report['settings']['tau']:g}, final layer excluded); data `{report['data']['spec']}`, "
        f"{report['data']['samples']} samples.",
        "",
        coverage_line(report) + ".",
    ]
    lines[3:3] = [f"- {KIND_TITLES.get(k, k)}: {c['dead']} of {c['units']} dead ({pct(c['dead_fraction'])})"
                  for k, c in (s.get("kinds") or {}).items()]  # dead counts per unit kind
    missing = (report.get("coverage") or {}).get("not_audited") or []
    if missing:
        lines += ["", "<details><summary>Not audited</summary>", "", "| module | type | parameters | reason |",
                  "|---|---|---:|---|"]
        lines += [f"| {x['name']} | {x['type']} | {x['parameters']:,} | {x['reason']} |" for x in missing]
        lines += ["", "</details>"]
    g = report.get("gate")
    if g:
        lines.append("")
        lines.append("Gate: **passed**" if g["passed"] else "Gate: **FAILED** — " + "; ".join(g["failures"]))
    lines += ["", "| layer | type | units | dead | dead % | activation point | " + " | ".join(f"{k} (mean)" for k in keys) + " |",
              "|---|---|---:|---:|---:|---|" + "---:|" * len(keys)]
    for lay in report["layers"]:
        aggs = [fmt(lay["aggregate"].get(k, {}).get("mean")) if k in lay["aggregate"] else "" for k in keys]
        dead = "final" if lay.get("final") else str(len(lay["dead"]))
        lines.append(f"| {lay['name']} | {lay['type']} | {lay['units']} | {dead} | "
                     f"{'' if lay.get('final') else pct(lay['dead_fraction'])} | {lay['activation_point']} | "
                     + " | ".join(aggs) + " |")
    rb = report["settings"].get("rank_by")
    for kind, ranked in by_kind(report.get("ranked") or []):
        what = f"Least-fit {KIND_TITLES.get(kind, kind)}" if kind else "Least-fit units"
        lines += ["", f"{what} by `{rb}` (per-layer ℓ2-normalised):", "",
                  "| # | layer | unit | value | normalised | dead |", "|---:|---|---:|---:|---:|---|"]
        for i, r in enumerate(ranked, 1):
            lines.append(f"| {i} | {r['layer']} | {r['unit']} | {fmt(r['value'])} | {fmt(r['normalized'])} | {'yes' if r.get('dead') else ''} |")
    if report.get("blocks") and report.get("command") != "blocks":
        lines += ["", "Blocks by Block Influence, lowest first:", "", "| block | block influence | angular distance |",
                  "|---|---:|---:|"]
        for r in sorted(report["blocks"], key=lambda r: (r.get("block_influence") is None,
                                                         r.get("block_influence") or 0.0, r["name"])):
            lines.append(f"| {r['name']} | {fmt(r.get('block_influence'))} | {fmt(r.get('angular_distance'))} |")
    if report.get("validation"):
        lines += _validation_markdown(report["validation"]) if report["validation"]["layers"] else []
        lines += _kind_validation_markdown(report["validation"])
    if report.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"`{x['metric']}` ({x['reason']})" for x in report["skipped"])]
    return "\n".join(lines) + "\n"
