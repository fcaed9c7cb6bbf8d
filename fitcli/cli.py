"""The command line: parse, call ``fitcli.api``, render. Nothing else lives here.

stdout carries only the result (table, JSON, markdown, CSV); progress, notes and errors go to
stderr. ``main()`` maps the exception hierarchy to exit codes (``spec/cli.md``). What the
commands share (options, consoles, settings from flags) is in ``fitcli/clikit.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from typing import Annotated

import typer

from fitcli import __version__, clikit
from fitcli.clikit import (
    ArchKwOpt,
    ArchOpt,
    BatchOpt,
    ChunkOpt,
    ConfigOpt,
    DataOpt,
    DeviceOpt,
    DistTimeoutOpt,
    DtypeOpt,
    Fmt,
    FormatOpt,
    LayerOpt,
    LossOpt,
    MaxBatchOpt,
    MaxDeadLayerOpt,
    MaxDeadOpt,
    MaxMemoryOpt,
    MetricOpt,
    MinCoverageOpt,
    ModelArg,
    ModeOpt,
    OutputOpt,
    QuietOpt,
    SeedOpt,
    SeqLenOpt,
    TauOpt,
    TextOpt,
    TopOpt,
    TrustOpt,
    VerboseOpt,
    auto_max_memory,
    checked_settings,
    cli_words,
    data_of,
    emit,
    emit_ranked,
    guard,
    loss_of,
    merge,
    model_of,
    no_html,
    parse_units,
    progress_of,
)
from fitcli.errors import FitcliError, GateFailed, Interrupted, UsageError
from fitcli.runtime import keep_freed_memory, quiet_hf

app = typer.Typer(
    name="fitcli",
    help="Audit a trained PyTorch model: which neurons and layers contribute, and which are dead weight.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

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
@guard
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
    dtype: DtypeOpt = None, dist_timeout: DistTimeoutOpt = None, max_memory: MaxMemoryOpt = None,
    quiet: QuietOpt = None, verbose: VerboseOpt = None, config: ConfigOpt = None,
) -> None:
    """Score every metric, show ranked dead-weight tables, write a report, optionally gate.
    Under torchrun the batches are sharded over the ranks; rank 0 prints and writes the report."""
    m = merge(config, dict(arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint, data=data,
                            text=text, max_seq_len=max_seq_len,
                            batch_size=batch_size, max_batches=max_batches, loss=loss, layers=layer,
                            metrics=metric, device=device, seed=seed, tau=tau, top=top, rank_by=rank_by,
                            format=fmt, output=output, baseline=baseline, max_dead=max_dead,
                            max_dead_layer=max_dead_layer, min_coverage=min_coverage, ablation_mode=mode,
                            chunk_size=chunk_size, dtype=dtype, dist_timeout=dist_timeout, max_memory=max_memory,
                            validate=validate, validate_units=validate_units, quiet=quiet, verbose=verbose))
    settings = checked_settings(m)  # every setting checked before torch is even imported
    if auto_max_memory(model, m):  # too big for memory: block by block
        settings = checked_settings(m)
    from fitcli import api, distributed

    with distributed.launched(settings.device, m.get("dist_timeout")) as (group, device):
        settings = dataclasses.replace(settings, device=device)
        with distributed.phase(distributed.of(group)):  # a checkpoint one rank cannot read stops all
            loss_fn = loss_of(m.get("loss"))
            loaded = model_of(model, m)
            base = api.load(m["baseline"]) if m.get("baseline") else None
        report = api.audit(loaded, data_of(model, m, settings), loss=loss_fn, baseline=base, settings=settings,
                           progress=progress_of(m), group=group)
        emit_ranked(report, m, [model, m.get("data"), m.get("text"), m.get("baseline"), m.get("_config")], group)


@app.command(epilog=ABLATE_EXAMPLES)
@guard
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
    dtype: DtypeOpt = None, dist_timeout: DistTimeoutOpt = None, max_memory: MaxMemoryOpt = None,
    quiet: QuietOpt = None, verbose: VerboseOpt = None, config: ConfigOpt = None,
) -> None:
    """Exact ablation of each unit (and optionally whole layers): the loss change when it is masked.
    Under torchrun the batches are sharded over the ranks; rank 0 prints and writes the report."""
    m = merge(config, dict(layers=layer, units=units, ablation_mode=mode, whole_layer=whole_layer,
                            chunk_size=chunk_size, arch=arch, arch_kwargs=arch_kwargs,
                            trust_checkpoint=trust_checkpoint, data=data, text=text, max_seq_len=max_seq_len,
                            batch_size=batch_size, max_batches=max_batches, loss=loss, device=device, seed=seed,
                            tau=tau, top=top, format=fmt, output=output, dtype=dtype, dist_timeout=dist_timeout, max_memory=max_memory,
                            quiet=quiet, verbose=verbose))
    if blocks:
        from fitcli.distributed import torchrun_env

        if torchrun_env() is not None:
            raise UsageError("--blocks does not run under torchrun: run it as one process")
        settings = checked_settings({k: v for k, v in m.items() if k != "layers"})
        from fitcli import api

        report = api.blocks(model_of(model, m), data_of(model, m, settings), greedy=greedy or 0,
                            loss=loss_of(m.get("loss")), settings=settings, progress=progress_of(m))
        emit(report, m, [model, m.get("data"), m.get("text"), m.get("_config")])
        return
    if m.get("units") == "heads":  # every attention head of the model (the layers named *.heads)
        m["layers"], m["units"] = [*(m.get("layers") or []), "*.heads"], None
    if not m.get("layers"):
        raise UsageError("ablate needs --layer NAME (see `fitcli inspect MODEL` for the names)")
    settings = checked_settings(m)
    if auto_max_memory(model, m):  # too big for memory: block by block
        settings = checked_settings(m)
    unit_list = parse_units(m.get("units"))
    if not m.get("data") and not m.get("text"):
        raise UsageError("ablate needs --data (or --text)")
    from fitcli import api, distributed

    with distributed.launched(settings.device, m.get("dist_timeout")) as (group, device):
        settings = dataclasses.replace(settings, device=device)
        with distributed.phase(distributed.of(group)):  # a checkpoint one rank cannot read stops all
            loss_fn = loss_of(m.get("loss"))
            loaded = model_of(model, m)
        try:
            report = api.ablate(loaded, data_of(model, m, settings), units=unit_list, loss=loss_fn,
                                settings=settings, progress=progress_of(m), group=group)
        except UsageError as e:
            if e.message.startswith("unit "):
                e.message = f"--units {m.get('units')!r}: {e.message}"
            raise
        emit_ranked(report, m, [model, m.get("data"), m.get("text"), m.get("_config")], group)


@app.command(epilog=GATE_EXAMPLES)
@guard
def gate(
    report: Annotated[str, typer.Argument(help="a JSON report written by `fitcli score --output`")],
    max_dead: MaxDeadOpt = None, max_dead_layer: MaxDeadLayerOpt = None, min_coverage: MinCoverageOpt = None,
    fmt: FormatOpt = None, quiet: QuietOpt = None, verbose: VerboseOpt = None,
) -> None:
    """CI gate on a saved report: exit 1 when a dead-unit threshold is exceeded, when no unit was
    audited, or when the audit covers too little of the model (--min-coverage)."""
    no_html(fmt)
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
        clikit.out.print(f"{s['dead']}/{s['units']} units dead ({100 * s['dead_fraction']:.2f}%): "
                  + ("gate passed" if g["passed"] else "gate FAILED"))
        for f in g["failures"]:
            clikit.out.print(f"  {cli_words(f)}")
    if not g["passed"]:
        raise GateFailed("gate failed: " + "; ".join(g["failures"]))


@app.command(epilog=INSPECT_EXAMPLES)
@guard
def inspect(
    model: ModelArg, arch: ArchOpt = None, arch_kwargs: ArchKwOpt = None, trust_checkpoint: TrustOpt = None,
    data: DataOpt = None, text: TextOpt = None, max_seq_len: SeqLenOpt = None, fmt: FormatOpt = None,
    quiet: QuietOpt = None, verbose: VerboseOpt = None, config: ConfigOpt = None,
) -> None:
    """Layers, unit counts, activation points and the format found in a checkpoint."""
    from fitcli import api
    from fitcli.render import render_inspect

    m = merge(config, dict(arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint, data=data,
                            text=text, max_seq_len=max_seq_len, format=fmt, quiet=quiet, verbose=verbose))
    no_html(m["format"])
    info = api.inspect(model_of(model, m), data_of(model, m, checked_settings(m))).to_dict()
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
        clikit.out.print(render_inspect(info))


@app.command(epilog=METRICS_EXAMPLES)
@guard
def metrics(fmt: FormatOpt = None) -> None:
    """The metric registry: name, direction, needs, cost, one-line description (plugins included)."""
    no_html(fmt)
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
        clikit.out.print(render_metrics(rows))


# Commands with a module of their own, fitcli/cmd_<name>.py: each defines ``command`` (its Typer
# signature and docstring) and ``EXAMPLES`` (the --help epilog). Registered in this order.
COMMAND_MODULES: tuple[str, ...] = ("compare", "prune", "history", "render")


def _register(name: str) -> None:
    import importlib

    mod = importlib.import_module(f"fitcli.cmd_{name}")
    app.command(name=name, epilog=mod.EXAMPLES)(guard(mod.command))


for _name in COMMAND_MODULES:
    _register(_name)


def _version(value: bool) -> None:
    if value:
        clikit.out.print(f"fitcli {__version__}")
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
    quiet_hf(verbose)  # Hugging Face prints its own bars and warnings: not unless --verbose
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
            clikit.err.print(f"fitcli: error: {cli_words(e.message)}", markup=False, highlight=False)
        else:
            clikit.err.print(f"fitcli: {cli_words(e.message)}", markup=False, highlight=False)
        if e.hint:
            clikit.err.print(f"  hint: {cli_words(e.hint)}", markup=False, highlight=False)
        code = e.exit_code
    except ValueError as e:  # e.g. a NUL byte in a path argument
        if verbose:
            import traceback

            traceback.print_exc()
        clikit.err.print(f"fitcli: error: invalid argument: {str(e).splitlines()[0] if str(e) else ''}",
                  markup=False, highlight=False)
        code = 2
    except Exception as e:  # a bug in fitcli or in user code it called: still no traceback
        if verbose:
            import traceback

            traceback.print_exc()
        clikit.err.print(f"fitcli: error: unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                  markup=False, highlight=False)
        clikit.err.print("  hint: rerun with --verbose for the traceback", markup=False, highlight=False)
        code = 4
    sys.exit(code)
