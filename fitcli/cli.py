"""The command line: parse, call ``fitcli.api``, render. Nothing else lives here.

stdout carries only the result (table, JSON, markdown, CSV); progress, notes and errors go to
stderr. ``main()`` maps the exception hierarchy to exit codes (``spec/cli.md``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import sys
from enum import Enum
from typing import Annotated, Any

import typer
from rich.console import Console

from fitcli import __version__
from fitcli.errors import FitcliError, GateFailed, Interrupted, UsageError
from fitcli.runtime import keep_freed_memory

app = typer.Typer(
    name="fitcli",
    help="Audit a trained PyTorch model: which neurons and layers contribute, and which are dead weight.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

out = Console(highlight=False)
if not out.is_terminal:  # piped or redirected: do not squeeze tables into 80 columns
    out = Console(highlight=False, width=140)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # one error = one line, never re-wrapped


class Fmt(str, Enum):
    table = "table"
    json = "json"
    markdown = "markdown"
    csv = "csv"


class Mode(str, Enum):
    zero = "zero"
    mean = "mean"


# ---- shared options, declared once ----------------------------------------------------------
ModelArg = Annotated[str, typer.Argument(help="checkpoint: .safetensors, .pt/.pth, .pt2, or a Hugging Face folder")]
ArchOpt = Annotated[str | None, typer.Option("--arch", help="model factory: package.module:callable or file.py:callable")]
ArchKwOpt = Annotated[str | None, typer.Option("--arch-kwargs", help="JSON object of keyword arguments for --arch")]
TrustOpt = Annotated[bool | None, typer.Option("--trust-checkpoint", help="allow unpickling a whole module (runs code from the file!)")]
DataOpt = Annotated[str | None, typer.Option("--data", help="tensor file, module:callable, random:SHAPE[,n=N][,seed=S], or random:tokens=VOCAB[,len=L][,n=N][,seed=S]")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", min=1, help="samples per batch for tensor files [default: 64]")]
MaxBatchOpt = Annotated[int | None, typer.Option("--max-batches", min=1, help="stop after N batches")]
LossOpt = Annotated[str | None, typer.Option("--loss", help="cross_entropy, mse, lm (next token; the default for causal LMs), or module:callable(outputs, targets) -> per-sample loss")]
TextOpt = Annotated[str | None, typer.Option("--text", help="text file (one sample per line, or .jsonl with 'text') tokenised with the Hugging Face folder's tokenizer")]
SeqLenOpt = Annotated[int | None, typer.Option("--max-seq-len", min=2, help="truncate --text samples to N tokens [default: 128]")]
LayerOpt = Annotated[list[str] | None, typer.Option("--layer", help="layer name or glob (repeatable) [default: every layer]")]
MetricOpt = Annotated[list[str] | None, typer.Option("--metric", help="metric name (repeatable) [default: all whose needs are met]")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu, cuda or auto [default: auto]")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="random seed [default: 0]")]
TauOpt = Annotated[float | None, typer.Option("--tau", help="dead threshold on the dormancy score [default: 0]")]
TopOpt = Annotated[int | None, typer.Option("--top", min=0, help="rows in the ranked table [default: 20]")]
FormatOpt = Annotated[Fmt | None, typer.Option("--format", help="stdout format [default: table]")]
OutputOpt = Annotated[str | None, typer.Option("--output", "-o", help="write the JSON report to this file (atomically)")]
QuietOpt = Annotated[bool | None, typer.Option("--quiet", "-q", help="no progress bar or notes on stderr")]
VerboseOpt = Annotated[bool | None, typer.Option("--verbose", "-v", help="show tracebacks on errors")]
ConfigOpt = Annotated[str | None, typer.Option("--config", help="TOML config file [default: nearest fitcli.toml / pyproject [tool.fitcli]]")]
MaxDeadOpt = Annotated[float | None, typer.Option("--max-dead", help="fail (exit 1) when more than PCT % of units are dead")]
MaxDeadLayerOpt = Annotated[float | None, typer.Option("--max-dead-layer", help="fail (exit 1) when any layer has more than PCT % dead")]
MinCoverageOpt = Annotated[float | None, typer.Option("--min-coverage", help="fail (exit 1) when the audited units own less than PCT % of the model's parameters")]
ChunkOpt = Annotated[int | None, typer.Option("--chunk-size", min=1, help="units per batched ablation pass [default: from free memory]")]
ModeOpt = Annotated[Mode | None, typer.Option("--mode", help="ablation: zero, or the unit's mean activation [default: zero]")]

DEFAULTS: dict[str, Any] = {"format": Fmt.table, "trust_checkpoint": False, "quiet": False, "verbose": False}


# the library words its messages for any caller; on the command line, name the flag instead
CLI_WORDS = (("pass trust_checkpoint=True", "pass --trust-checkpoint"), ("give its architecture", "pass --arch"),
             ("give the architecture", "pass --arch"), ("(no architecture given)", "(no --arch)"),
             ("without an architecture", "without --arch"), ("give data to", "pass --data to"),
             ("(needs data:", "(needs --data:"), ("validate=True", "--validate"),
             ("> max_dead_layer ", "> --max-dead-layer "), ("> max_dead ", "> --max-dead "),
             ("< min_coverage ", "< --min-coverage "), ("set the batch size to ", "pass --batch-size "))


def cli_words(text: str | None) -> str | None:
    if text:
        for lib, flag in CLI_WORDS:
            text = text.replace(lib, flag)
    return text


def _guard(fn):
    """Ctrl-C inside a command becomes Interrupted (exit 130), not Click's 'Aborted!' (exit 1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as e:
            raise Interrupted(2) from e

    return wrapper


