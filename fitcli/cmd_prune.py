"""``fitcli prune MODEL --data D --remove dead|removable|LAYER:UNITS | --budget PCT -o OUT``:
physical removal of units (``fitcli.prune``), with the before/after table on stdout."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from fitcli import clikit
from fitcli.clikit import (
    ArchKwOpt,
    ArchOpt,
    BatchOpt,
    ConfigOpt,
    DataOpt,
    DeviceOpt,
    Fmt,
    LossOpt,
    MaxBatchOpt,
    QuietOpt,
    SeedOpt,
    SeqLenOpt,
    TauOpt,
    TextOpt,
    TrustOpt,
    VerboseOpt,
    checked_settings,
    data_of,
    formats,
    loss_of,
    merge,
    model_of,
    parse_units,
)
from fitcli.errors import UsageError

SHORT = "Remove units for real (dead, removable, named, or a budget) and write the smaller model."
EXAMPLES = """Examples:

\b
  fitcli prune model.safetensors --arch models.py:Net --data val.safetensors --remove dead -o pruned
  fitcli prune model.pt --arch models.py:Net --data val.pt --remove removable -o pruned --format json
  fitcli prune model.pt --arch models.py:Net --data val.pt --remove fc1:3,17 --remove fc2:5-7 -o pruned
  fitcli prune model.pt --arch models.py:Net --data val.pt --budget 10 --rank-by apoz -o pruned
  fitcli prune resnet.pt --arch models.py:resnet --data val.pt --kinds channels,hidden --budget 20 -o pruned
