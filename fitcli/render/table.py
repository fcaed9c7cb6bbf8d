"""The terminal view (Rich): summary, per-layer table, ranked least-fit units."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from fitcli.render._common import (
    KIND_TITLES,
    ablation_counts,
    ablation_rows,
    by_kind,
    common_prefix,
    coverage_line,
    fmt,
    key_metrics,
    kind_validation_rows,
    name_widths,
    not_audited_groups,
    not_audited_text,
    pct,
    strip_prefix,
    wrap_name,
)


def _name_table(columns: list[tuple[str, str]], rows: list[list], names: list[int], width: int | None) -> Table:
    """A table whose name columns (indices ``names``) are wrapped at their dots to fit ``width``,
    never cut; the other columns keep their widths (they are short: numbers, types)."""
    cells = [[str(c) if not isinstance(c, Text) else c.plain for c in r] for r in rows]
    def longest(i: int) -> int:
        return max([len(columns[i][0])] + [max((len(x) for x in r[i].splitlines()), default=0) for r in cells])
    fixed = [longest(i) for i in range(len(columns)) if i not in names]
    widths = name_widths(width, fixed, [longest(i) for i in names])
    t = Table(show_edge=False)
    for i, (col, just) in enumerate(columns):
        t.add_column(col, justify=just, overflow="fold", no_wrap=i not in names)
    for r, plain in zip(rows, cells, strict=True):
        out = list(r)
        for k, i in enumerate(names):
            style = r[i].style if isinstance(r[i], Text) else ""
            out[i] = Text(wrap_name(plain[i], widths[k] if widths else None), style=style)
        t.add_row(*out)
    return t


def _prefix_note(prefix: str) -> list:
    return [Text(f"layer names below start with {prefix!r}", style="dim")] if prefix else []


def _header(report: dict) -> Text:
    s = report["summary"]
    head = Text()
    head.append(f"fitcli {report.get('command', 'score')} ", style="bold")
    head.append(f"{report['model']['path']} ({report['model']['format']}")
    head.append(f", arch {report['model']['arch']})" if report["model"].get("arch") else ")")
    head.append(f"\ndata {report['data']['spec']}: {report['data']['samples']} samples in {report['data']['batches']} batches; "
                f"device {report['settings']['device']}; points by {report.get('discovery', {}).get('method', '?')}\n")
    if report.get("command") == "ablate":
        rem, tot = ablation_counts(report)
        head.append(f"{rem} of {tot} ablated units removable (|Δloss| ≤ 1e-6)", style="bold")
    elif s.get("dead_known", True):
        style = "bold red" if s["dead"] else "bold green"
        head.append(f"{s['dead']} of {s['units']} units dead ({pct(s['dead_fraction'])})", style=style)
        head.append(f" across {s['layers']} layers, τ = {report['settings']['tau']:g}, final layer excluded")
        for k, c in (s.get("kinds") or {}).items():
            head.append(f"\n  {KIND_TITLES.get(k, k)}: {c['dead']} of {c['units']} dead ({pct(c['dead_fraction'])})")
    else:
        head.append("dead units unknown: needs activations (pass --arch and --data)", style="yellow")
    head.append("\n")
    head.append(coverage_line(report), style="yellow" if not (report.get("coverage") or {}).get("units") else None)
    return head


def _layers_table(report: dict, width: int | None = None) -> list:
    """The per-layer table, names without the prefix all share (said once above it)."""
    dead_known = report["summary"].get("dead_known", True)
    keys = key_metrics(report)
    prefix = common_prefix([lay["name"] for lay in report["layers"]])
    while True:  # metric columns that do not fit the width leave the table (the JSON report has them)
        columns = [("layer", "left"), ("type", "left"), ("units", "right"), ("dead", "right"), ("dead %", "right"),
                   ("activation point", "left")] + [(f"{k} mean", "right") for k in keys]
        fixed = [9 + len(k) for k in keys] + [10, 5, 5, 6]
        longest = [max((len(strip_prefix(x, prefix)) for x in names), default=0) for names in (
            [lay["name"] for lay in report["layers"]],
            [lay.get("activation_chain") or lay["activation_point"] for lay in report["layers"]])]
        fit = name_widths(width, fixed, longest)
        if not keys or not width or (fit is not None and (fit == longest or len(keys) == 1)):
            break
        keys = keys[:-1]
    rows = []
    for lay in report["layers"]:
        cells = []
        for k in keys:
            agg = lay["aggregate"].get(k)
            cells.append(fmt(agg["mean"]) if agg else "")
        dead = "final" if lay.get("final") else (str(len(lay["dead"])) if dead_known else "-")
        style = "red" if lay["dead"] else ""
        nf = f" [{len(lay['nonfinite'])} non-finite]" if lay["nonfinite"] else ""
        point = strip_prefix(lay.get("activation_chain") or lay["activation_point"], prefix)
        rows.append([Text(strip_prefix(lay["name"], prefix), style=style), Text(lay["type"], style=style),
                     str(lay["units"]), dead + nf,
                     "" if lay.get("final") or not dead_known else pct(lay["dead_fraction"]), Text(point, style=style),
                     *cells])
    return [*_prefix_note(prefix), _name_table(columns, rows, [0, 5], width)]


def _ablation_ranking(report: dict, width: int | None = None) -> list:
    mode = report["settings"].get("ablation_mode", "zero")
    ranked = ablation_rows(report)
    parts: list = [Text(f"Units by |Δloss| when ablated ({mode} mode), smallest first: the exact loss change, "
                        "one scale for every layer", style="bold")]
    has_acc = any(r["accuracy_change"] is not None for r in ranked)
    prefix = common_prefix([r["layer"] for r in ranked])
    columns = [(c, "left" if c == "layer" else "right") for c in ("#", "layer", "unit", "Δloss")]
    columns += [("Δaccuracy", "right")] if has_acc else []
    rows = []
    for i, r in enumerate(ranked, 1):
        cells = [str(i), strip_prefix(r["layer"], prefix), str(r["unit"]), fmt(r["value"])]
        if has_acc:
            cells.append(fmt(r["accuracy_change"]) if r["accuracy_change"] is not None else "")
        rows.append(cells)
    parts += [*_prefix_note(prefix), _name_table(columns, rows, [1], width)]
    for lay in report["layers"]:
        if lay.get("layer_ablation") is not None:
            acc = lay.get("layer_ablation_accuracy")
            parts.append(Text(f"whole layer {lay['name']} ablated: Δloss {fmt(lay['layer_ablation'])}"
                              + (f", Δaccuracy {fmt(acc)}" if acc is not None else "")))
        if lay.get("removable"):
            parts.append(Text(f"{lay['name']}: {len(lay['removable'])} removable units (|Δloss| ≤ 1e-6): "
                              + ", ".join(map(str, lay["removable"][:20])) + (" ..." if len(lay["removable"]) > 20 else "")))
    return parts


def _metric_ranking(report: dict, ranked: list[dict], width: int | None = None, kind: str | None = None) -> list:
    rb = report["settings"].get("rank_by")
    hib = (report.get("metric_info") or {}).get(rb, {}).get("higher_is_better", True)
    what = f"Least-fit {KIND_TITLES.get(kind, kind)}" if kind else "Least-fit units"
    parts: list = [Text(f"{what} by {rb} ({'smallest' if hib else 'largest'} first; per-layer "
                        "ℓ2-normalised; final layer excluded)", style="bold")]
    prefix = common_prefix([r["layer"] for r in ranked])
    columns = [(c, "right" if c in ("#", "unit", "value", "normalised") else "left")
               for c in ("#", "layer", "unit", "value", "normalised", "")]
    rows = []
    for i, r in enumerate(ranked, 1):
        style = "red" if r.get("dead") else ""
        rows.append([Text(str(i), style=style), Text(strip_prefix(r["layer"], prefix), style=style),
                     Text(str(r["unit"]), style=style), Text(fmt(r["value"]), style=style),
                     Text(fmt(r["normalized"]), style=style), Text("dead" if r.get("dead") else "", style=style)])
    parts += [*_prefix_note(prefix), _name_table(columns, rows, [1], width)]
    return parts


def _footer(report: dict) -> list:
    parts: list = []
    nonfinite = [(lay["name"], lay["nonfinite"]) for lay in report["layers"] if lay["nonfinite"]]
    if nonfinite:
        parts.append(Text("non-finite values (not ranked): " + "; ".join(
            f"{n} units {', '.join(map(str, u[:10]))}{' ...' if len(u) > 10 else ''}" for n, u in nonfinite), style="yellow"))
    if report.get("skipped"):
        parts.append(Text("skipped: " + "; ".join(f"{x['metric']} ({x['reason']})" for x in report["skipped"]), style="dim"))
    missing = (report.get("coverage") or {}).get("not_audited")
    if missing:
        parts.append(Text("not audited:", style="dim"))
        parts += [Text("  " + not_audited_text(g), style="dim") for g in not_audited_groups(missing)]
    elif report.get("unsupported"):
        parts.append(Text("not hooked: " + "; ".join(f"{x['name']} ({x['reason']})" for x in report["unsupported"]), style="dim"))
    g = report.get("gate")
    if g:
        parts.append(Text("gate passed" if g["passed"] else "gate FAILED: " + "; ".join(g["failures"]),
                          style="bold green" if g["passed"] else "bold red"))
    return parts


def _by_size(r: dict) -> tuple:
    """Blocks by |Δloss| (the rule the greedy curve removes by), unmeasured ones last."""
    v = r.get("ablation")
    return (v is None, abs(v) if v is not None else 0.0, r["name"])


def render_blocks(report: dict) -> Group:
    """Residual blocks: Block Influence, angular distance, exact loss change when removed; and the
    greedy layer-removal curve."""
    base = report.get("base") or {}
    head = Text()
    head.append(f"fitcli ablate --blocks {report['model']['path']}", style="bold")  # the command that made it
    head.append(f"\ndata {report['data']['spec']}: {report['data']['samples']} samples; loss {fmt(base.get('loss'))}"
                + (f", accuracy {fmt(base.get('accuracy'))}" if base.get("accuracy") is not None else ""))
    t = Table(show_edge=False)
    acc = any("ablation_accuracy" in r for r in report["blocks"])
    for col in ("block", "block influence", "angular distance", "Δloss removed") + (("Δaccuracy",) if acc else ()):
        t.add_column(col, justify="left" if col == "block" else "right")
    for r in sorted(report["blocks"], key=_by_size):
        cells = [Text(r["name"]), fmt(r.get("block_influence")), fmt(r.get("angular_distance")), fmt(r["ablation"])]
        if acc:
            cells.append(fmt(r.get("ablation_accuracy")))
        t.add_row(*cells)
    parts: list = [head, Text("Blocks by |Δloss| when removed, smallest first (exact: the block replaced by the "
                              "identity; --greedy removes by the same rule)", style="bold"), t]
    if report.get("greedy"):
        c = Table(show_edge=False)
        for col in ("step", "removed", "loss", "Δloss", "accuracy", "Block Influence would remove"):
            c.add_column(col, justify="left" if col in ("removed", "Block Influence would remove") else "right")
        for r in report["greedy"]:
            c.add_row(str(r["step"]), Text(r["removed"]), fmt(r["loss"]), fmt(r["delta_loss"]),
                      fmt(r["accuracy"]) if r.get("accuracy") is not None else "", Text(r.get("block_influence_pick") or ""))
        parts += [Text("Layer-removal curve (greedy, re-measured exactly after each removal)", style="bold"), c]
    return Group(*parts)


def _blocks_section(blocks: list[dict]) -> list:
    """Residual blocks in a score report: Block Influence and angular distance, lowest first."""
    t = Table(show_edge=False)
    for col in ("block", "block influence", "angular distance"):
        t.add_column(col, justify="left" if col == "block" else "right")
    for r in sorted(blocks, key=lambda r: (r.get("block_influence") is None, r.get("block_influence") or 0.0, r["name"])):
        t.add_row(Text(r["name"]), fmt(r.get("block_influence")), fmt(r.get("angular_distance")))
    return [Text("Blocks by Block Influence (1 − cos(input, output)), lowest first: the blocks that change the "
                 "residual stream least (`fitcli ablate --blocks` measures the exact loss change)", style="bold"), t]


def render_report(report: dict, width: int | None = None) -> Group:
    """The terminal view; ``width``: the console's, to which long layer names are wrapped (at
    their dots, after dropping the prefix all rows share), never cut."""
    if report.get("command") == "blocks":
        return render_blocks(report)
    parts: list = [_header(report), Text("Layers", style="bold"), *_layers_table(report, width)]
    ranked = report.get("ranked") or []
    if ranked and report.get("command") == "ablate":
        parts += _ablation_ranking(report, width)
    elif ranked:
        for kind, rows in by_kind(ranked):
            parts += _metric_ranking(report, rows, width, kind)
    if report.get("blocks"):
        parts += _blocks_section(report["blocks"])
    if report.get("validation"):
        if report["validation"]["layers"]:
            parts.append(render_validation(report["validation"]))
        parts += render_kind_validation(report["validation"])
    parts += _footer(report)
    return Group(*parts)


def render_inspect(info: dict, width: int | None = None) -> Group:
    head = Text()
    head.append(f"{info['model']['path']}", style="bold")
    head.append(f"  format {info['model']['format']}, arch {info['model'].get('arch') or '-'}, "
                f"points found by {info['discovery']['method']}")
    prefix = common_prefix([lay["name"] for lay in info["layers"]])
    columns = [("layer", "left"), ("type", "left"), ("units", "right"), ("activation point", "left"),
               ("parameters", "right"), ("final", "center"), ("chain", "left")]
    rows = [[strip_prefix(lay["name"], prefix), lay["type"], str(lay["units"]),
             strip_prefix(lay["activation_point"], prefix), f"{lay['parameters']:,}", "✓" if lay["final"] else "",
             strip_prefix(lay.get("activation_chain") or "", prefix)] for lay in info["layers"]]
    names = [0, 3, 6]
    if width and name_widths(width, [6, 5, 10, 5], [12, 12, 12]) is None:  # narrow: the chain says least
        columns, rows, names = columns[:-1], [r[:-1] for r in rows], [0, 3]
    parts = [head, *_prefix_note(prefix), _name_table(columns, rows, names, width)]
    for n in info["discovery"].get("notes", []):
        parts.append(Text("note: " + n, style="dim"))
    for g in not_audited_groups([{"type": u.get("type", ""), **u} for u in info.get("unsupported", [])]):
        parts.append(Text(f"not hooked: {not_audited_text(g)}", style="yellow"))
    return Group(*parts)


def render_metrics(rows: list[dict]) -> Table:
    t = Table(show_edge=False)
    for col in ("name", "fit when", "needs", "cost", "description"):
        t.add_column(col)
    for r in rows:
        if r.get("error"):
            t.add_row(Text(r["name"]), "", "", "", Text(f"failed to load: {r['error']}", style="red"))
        else:
            needs = ", ".join(r["needs"]) + "".join(f", ({n})" for n in r.get("optional_needs", []))
            t.add_row(Text(r["name"]), "higher" if r.get("higher_is_better") else "lower", Text(needs),
                      Text(r["cost"]), Text(r["description"]))
    return t


WIDTH = 100  # validation tables fit a 100-column terminal


def short_names(names: list[str], limit: int = 30) -> tuple[dict[str, str], str | None]:
    """Names without their common dotted prefix (returned for a legend), each at most ``limit``
    characters by dropping whole leading components ("…attention.self.query"), never cut inside."""
    parts = [n.split(".") for n in names]
    common = 0
    while parts and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    prefix = ".".join(parts[0][:common]) + "." if common else None
    out = {}
    for n, p in zip(names, parts, strict=True):
        rest = p[common:]
        while len(".".join(rest)) > limit and len(rest) > 1:
            rest = rest[1:]
        s = ".".join(rest)
        out[n] = s if rest == p[common:] else "…" + s
    return out, prefix


def render_validation(v: dict) -> Group:
    """Metric x layer Spearman with exact ablation; best per layer in bold. With more layers than
    fit 100 columns: metrics down the side with the across-layer figure and the best and worst
    layer (per-layer detail stays in the JSON report)."""
    layers = list(v["layers"])
    if 16 + 9 * (len(layers) + 1) > WIDTH:
        return _validation_compact(v)
    metrics = sorted(v["across_layers"])
    t = Table(show_edge=False)
    t.add_column("metric")
    for name in layers:
        t.add_column(Text(name), justify="right")
    t.add_column("across layers", justify="right")
    for m in metrics:
        cells = []
        for name in layers:
            c = v["layers"][name]["metrics"].get(m)
            txt = fmt_corr(c["spearman"] if c else None)
            cells.append(Text(txt, style="bold green") if v["layers"][name].get("best") == m else Text(txt))
        a = v["across_layers"][m]["spearman"]
        cells.append(Text(fmt_corr(a), style="bold green" if v.get("best") == m else ""))
        t.add_row(Text(m), *cells)
    rnd = v.get("random")
    if rnd:  # a random order: the baseline every metric should beat
        cells = [Text(fmt_corr((rnd["layers"].get(name) or {}).get("spearman")), style="dim") for name in layers]
        t.add_row(Text("(random order)", style="dim"), *cells,
                  Text(fmt_corr((rnd.get("across_layers") or {}).get("spearman")), style="dim"))
    return Group(Text(f"Validation: Spearman rank correlation with {v['oracle']}", style="bold"), t,
                 Text(v["recommendation"], style="bold"))


def _validation_compact(v: dict) -> Group:
    names, prefix = short_names(list(v["layers"]))
    t = Table(show_edge=False, width=WIDTH)
    for col, just in (("metric", "left"), ("across", "right"), ("bottom 10%", "right"), ("best layer", "left"),
                      ("ρ", "right"), ("worst layer", "left"), ("ρ", "right")):
        t.add_column(col, justify=just, no_wrap=True)
    for m in sorted(v["across_layers"]):
        per = [(c["spearman"], name) for name, d in v["layers"].items()
               if (c := d["metrics"].get(m)) and c["spearman"] is not None]
        best = max(per) if per else (None, None)
        worst = min(per) if per else (None, None)
        a = v["across_layers"][m]
        t.add_row(Text(m), Text(fmt_corr(a["spearman"]), style="bold green" if v.get("best") == m else ""),
                  fmt_corr(a.get("bottom10_overlap")), Text(names.get(best[1], "-")), fmt_corr(best[0]),
                  Text(names.get(worst[1], "-")), fmt_corr(worst[0]))
    rnd = (v.get("random") or {}).get("across_layers") or {}
    if rnd:
        t.add_row(Text("(random)", style="dim"), Text(fmt_corr(rnd.get("spearman")), style="dim"),
                  Text(fmt_corr(rnd.get("bottom10_overlap")), style="dim"), "", "", "", "")
    head = Text(f"Validation: Spearman rank correlation with {v['oracle']}\n"
                f"{len(names)} layers: the across-layer figure, and the best and worst layer (every layer in the "
                "JSON report)", style="bold")
    parts: list = [head, t]
    if prefix:
        parts.append(Text(f"layer names without their common prefix {prefix!r}", style="dim"))
    parts.append(Text(v["recommendation"], style="bold"))
    return Group(*parts)


def render_kind_validation(v: dict) -> list:
    """Per unit kind (``validation.kinds``): each metric's Spearman with exact ablation across the
    kind's layers (blocks: with each block's exact removal), the best per kind in bold, and a random
    order's; nothing when the validation has no per-kind summary."""
    kinds, rows = kind_validation_rows(v)
    if not kinds:
        return []
    t = Table(show_edge=False)
    t.add_column("metric")
    for k in kinds:
        t.add_column(Text(k), justify="right")
    for r in rows:
        dim = r["metric"].startswith("(")
        cells = []
        for k in kinds:
            rho, best = r["cells"].get(k, (None, False))
            txt = fmt_corr(rho) if k in r["cells"] else ""
            cells.append(Text(txt, style="bold green" if best else ("dim" if dim else "")))
        t.add_row(Text(r["metric"], style="dim" if dim else ""), *cells)
    head = Text("Validation per unit kind: Spearman with exact ablation over each kind's units (blocks: each block "
                "removed)", style="bold")
    parts: list = [head, t]
    if not v["layers"]:
        parts.append(Text(v["recommendation"], style="bold"))
    return parts


def fmt_corr(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2f}"