# flag spelling of each setting, for messages about the command line
FLAGS = {"layers": "--layer", "metrics": "--metric", "ablation_mode": "--mode"}


def _flag(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def _merge(config: str | None, given: dict[str, Any]) -> dict[str, Any]:
    """Flags win over the config file, which wins over built-in defaults."""
    from fitcli.config import load_config

    cfg, where = load_config(config)
    merged = dict(DEFAULTS)
    merged.update(cfg)
    merged.update({k: v for k, v in given.items() if v is not None and v != []})
    for key, enum, choices in (("format", Fmt, "table, json, markdown or csv"), ("ablation_mode", Mode, "zero or mean")):
        if isinstance(merged.get(key), str):
            try:
                merged[key] = enum(merged[key])
            except ValueError as e:
                raise UsageError(f"{_flag(key)} {merged[key]!r}: use {choices}") from e
    merged["_config"] = where
    return merged


def _settings(merged: dict[str, Any]):
    """The one settings object, checked before anything is loaded (a bad name costs a second)."""
    from fitcli.settings import Settings

    fields = {k: merged.get(k) for k in Settings.names()}
    if isinstance(fields.get("ablation_mode"), Mode):
        fields["ablation_mode"] = fields["ablation_mode"].value
    try:
        return Settings.make(**fields).check()
    except UsageError as e:  # name the flag, as the user typed it
        for name in Settings.names():
            if e.message.startswith(name + " ") or e.message.startswith(name.replace("_", " ") + " "):
                e.message = _flag(name) + e.message[len(name):]
                break
        raise


_RANGE = re.compile(r"^\s*(\d{1,12})\s*(?:-\s*(\d{1,12})\s*)?$")


def parse_units(spec: str | None) -> list[int] | None:
    """``0,3,7-9`` -> [0, 3, 7, 8, 9] (the library checks each against the layer's size)."""
    if spec is None or spec.strip() == "":
        return None
    out: list[int] = []
    for part in spec.split(","):
        m = _RANGE.match(part)
        if not m:
            raise UsageError(f"--units {spec!r}: {part!r} is not an index or a range like 7-9")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if b < a:
            raise UsageError(f"--units {spec!r}: range {part.strip()} runs backwards")
        if b - a > 10_000_000:
            raise UsageError(f"--units {spec!r}: range {part.strip()} is too long")
        out.extend(range(a, b + 1))
    return sorted(set(out))


def _arch(merged: dict[str, Any]) -> dict[str, Any]:
    """--arch SPEC and --arch-kwargs JSON -> the library's arch callable, kwargs and label."""
    spec = merged.get("arch")
    kw = merged.get("arch_kwargs")
    if isinstance(kw, str):
        try:
            kw = json.loads(kw)
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; so is a huge int
            raise UsageError(f"--arch-kwargs is not valid JSON: {str(e).splitlines()[0][:200]}") from e
        if not isinstance(kw, dict):
            raise UsageError("--arch-kwargs must be a JSON object, e.g. '{\"hidden\": 64}'")
    if spec is None:
        return {"arch": None, "arch_kwargs": None}
    from fitcli.loading import resolve_callable

    return {"arch": resolve_callable(spec, "--arch"), "arch_kwargs": kw, "arch_label": spec}


def _loss(spec: str | None) -> Any:
    """--loss NAME or module:callable(outputs, targets) -> what the library takes."""
    if spec is None or ":" not in spec:
        return spec  # a name (checked by the library) or None
    from fitcli.loading import resolve_callable

    fn = resolve_callable(spec, "--loss")

    def loss(outputs: Any, batch: Any) -> Any:
        return fn(outputs, batch.targets)

    loss.fitcli_name = spec  # type: ignore[attr-defined]
    return loss


def _data(model: str, merged: dict[str, Any], settings) -> Any:
    """--data SPEC, or --text FILE tokenised with the model folder's tokenizer."""
    if merged.get("text") is None:
        return merged.get("data")
    if merged.get("data"):
        raise UsageError("give --data or --text, not both")
    from pathlib import Path

    from fitcli.data import text_data
    from fitcli.loading import hf_tokenizer

    if not Path(model).is_dir():
        raise UsageError("--text needs a Hugging Face model folder (its tokenizer turns the text into tokens)")
    return text_data(merged["text"], hf_tokenizer(model), max_seq_len=merged.get("max_seq_len") or 128,
                     batch_size=settings.batch_size, max_batches=settings.max_batches)


def _model(model: str, merged: dict[str, Any]):
    from fitcli.api import load

    a = _arch(merged)
    return load(model, arch=a["arch"], arch_kwargs=a["arch_kwargs"], trust_checkpoint=bool(merged["trust_checkpoint"]),
                arch_label=a.get("arch_label"))


class RichProgress:
    """A rich progress bar on stderr (only when stderr is a terminal and not --quiet)."""

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RP

        bar = RP(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                 console=Console(stderr=True), transient=True)
        tid = bar.add_task(description, total=total)

        class _T:
            def advance(self, n: int = 1) -> None:
                bar.advance(tid, n)

        with bar:
            yield _T()


def _progress(s: dict[str, Any]):
    return RichProgress() if not s.get("quiet") and sys.stderr.isatty() else None


def _emit(report, s: dict[str, Any], protect: list[str | None]) -> None:
    from fitcli import report as rep
    from fitcli.render import render_csv, render_markdown, render_report

    data = report.to_dict()
    if s.get("output"):
        try:
            rep.write_atomic(s["output"], rep.dumps(data), protect=[p for p in protect if p])
        except UsageError as e:
            e.message = "-" + "-" + e.message if e.message.startswith("output ") else e.message
            raise
    fmt = s["format"]
    if fmt is Fmt.json:
        sys.stdout.write(rep.dumps(data))
    elif fmt is Fmt.markdown:
        sys.stdout.write(render_markdown(data))
    elif fmt is Fmt.csv:
        sys.stdout.write(render_csv(data))
    else:
        out.print(render_report(data))
    if not s.get("quiet"):
        for note in data.get("discovery", {}).get("notes", []):
            err.print(f"note: {cli_words(note)}", style="dim")
        if s.get("output"):
            err.print(f"report written to {s['output']}", style="dim")
    g = data.get("gate")
    if g and not g["passed"]:
        raise GateFailed("gate failed: " + "; ".join(g["failures"]))


SCORE_EXAMPLES = """Examples:

\b
  fitcli score model.safetensors --arch models.py:Net --data val.safetensors
  fitcli score model.pt --arch mypkg.models:resnet --data val.pt --format json -o report.json
  fitcli score model.pt --arch models.py:Net --data val.pt --rank-by apoz --top 30
  fitcli score model.pt --arch models.py:Net --data val.pt --max-dead 5   # CI gate: exit 1 above 5 %
  fitcli score model.pt --arch models.py:Net --data val.pt --validate --rank-by auto
"""
ABLATE_EXAMPLES = """Examples:

\b
  fitcli ablate model.pt --arch models.py:Net --data val.pt --layer fc2
  fitcli ablate model.pt --arch models.py:Net --data val.pt --layer fc2 --units 0,3,7-9 --mode mean
  fitcli ablate model.pt --arch models.py:Net --data val.pt --layer 'blocks.*' --whole-layer
"""
GATE_EXAMPLES = """Examples:

\b
  fitcli score model.pt --arch models.py:Net --data val.pt -o report.json
  fitcli gate report.json --max-dead 5 --max-dead-layer 20
  fitcli gate report.json --format markdown >> "$GITHUB_STEP_SUMMARY"
"""
INSPECT_EXAMPLES = """Examples:

\b
  fitcli inspect model.safetensors
  fitcli inspect model.safetensors --arch models.py:Net --format json
  fitcli inspect model.pt2
"""
METRICS_EXAMPLES = """Examples:

\b
  fitcli metrics
  fitcli metrics --format json
"""


@app.command(epilog=SCORE_EXAMPLES)
@_guard
def score(
    model: ModelArg, arch: ArchOpt = None, arch_kwargs: ArchKwOpt = None, trust_checkpoint: TrustOpt = None,
    data: DataOpt = None, text: TextOpt = None, max_seq_len: SeqLenOpt = None, batch_size: BatchOpt = None,
    max_batches: MaxBatchOpt = None, loss: LossOpt = None,
    layer: LayerOpt = None, metric: MetricOpt = None, device: DeviceOpt = None, seed: SeedOpt = None,
    tau: TauOpt = None, top: TopOpt = None,
    rank_by: Annotated[str | None, typer.Option("--rank-by", help="metric for the ranked table (least fit first, in the metric's direction), or auto (best validated) [default: taylor, else act_mean, else weight_norm]")] = None,
    fmt: FormatOpt = None, output: OutputOpt = None,
    baseline: Annotated[str | None, typer.Option("--baseline", help="earlier checkpoint: enables weight_change")] = None,
    max_dead: MaxDeadOpt = None, max_dead_layer: MaxDeadLayerOpt = None, min_coverage: MinCoverageOpt = None,
    mode: ModeOpt = None, chunk_size: ChunkOpt = None,
    validate: Annotated[bool | None, typer.Option("--validate", help="measure each metric against exact ablation")] = None,
    validate_units: Annotated[int | None, typer.Option("--validate-units", min=2, help="ablate a stratified sample of K units per layer")] = None,
    quiet: QuietOpt = None, verbose: VerboseOpt = None, config: ConfigOpt = None,
) -> None:
    """Score every metric, show ranked dead-weight tables, write a report, optionally gate."""
    m = _merge(config, dict(arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint, data=data,
                            text=text, max_seq_len=max_seq_len,
                            batch_size=batch_size, max_batches=max_batches, loss=loss, layers=layer,
                            metrics=metric, device=device, seed=seed, tau=tau, top=top, rank_by=rank_by,
                            format=fmt, output=output, baseline=baseline, max_dead=max_dead,
                            max_dead_layer=max_dead_layer, min_coverage=min_coverage, ablation_mode=mode,
                            chunk_size=chunk_size,
                            validate=validate, validate_units=validate_units, quiet=quiet, verbose=verbose))
    settings = _settings(m)  # every setting checked before torch is even imported
    from fitcli import api

    loss_fn = _loss(m.get("loss"))
    loaded = _model(model, m)
    base = api.load(m["baseline"]) if m.get("baseline") else None
    report = api.audit(loaded, _data(model, m, settings), loss=loss_fn, baseline=base, settings=settings,
                       progress=_progress(m))
    _emit(report, m, [model, m.get("data"), m.get("text"), m.get("baseline"), m.get("_config")])


@app.command(epilog=ABLATE_EXAMPLES)
@_guard
def ablate(
    model: ModelArg,
    layer: Annotated[list[str] | None, typer.Option("--layer", help="layer name or glob to ablate (required, repeatable)")] = None,
    units: Annotated[str | None, typer.Option("--units", help="units to ablate, e.g. 0,3,7-9, or heads: every attention head [default: all]")] = None,
    mode: ModeOpt = None,
    whole_layer: Annotated[bool | None, typer.Option("--whole-layer", help="also ablate each entire layer at once")] = None,
    blocks: Annotated[bool | None, typer.Option("--blocks", help="residual blocks as units: each replaced by the identity")] = None,
    greedy: Annotated[int | None, typer.Option("--greedy", min=0, help="with --blocks: remove the cheapest block N times, re-measuring exactly (layer-removal curve)")] = None,
    chunk_size: ChunkOpt = None, arch: ArchOpt = None, arch_kwargs: ArchKwOpt = None,
    trust_checkpoint: TrustOpt = None, data: DataOpt = None, text: TextOpt = None, max_seq_len: SeqLenOpt = None,
    batch_size: BatchOpt = None,
    max_batches: MaxBatchOpt = None, loss: LossOpt = None, device: DeviceOpt = None, seed: SeedOpt = None,
    tau: TauOpt = None, top: TopOpt = None, fmt: FormatOpt = None, output: OutputOpt = None,
    quiet: QuietOpt = None, verbose: VerboseOpt = None, config: ConfigOpt = None,
) -> None:
    """Exact ablation of each unit (and optionally whole layers): the loss change when it is masked."""
    m = _merge(config, dict(layers=layer, units=units, ablation_mode=mode, whole_layer=whole_layer,
                            chunk_size=chunk_size, arch=arch, arch_kwargs=arch_kwargs,
                            trust_checkpoint=trust_checkpoint, data=data, text=text, max_seq_len=max_seq_len,
                            batch_size=batch_size, max_batches=max_batches, loss=loss, device=device, seed=seed,
                            tau=tau, top=top, format=fmt, output=output, quiet=quiet, verbose=verbose))
    if blocks:
        settings = _settings({k: v for k, v in m.items() if k != "layers"})
        from fitcli import api

        report = api.blocks(_model(model, m), _data(model, m, settings), greedy=greedy or 0,
                            loss=_loss(m.get("loss")), settings=settings, progress=_progress(m))
        _emit(report, m, [model, m.get("data"), m.get("text"), m.get("_config")])
        return
    if m.get("units") == "heads":  # every attention head of the model (the layers named *.heads)
        m["layers"], m["units"] = [*(m.get("layers") or []), "*.heads"], None
    if not m.get("layers"):
        raise UsageError("ablate needs --layer NAME (see `fitcli inspect MODEL` for the names)")
    settings = _settings(m)
    unit_list = parse_units(m.get("units"))
    if not m.get("data") and not m.get("text"):
        raise UsageError("ablate needs --data (or --text)")
    from fitcli import api

    loss_fn = _loss(m.get("loss"))
    loaded = _model(model, m)
    try:
        report = api.ablate(loaded, _data(model, m, settings), units=unit_list, loss=loss_fn, settings=settings,
                            progress=_progress(m))
    except UsageError as e:
        if e.message.startswith("unit "):
            e.message = f"--units {m.get('units')!r}: {e.message}"
        raise
    _emit(report, m, [model, m.get("data"), m.get("text"), m.get("_config")])


@app.command(epilog=GATE_EXAMPLES)
@_guard
def gate(
    report: Annotated[str, typer.Argument(help="a JSON report written by `fitcli score --output`")],
    max_dead: MaxDeadOpt = None, max_dead_layer: MaxDeadLayerOpt = None, min_coverage: MinCoverageOpt = None,
    fmt: FormatOpt = None, quiet: QuietOpt = None, verbose: VerboseOpt = None,
) -> None:
    """CI gate on a saved report: exit 1 when a dead-unit threshold is exceeded, when no unit was
    audited, or when the audit covers too little of the model (--min-coverage)."""
    from fitcli import api
    from fitcli import report as rep
    from fitcli.render import render_markdown

    data = rep.read(report)
    try:
        result = api.gate(data, max_dead, max_dead_layer, min_coverage)
    except UsageError as e:
        e.message = e.message.replace("max_dead, max_dead_layer and/or min_coverage",
                                      "--max-dead, --max-dead-layer and/or --min-coverage")
        raise
    g = result.to_dict()
    if fmt is Fmt.json:
        sys.stdout.write(json.dumps(g, indent=2) + "\n")
    elif fmt is Fmt.markdown:
        sys.stdout.write(render_markdown(data))
    else:
        s = data["summary"]
        out.print(f"{s['dead']}/{s['units']} units dead ({100 * s['dead_fraction']:.2f}%): "
                  + ("gate passed" if g["passed"] else "gate FAILED"))
        for f in g["failures"]:
            out.print(f"  {cli_words(f)}")
    if not g["passed"]:
        raise GateFailed("gate failed: " + "; ".join(g["failures"]))


@app.command(epilog=INSPECT_EXAMPLES)
@_guard
def inspect(
    model: ModelArg, arch: ArchOpt = None, arch_kwargs: ArchKwOpt = None, trust_checkpoint: TrustOpt = None,
    data: DataOpt = None, fmt: FormatOpt = None, quiet: QuietOpt = None, verbose: VerboseOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Layers, unit counts, activation points and the format found in a checkpoint."""
    from fitcli import api
    from fitcli.render import render_inspect

    m = _merge(config, dict(arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint, data=data,
                            format=fmt, quiet=quiet, verbose=verbose))
    info = api.inspect(_model(model, m), m.get("data")).to_dict()
    if m["format"] is Fmt.json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    elif m["format"] in (Fmt.markdown, Fmt.csv):
        sep = "|" if m["format"] is Fmt.markdown else ","
        rows = [["layer", "type", "units", "activation_point", "parameters", "final"]]
        rows += [[x["name"], x["type"], str(x["units"]), x["activation_point"], str(x["parameters"]), str(x["final"]).lower()]
                 for x in info["layers"]]
        if m["format"] is Fmt.markdown:
            lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        else:
            lines = [sep.join(r) for r in rows]
        sys.stdout.write("\n".join(lines) + "\n")
    else:
        out.print(render_inspect(info))


@app.command(epilog=METRICS_EXAMPLES)
@_guard
def metrics(fmt: FormatOpt = None) -> None:
    """The metric registry: name, direction, needs, cost, one-line description (plugins included)."""
    from fitcli.metrics.registry import load_registry
    from fitcli.render import render_metrics

    rows = []
    for name, e in load_registry().items():
        if e.cls is None:
            rows.append({"name": name, "entry_point": e.value, "error": e.error})
        else:
            rows.append({"name": name, "entry_point": e.value, "needs": sorted(e.cls.needs),
                         "optional_needs": sorted(e.cls.optional_needs), "higher_is_better": e.cls.higher_is_better,
                         "cost": e.cls.cost, "description": e.cls.description})
    if fmt is Fmt.json:
        sys.stdout.write(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    else:
        out.print(render_metrics(rows))


def _version(value: bool) -> None:
    if value:
        out.print(f"fitcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="show the version")] = False,
) -> None:
    """fitcli: which neurons and layers of a trained PyTorch model are dead weight."""


def _sigterm(signum, frame):  # pragma: no cover - exercised by a subprocess test
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, map FitcliError to its exit code, no traceback unless --verbose."""
    args = sys.argv[1:] if argv is None else argv
    verbose = "--verbose" in args or "-v" in args or os.environ.get("FITCLI_VERBOSE") == "1"
    keep_freed_memory()  # this process is ours: reuse freed activation memory (fitcli.runtime)
    try:
        signal.signal(signal.SIGTERM, _sigterm)
    except ValueError:  # not the main thread
        pass
    code = 0
    try:
        try:
            app(args=args, prog_name="fitcli", standalone_mode=True)
        except KeyboardInterrupt as e:
            raise Interrupted(2) from e
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except (FitcliError, Interrupted) as e:
        if verbose:
            import traceback

            traceback.print_exc()
        if not isinstance(e, GateFailed):
            err.print(f"fitcli: error: {cli_words(e.message)}", markup=False, highlight=False)
        else:
            err.print(f"fitcli: {cli_words(e.message)}", markup=False, highlight=False)
        if e.hint:
            err.print(f"  hint: {cli_words(e.hint)}", markup=False, highlight=False)
        code = e.exit_code
    except ValueError as e:  # e.g. a NUL byte in a path argument
        if verbose:
            import traceback

            traceback.print_exc()
        err.print(f"fitcli: error: invalid argument: {str(e).splitlines()[0] if str(e) else ''}",
                  markup=False, highlight=False)
        code = 2
    except Exception as e:  # a bug in fitcli or in user code it called: still no traceback
        if verbose:
            import traceback

            traceback.print_exc()
        err.print(f"fitcli: error: unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                  markup=False, highlight=False)
        err.print("  hint: rerun with --verbose for the traceback", markup=False, highlight=False)
        code = 4
    sys.exit(code)