"""

RemoveOpt = Annotated[list[str] | None, typer.Option("--remove", help="dead (dead and constant units), removable (exact ablation |Δloss| ≤ 1e-6, and constant units), or LAYER:UNITS such as fc1:3,7-9 (repeatable) [default: dead]")]
BudgetOpt = Annotated[float | None, typer.Option("--budget", help="remove PCT % of the prunable units, least fit first by --rank-by")]
RankOpt = Annotated[str | None, typer.Option("--rank-by", help="metric ranking the units for --budget [default: the audit's: taylor, else act_mean, else weight_norm]")]
PRUNE_FORMATS = formats("table", "json", "markdown", "csv")
PruneFormatOpt = Annotated[PRUNE_FORMATS | None, typer.Option(  # type: ignore[valid-type]
    "--format", help="before/after figures as a table, json, markdown or csv [default: table]")]
OutOpt = Annotated[str | None, typer.Option("--output", "-o", help="write OUT.pt2 (torch.export: runs without your code) and OUT.safetensors (the pruned weights), atomically; a Hugging Face model: the folder OUT (from_pretrained loads it)")]
KindsOpt = Annotated[str | None, typer.Option("--kinds", help="what may go, comma-separated: channels (each layer's own units), hidden (residual-stream channels, e.g. a ResNet's: cut from every coupled layer at once, ranked by the sum of the writers' scores) [default: channels]; a Hugging Face transformer: mlp, heads, hidden, blocks [default: mlp]")]
TargetOpt = Annotated[int | None, typer.Option("--target-params", min=1, help="Hugging Face transformers: remove units until N parameters remain (instead of --budget)")]
CompOpt = Annotated[str | None, typer.Option("--compensate", help="Hugging Face transformers: ridge (least squares, strength chosen on held-out calibration tokens), mean (FLAP's bias) or none [default: ridge]")]
PerLayerOpt = Annotated[bool, typer.Option("--per-layer", help="Hugging Face transformers: MLP channel counts may differ between blocks (written as OUT.pt2 + OUT.safetensors: a stock config holds one count)")]
EvalDataOpt = Annotated[str | None, typer.Option("--eval-data", help="held-out token data for the loss and perplexity before and after")]
EvalTextOpt = Annotated[str | None, typer.Option("--eval-text", help="held-out text file for the loss and perplexity before and after")]


def is_hf_folder(model: str) -> bool:
    """A Hugging Face model folder (config.json beside the weights)."""
    from pathlib import Path

    return Path(model).is_dir() and (Path(model) / "config.json").is_file()


def parse_remove(values: list[str] | None):
    """--remove values -> "dead", "removable" or {layer: [units]}."""
    if not values:
        return "dead"
    words = [v for v in values if v in ("dead", "removable")]
    if words:
        if len(values) > 1:
            raise UsageError("--remove dead or removable stands alone (not with other --remove values)")
        return words[0]
    out: dict[str, list[int]] = {}
    for v in values:
        layer, sep, spec = v.rpartition(":")
        if not sep or not layer:
            raise UsageError(f"--remove {v!r}: use dead, removable or LAYER:UNITS (e.g. fc1:3,7-9)")
        units = parse_units(spec, where=f"--remove {v!r}") or []
        out[layer] = sorted(set(out.get(layer, [])) | set(units))
    return out


def _fmt(v, kind: str) -> str:
    if v is None:
        return "n/a"
    if kind == "int":
        return f"{int(v):,}"
    if kind == "pct":
        return f"{100 * v:.2f}%"
    return f"{v:.6g}"


def _change(before, after, kind: str) -> str:
    if before is None or after is None:
        return "n/a"
    d = after - before
    if kind == "int":
        d = int(d)  # FLOPs arrive as floats
        return f"{d:+,}" + (f" ({100 * d / before:+.1f}%)" if before else "")
    if kind == "pct":
        return f"{100 * d:+.2f} pts"
    return f"{d:+.3g}"


def rows(d: dict) -> list[list[str]]:
    lo, acc = d["loss"], d["accuracy"]
    pred = lo["predicted_change"]
    return [
        ["parameters", _fmt(d["parameters"]["before"], "int"), _fmt(d["parameters"]["after"], "int"),
         _change(d["parameters"]["before"], d["parameters"]["after"], "int"), ""],
        ["FLOPs (one batch)", _fmt(d["flops"]["before"], "int"), _fmt(d["flops"]["after"], "int"),
         _change(d["flops"]["before"], d["flops"]["after"], "int"), ""],
        ["loss", _fmt(lo["before"], "f"), _fmt(lo["after"], "f"), _change(lo["before"], lo["after"], "f"),
         "n/a" if pred is None else f"{pred:+.3g}"],
        ["accuracy", _fmt(acc["before"], "pct"), _fmt(acc["after"], "pct"),
         _change(acc["before"], acc["after"], "pct"), ""],
    ]


def units_text(d: dict) -> list[str]:
    out = []
    for layer, units in d["removed"].items():
        folded = d["folded"].get(layer, {})
        shown = [f"{u} (folded: {folded[str(u)]:.4g})" if str(u) in folded else str(u) for u in units]
        out.append(f"removed from {layer}: {', '.join(shown)}")
    for label, chans in d.get("streams", {}).items():
        out.append(f"removed from the residual stream {label}: {', '.join(map(str, chans))}")
    if not d["removed"] and not d.get("streams"):
        out.append("removed: nothing")
    for r in d["refused"]:
        out.append(f"refused {r['layer']} unit(s) {','.join(map(str, r['units']))}: {r['reason']}")
    return out


def render(d: dict, fmt: Fmt) -> str:
    head = ["", "before", "after", "change", "predicted (exact ablation)"]
    body = rows(d)
    if fmt is Fmt.markdown:
        lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|---:|---:|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        lines += [""] + [f"- {t}" for t in units_text(d)]
        return "\n".join(lines) + "\n"
    if fmt is Fmt.csv:
        return "\n".join(",".join(x.replace(",", "") for x in r) for r in [head, *body]) + "\n"
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths, strict=True)))
             for r in [head, *body]]
    lines += [f"selection: {d['selection']}"] + units_text(d)
    return "\n".join(lines) + "\n"


def command(
    model: clikit.ModelArg, remove: RemoveOpt = None, budget: BudgetOpt = None, rank_by: RankOpt = None,
    output: OutOpt = None, arch: ArchOpt = None, arch_kwargs: ArchKwOpt = None, trust_checkpoint: TrustOpt = None,
    data: DataOpt = None, text: TextOpt = None, max_seq_len: SeqLenOpt = None, batch_size: BatchOpt = None,
    max_batches: MaxBatchOpt = None, loss: LossOpt = None,
    device: DeviceOpt = None, seed: SeedOpt = None, tau: TauOpt = None, fmt: PruneFormatOpt = None,
    quiet: QuietOpt = None, verbose: VerboseOpt = None, config: ConfigOpt = None,
    kinds: KindsOpt = None, target_params: TargetOpt = None, compensate: CompOpt = None, per_layer: PerLayerOpt = False,
    eval_data: EvalDataOpt = None, eval_text: EvalTextOpt = None,
) -> None:
    """Physically remove units (dead, removable, named, or a budget of the least fit) and write the
    smaller model as OUT.pt2 (torch.export) and OUT.safetensors; prints parameters, FLOPs, loss and
    accuracy before/after beside the change exact ablation predicted."""
    m = merge(config, dict(arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint, data=data,
                            text=text, max_seq_len=max_seq_len, batch_size=batch_size, max_batches=max_batches,
                            loss=loss, device=device, seed=seed,
                            tau=tau, rank_by=rank_by, format=fmt, quiet=quiet, verbose=verbose), PRUNE_FORMATS)
    if not output:
        raise UsageError("prune needs -o OUT: the pruned model is written to OUT.pt2 and OUT.safetensors")
    if not m.get("data") and not m.get("text"):
        raise UsageError("prune needs --data or --text (units are chosen, folded and checked on it)")
    if budget is not None and remove:
        raise UsageError("give --remove or --budget, not both")
    if budget is not None and not 0 <= budget <= 100:
        raise UsageError(f"--budget {budget:g}: give a percentage between 0 and 100")
    hf = dict(kinds=kinds, target_params=target_params, compensate=compensate, per_layer=per_layer or None,
              eval_data=eval_data, eval_text=eval_text)
    if is_hf_folder(model):
        if remove:
            raise UsageError("--remove is for models pruned by the dependency graph; a Hugging Face transformer "
                             "takes --budget or --target-params with --kinds")
        return run_hf(model, m, output, budget, hf)
    given = [f"--{k.replace('_', '-')}" for k, v in hf.items() if v is not None and k != "kinds"]
    if given:
        raise UsageError(f"{', '.join(given)}: for a Hugging Face transformer folder only")
    how = parse_remove(remove)
    settings = checked_settings(m)
    from fitcli.prune_groups import check_kinds
    from fitcli.pruning import check_outputs, prune

    check_kinds(kinds)  # before anything is loaded

    protect = [p for p in (model, m.get("data"), m.get("text"), m.get("_config")) if p]
    check_outputs(output, protect)  # before anything is loaded; a refusal names its setting: output
    loaded = model_of(model, m)
    result = prune(loaded, data_of(model, m, settings), remove=how, budget=budget, kinds=kinds,
                   loss=loss_of(m.get("loss")), settings=settings)
    written = result.save(output, protect=protect)
    d = result.to_dict()
    if m["format"] is Fmt.json:
        sys.stdout.write(json.dumps({**d, "written": [str(p) for p in written]}, indent=2) + "\n")
    else:
        sys.stdout.write(render(d, m["format"]))
    if not m.get("quiet"):
        for note in d["notes"]:
            clikit.err.print(f"note: {note}", style="dim")
        clikit.err.print(f"written {', '.join(str(p) for p in written)}", style="dim")


# --------------------------------------------------------------------------------------------
# Hugging Face transformers (fitcli.prune_hf)


def hf_batches(model: str, m: dict, settings, data: str | None, text: str | None):
    """Token batches from --data / --text (or --eval-data / --eval-text), or None."""
    if data is None and text is None:
        return None
    from fitcli import api

    src = data_of(model, {**m, "data": data, "text": text}, settings)
    return api.load_data(src, batch_size=settings.batch_size, max_batches=settings.max_batches, seed=settings.seed)


def check_hf_output(output: str, model: str, protect: list[str]) -> None:
    """-o names a folder: not the model folder, not an input file, not an existing file."""
    from pathlib import Path

    out = Path(output)
    for p in [model, *protect]:
        if p and Path(p).exists() and out.resolve() == Path(p).resolve():
            raise UsageError(f"{{output}} {output} is one of the inputs; refusing to overwrite it", setting="output")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{{output}} {output} exists and is not a folder (a Hugging Face model is written as a "
                         "folder)", setting="output")


def run_hf(model: str, m: dict, output: str, budget: float | None, hf: dict) -> None:
    """prune a Hugging Face transformer folder: fitcli.prune_hf.prune_transformer, then the folder."""
    kinds = [k.strip() for k in (hf["kinds"] or "mlp").split(",") if k.strip()]
    protect = [p for p in (m.get("data"), m.get("text"), hf["eval_data"], hf["eval_text"], m.get("_config")) if p]
    if not hf["per_layer"]:
        check_hf_output(output, model, protect)
    else:
        from fitcli.pruning import check_outputs

        check_outputs(output, [model, *protect])
    settings = checked_settings({**m, "rank_by": None})
    from fitcli.prune_hf import prune_transformer

    loaded = model_of(model, m)
    calib = hf_batches(model, m, settings, m.get("data"), m.get("text"))
    held = hf_batches(model, m, settings, hf["eval_data"], hf["eval_text"])
    result = prune_transformer(loaded.module, calib, kinds=kinds, budget=budget, target_params=hf["target_params"],
                               rank_by=m.get("rank_by"), compensate=hf["compensate"] or "ridge",
                               per_layer=bool(hf["per_layer"]), eval_data=held, seed=settings.seed, source_dir=model)
    written = result.save(output, protect=protect)
    d = result.to_dict()
    if m["format"] is Fmt.json:
        sys.stdout.write(json.dumps({**d, "written": [str(p) for p in written]}, indent=2) + "\n")
    else:
        sys.stdout.write(render_hf(d, m["format"]))
    if not m.get("quiet"):
        for note in d["notes"]:
            clikit.err.print(f"note: {note}", style="dim")
        clikit.err.print(f"written {', '.join(str(p) for p in written)}", style="dim")


def hf_rows(d: dict) -> list[list[str]]:
    cl, hl, hp = d["calibration_loss"], d["heldout_loss"], d["heldout_perplexity"]
    pred = cl["predicted_change"]

    def r(name, x, kind, predicted="", rnd=None):
        return [name, _fmt(x["before"], kind), _fmt(x["after"], kind), _change(x["before"], x["after"], kind),
                predicted, _fmt(rnd, kind) if rnd is not None else ""]

    return [r("parameters", d["parameters"], "int"), r("FLOPs per token", d["flops_per_token"], "int"),
            r("calibration loss", cl, "f", "n/a" if pred is None else f"{pred:+.3g}", cl["random_after"]),
            r("held-out loss", hl, "f", "", hl["random_after"]),
            r("held-out perplexity", hp, "f", "", hp["random_after"])]


def one(words: str) -> str:
    """"MLP channels per block" for one unit: "MLP channel per block"."""
    return words.replace("channels", "channel").replace("heads", "head").replace("blocks", "block")


def hf_lines(d: dict) -> list[str]:
    words = {"mlp": "MLP channels per block", "heads": "query heads per key-value group", "hidden": "hidden channels",
             "blocks": "blocks"}
    removed = ", ".join(f"{n} {words[k] if n != 1 else one(words[k])}" for k, n in d["counts"].items())
    lam = ", ".join(f"{k} x{n}" for k, n in sorted(d["lambda_choices"].items()))
    comp = d["compensate"] + (f" (chosen on held-out calibration tokens per layer: {lam})" if lam else "")
    return [f"removed: {removed}{' (per-layer counts)' if d['per_layer'] else ''}", f"ranked by: {d['rank_by']}",
            f"compensation: {comp}"]


def render_hf(d: dict, fmt: Fmt) -> str:
    head = ["", "before", "after", "change", "predicted (exact ablation)", "random (same counts)"]
    body = hf_rows(d)
    if fmt is Fmt.markdown:
        lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|---:|---:|---:|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines + [""] + [f"- {t}" for t in hf_lines(d)]) + "\n"
    if fmt is Fmt.csv:
        return "\n".join(",".join(x.replace(",", "") for x in r) for r in [head, *body]) + "\n"
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths, strict=True)))
             for r in [head, *body]]
    return "\n".join(lines + hf_lines(d)) + "\n"
