"""``fitcli compare BASE NEW``: regressions between two reports, or two checkpoints audited here
on the same --data with the same settings (``fitcli.compare``)."""

from __future__ import annotations

import importlib.util
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
    LayerOpt,
    LossOpt,
    MaxBatchOpt,
    MetricOpt,
    OutputOpt,
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
    progress_of,
)
from fitcli.errors import GateFailed, UsageError

SHORT = "Compare two audits (reports, or checkpoints on the same data): units that died, drifts, a gate."
EXAMPLES = """Examples:

\b
  fitcli compare main.json branch.json
  fitcli compare main.json branch.json --max-new-dead 1 --format markdown >> "$GITHUB_STEP_SUMMARY"
  fitcli compare base.safetensors new.safetensors --arch models.py:Net --data val.safetensors
  fitcli compare base.pt new.pt --arch models.py:Net --data val.pt --format json -o compare.json
"""

SideArg = Annotated[str, typer.Argument(help="a JSON report (fitcli score -o), or a checkpoint (needs --data)")]
MaxNewDeadOpt = Annotated[float | None, typer.Option("--max-new-dead", help="fail (exit 1) when more than PCT % of the compared units died")]
COMPARE_FORMATS = formats("table", "json", "markdown", "html")
CompareFormatOpt = Annotated[COMPARE_FORMATS | None, typer.Option(  # type: ignore[valid-type]
    "--format", help=f"what stdout carries: a table, the JSON comparison or markdown; {clikit.PAGE_HELP} "
    "[default: table]")]
DriftTopOpt = Annotated[int | None, typer.Option("--top", min=0, help="largest drifts kept per layer and metric, and shown [default: 5]")]


def _is_report(path: str) -> bool:
    return path.lower().endswith(".json")


def _check_inputs(base: str, new: str, m: dict) -> None:
    """Before anything is loaded: what each input needs, and that the format can be written."""
    clikit.terminal_page(m["format"], m.get("output"))
    if m["format"] is Fmt.html and importlib.util.find_spec("fitcli.render.html") is None:
        raise UsageError("--format html needs fitcli's HTML renderer, which this installation lacks: "
                         "use table, json or markdown")
    models = [p for p in (base, new) if not _is_report(p)]
    if models and not m.get("data") and not m.get("text"):
        raise UsageError(f"comparing checkpoints needs --data or --text: {models[0]} is audited on it "
                         "(both sides on the same data); or compare two JSON reports")


def _page(data: dict) -> str:
    from fitcli.errors import first_line
    from fitcli.render.html import render_html

    try:
        return render_html(data)
    except (KeyError, TypeError, AttributeError) as e:  # a renderer that knows reports only
        raise UsageError("--format html: this fitcli's HTML renderer does not support comparisons yet "
                         f"({type(e).__name__}: {first_line(e)}); use table, json or markdown") from e


def _flag_words(failures: list[str]) -> list[str]:
    return [f.replace("max_new_dead", "--max-new-dead") for f in failures]


def _write(cmp, m: dict, protect: list[str | None]) -> None:
    from fitcli import report as rep
    from fitcli.render.compare import render_compare, render_compare_markdown

    data = cmp.to_dict()
    if data.get("gate") and m["format"] in (Fmt.table, Fmt.markdown):  # the JSON keeps the library words
        data["gate"]["failures"] = _flag_words(data["gate"]["failures"])
    fmt = m["format"]
    page = _page(data) if fmt is Fmt.html else None
    if m.get("output"):
        clikit.write_output(m["output"], page if page is not None else rep.dumps(data), protect)
    if page is not None and not m.get("output"):
        sys.stdout.write(page)
    elif fmt is Fmt.json:
        sys.stdout.write(rep.dumps(data))
    elif fmt is Fmt.markdown:
        sys.stdout.write(render_compare_markdown(data))
    elif fmt is Fmt.table:
        clikit.out.print(render_compare(data))
    if not m.get("quiet"):
        if fmt is not Fmt.table:  # the table shows them already
            for note in data["notes"]:
                clikit.err.print(f"note: {note}", style="dim")
        if m.get("output"):
            clikit.err.print(f"comparison written to {m['output']}", style="dim")


def command(
    base: SideArg, new: SideArg, arch: ArchOpt = None, arch_kwargs: ArchKwOpt = None, trust_checkpoint: TrustOpt = None,
    data: DataOpt = None, text: TextOpt = None, max_seq_len: SeqLenOpt = None, batch_size: BatchOpt = None,
    max_batches: MaxBatchOpt = None, loss: LossOpt = None, layer: LayerOpt = None, metric: MetricOpt = None, device: DeviceOpt = None, seed: SeedOpt = None,
    tau: TauOpt = None, top: DriftTopOpt = None, max_new_dead: MaxNewDeadOpt = None,
    fmt: CompareFormatOpt = None, output: OutputOpt = None,
    quiet: QuietOpt = None, verbose: VerboseOpt = None, config: ConfigOpt = None,
) -> None:
    """Compare two audits (two JSON reports, or two checkpoints with --data): per layer the change
    in dead fraction, the units that died and revived, the largest metric drifts; --max-new-dead
    gates (exit 1)."""
    m = merge(config, dict(arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint, data=data,
                            text=text, max_seq_len=max_seq_len, batch_size=batch_size, max_batches=max_batches,
                            loss=loss, layers=layer, metrics=metric,
                            device=device, seed=seed, tau=tau, top=top, max_new_dead=max_new_dead, format=fmt,
                            output=output, quiet=quiet, verbose=verbose), COMPARE_FORMATS)
    _check_inputs(base, new, m)
    settings = checked_settings({k: v for k, v in m.items() if k != "top"})  # --top here counts drifts
    from fitcli.comparison import compare

    sides = {p: (p if _is_report(p) else model_of(p, m)) for p in dict.fromkeys((base, new))}
    data = data_of(next((p for p in (base, new) if not _is_report(p)), base), m, settings)
    cmp = compare(sides[base], sides[new], data=data, loss=loss_of(m.get("loss")),
                  settings=settings, progress=progress_of(m), top=m.get("top", 5),
                  max_new_dead=m.get("max_new_dead"))
    cmp.base.source, cmp.new.source = base, new
    _write(cmp, m, [base, new, m.get("data"), m.get("text"), m.get("_config")])
    if cmp.gate is not None and not cmp.gate.passed:
        raise GateFailed("compare gate failed: " + "; ".join(_flag_words(cmp.gate.failures)))
