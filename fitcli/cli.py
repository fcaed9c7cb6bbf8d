"""The command line: parse, call ``fitcli.api``, render. Nothing else lives here.

stdout carries only the result (table, JSON, markdown, CSV); progress, notes and errors go to
stderr. ``main()`` maps the exception hierarchy to exit codes (``spec/cli.md``).
"""

from __future__ import annotations

import functools
import json
import os
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
DataOpt = Annotated[str | None, typer.Option("--data", help="tensor file, module:callable, or random:SHAPE[,n=N][,seed=S]")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", min=1, help="samples per batch for tensor files [default: 64]")]
MaxBatchOpt = Annotated[int | None, typer.Option("--max-batches", min=1, help="stop after N batches")]
LossOpt = Annotated[str | None, typer.Option("--loss", help="cross_entropy, mse, or module:callable(outputs, targets) -> per-sample loss")]
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
ChunkOpt = Annotated[int | None, typer.Option("--chunk-size", min=1, help="units per batched ablation pass [default: from free memory]")]
ModeOpt = Annotated[Mode | None, typer.Option("--mode", help="ablation: zero, or the unit's mean activation [default: zero]")]

DEFAULTS: dict[str, Any] = {
    "batch_size": 64, "device": "auto", "seed": 0, "tau": 0.0, "top": 20, "format": Fmt.table,
    "mode": Mode.zero, "trust_checkpoint": False, "quiet": False, "verbose": False,
}


def _guard(fn):
    """Ctrl-C inside a command becomes Interrupted (exit 130), not Click's 'Aborted!' (exit 1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as e:
            raise Interrupted(2) from e

    return wrapper


def _settings(config: str | None, given: dict[str, Any]) -> dict[str, Any]:
    """Flags win over the config file, which wins over defaults."""
    from fitcli.config import load_config

    cfg, where = load_config(config)
    merged = dict(DEFAULTS)
    merged.update({k: v for k, v in cfg.items()})
    merged.update({k: v for k, v in given.items() if v is not None and v != []})
    if isinstance(merged.get("format"), str):
        try:
            merged["format"] = Fmt(merged["format"])
        except ValueError as e:
            raise UsageError(f"format {merged['format']!r}: use table, json, markdown or csv") from e
    if isinstance(merged.get("mode"), str):
        try:
            merged["mode"] = Mode(merged["mode"])
        except ValueError as e:
            raise UsageError(f"mode {merged['mode']!r}: use zero or mean") from e
    if isinstance(merged.get("arch_kwargs"), dict):
        merged["arch_kwargs"] = json.dumps(merged["arch_kwargs"])
    merged["_config"] = where
    return merged


def _progress(s: dict[str, Any]) -> bool:
    return not s.get("quiet") and sys.stderr.isatty()


def _emit(report: dict, s: dict[str, Any], protect: list[str | None]) -> None:
    from fitcli import report as rep
    from fitcli.render import render_csv, render_markdown, render_report

    if s.get("output"):
        rep.write_atomic(s["output"], rep.dumps(report), protect=[p for p in protect if p])
    fmt = s["format"]
    if fmt is Fmt.json:
        sys.stdout.write(rep.dumps(report))
    elif fmt is Fmt.markdown:
        sys.stdout.write(render_markdown(report))
    elif fmt is Fmt.csv:
        sys.stdout.write(render_csv(report))
    else:
        out.print(render_report(report))
    if not s.get("quiet"):
        for note in report.get("discovery", {}).get("notes", []):
            err.print(f"note: {note}", style="dim")
        if s.get("output"):
            err.print(f"report written to {s['output']}", style="dim")
    g = report.get("gate")
    if g and not g["passed"]:
        raise GateFailed("gate failed: " + "; ".join(g["failures"]))


@app.command()
@_guard
def score(
    model: ModelArg, arch: ArchOpt = None, arch_kwargs: ArchKwOpt = None, trust_checkpoint: TrustOpt = None,
    data: DataOpt = None, batch_size: BatchOpt = None, max_batches: MaxBatchOpt = None, loss: LossOpt = None,
    layer: LayerOpt = None, metric: MetricOpt = None, device: DeviceOpt = None, seed: SeedOpt = None,
    tau: TauOpt = None, top: TopOpt = None,
    rank_by: Annotated[str | None, typer.Option("--rank-by", help="metric for the ranked table, or auto (best validated) [default: taylor, else act_mean, else weight_norm]")] = None,
    fmt: FormatOpt = None, output: OutputOpt = None,
    baseline: Annotated[str | None, typer.Option("--baseline", help="earlier checkpoint: enables weight_change")] = None,
    max_dead: MaxDeadOpt = None, max_dead_layer: MaxDeadLayerOpt = None, mode: ModeOpt = None,
    chunk_size: ChunkOpt = None,
    validate: Annotated[bool | None, typer.Option("--validate", help="measure each metric against exact ablation")] = None,
    validate_units: Annotated[int | None, typer.Option("--validate-units", min=2, help="ablate a stratified sample of K units per layer")] = None,
    quiet: QuietOpt = None, verbose: VerboseOpt = None, config: ConfigOpt = None,
) -> None:
    """Score every metric, show ranked dead-weight tables, write a report, optionally gate."""
    from fitcli import api

    s = _settings(config, dict(arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint, data=data,
                               batch_size=batch_size, max_batches=max_batches, loss=loss, layers=layer,
                               metrics=metric, device=device, seed=seed, tau=tau, top=top, rank_by=rank_by,
                               format=fmt, output=output, baseline=baseline, max_dead=max_dead,
                               max_dead_layer=max_dead_layer, mode=mode, chunk_size=chunk_size,
                               validate=validate, validate_units=validate_units, quiet=quiet, verbose=verbose))
    report = api.score(
        model, arch=s.get("arch"), arch_kwargs=s.get("arch_kwargs"), trust_checkpoint=s["trust_checkpoint"],
        data=s.get("data"), batch_size=s["batch_size"], max_batches=s.get("max_batches"), loss=s.get("loss"),
        layers=s.get("layers"), metrics=s.get("metrics"), device=s["device"], seed=s["seed"], tau=s["tau"],
        top=s["top"], rank_by=s.get("rank_by"), baseline=s.get("baseline"), max_dead=s.get("max_dead"),
        max_dead_layer=s.get("max_dead_layer"), progress=_progress(s), ablation_mode=s["mode"].value,
        chunk_size=s.get("chunk_size"), validate=bool(s.get("validate")), validate_units=s.get("validate_units"),
    )
    _emit(report, s, [model, s.get("data"), s.get("baseline"), s.get("_config")])


@app.command()
@_guard
def ablate(
    model: ModelArg,
    layer: Annotated[list[str] | None, typer.Option("--layer", help="layer name or glob to ablate (required, repeatable)")] = None,
    units: Annotated[str | None, typer.Option("--units", help="units to ablate, e.g. 0,3,7-9 [default: all]")] = None,
    mode: ModeOpt = None,
    whole_layer: Annotated[bool | None, typer.Option("--whole-layer", help="also ablate each entire layer at once")] = None,
    chunk_size: ChunkOpt = None, arch: ArchOpt = None, arch_kwargs: ArchKwOpt = None,
    trust_checkpoint: TrustOpt = None, data: DataOpt = None, batch_size: BatchOpt = None,
    max_batches: MaxBatchOpt = None, loss: LossOpt = None, device: DeviceOpt = None, seed: SeedOpt = None,
    tau: TauOpt = None, top: TopOpt = None, fmt: FormatOpt = None, output: OutputOpt = None,
    quiet: QuietOpt = None, verbose: VerboseOpt = None, config: ConfigOpt = None,
) -> None:
    """Exact ablation of each unit (and optionally whole layers): the loss change when it is masked."""
    from fitcli import api

    s = _settings(config, dict(layers=layer, units=units, mode=mode, whole_layer=whole_layer, chunk_size=chunk_size,
                               arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint, data=data,
                               batch_size=batch_size, max_batches=max_batches, loss=loss, device=device, seed=seed,
                               tau=tau, top=top, format=fmt, output=output, quiet=quiet, verbose=verbose))
    if not s.get("layers"):
        raise UsageError("ablate needs --layer NAME (see `fitcli inspect MODEL` for the names)")
    report = api.ablate(
        model, layers=s["layers"], units=s.get("units"), mode=s["mode"].value, whole_layer=bool(s.get("whole_layer")),
        chunk_size=s.get("chunk_size"), arch=s.get("arch"), arch_kwargs=s.get("arch_kwargs"),
        trust_checkpoint=s["trust_checkpoint"], data=s.get("data"), batch_size=s["batch_size"],
        max_batches=s.get("max_batches"), loss=s.get("loss"), device=s["device"], seed=s["seed"], tau=s["tau"],
        top=s["top"], progress=_progress(s),
    )
    _emit(report, s, [model, s.get("data"), s.get("_config")])


@app.command()
@_guard
def gate(
    report: Annotated[str, typer.Argument(help="a JSON report written by `fitcli score --output`")],
    max_dead: MaxDeadOpt = None, max_dead_layer: MaxDeadLayerOpt = None, fmt: FormatOpt = None,
    quiet: QuietOpt = None, verbose: VerboseOpt = None,
) -> None:
    """CI gate on a saved report: exit 1 when a dead-unit threshold is exceeded."""
    from fitcli import api
    from fitcli.render import render_markdown

    rep = api.gate(report, max_dead, max_dead_layer)
    g = rep["gate"]
    if fmt is Fmt.json:
        sys.stdout.write(json.dumps(g, indent=2) + "\n")
    elif fmt is Fmt.markdown:
        sys.stdout.write(render_markdown(rep))
    else:
        s = rep["summary"]
        out.print(f"{s['dead']}/{s['units']} units dead ({100 * s['dead_fraction']:.2f}%): "
                  + ("gate passed" if g["passed"] else "gate FAILED"))
        for f in g["failures"]:
            out.print(f"  {f}")
    if not g["passed"]:
        raise GateFailed("gate failed: " + "; ".join(g["failures"]))


@app.command()
@_guard
def inspect(
    model: ModelArg, arch: ArchOpt = None, arch_kwargs: ArchKwOpt = None, trust_checkpoint: TrustOpt = None,
    data: DataOpt = None, fmt: FormatOpt = None, quiet: QuietOpt = None, verbose: VerboseOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Layers, unit counts, activation points and the format found in a checkpoint."""
    from fitcli import api
    from fitcli.render import render_inspect

    s = _settings(config, dict(arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint, data=data,
                               format=fmt, quiet=quiet, verbose=verbose))
    info = api.inspect(model, arch=s.get("arch"), arch_kwargs=s.get("arch_kwargs"),
                       trust_checkpoint=s["trust_checkpoint"], data=s.get("data"))
    if s["format"] is Fmt.json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    elif s["format"] in (Fmt.markdown, Fmt.csv):
        sep = "|" if s["format"] is Fmt.markdown else ","
        rows = [["layer", "type", "units", "activation_point", "parameters", "final"]]
        rows += [[x["name"], x["type"], str(x["units"]), x["activation_point"], str(x["parameters"]), str(x["final"]).lower()]
                 for x in info["layers"]]
        if s["format"] is Fmt.markdown:
            lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        else:
            lines = [sep.join(r) for r in rows]
        sys.stdout.write("\n".join(lines) + "\n")
    else:
        out.print(render_inspect(info))


@app.command()
@_guard
def metrics(fmt: FormatOpt = None) -> None:
    """The metric registry: name, needs, cost, one-line description (plugins included)."""
    from fitcli.metrics.registry import load_registry
    from fitcli.render import render_metrics

    rows = []
    for name, e in load_registry().items():
        if e.cls is None:
            rows.append({"name": name, "entry_point": e.value, "error": e.error})
        else:
            rows.append({"name": name, "entry_point": e.value, "needs": sorted(e.cls.needs), "cost": e.cls.cost,
                         "description": e.cls.description})
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
            err.print(f"fitcli: error: {e.message}", markup=False, highlight=False)
        else:
            err.print(f"fitcli: {e.message}", markup=False, highlight=False)
        if e.hint:
            err.print(f"  hint: {e.hint}", markup=False, highlight=False)
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
