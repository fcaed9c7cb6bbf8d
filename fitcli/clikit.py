"""What every command shares: consoles, the options declared once, flag wording, settings from
flags and config, model/data/loss from their strings, progress, and emitting a report.

``fitcli/cli.py`` builds the app from these; commands with modules of their own
(``fitcli/cmd_*.py``) import them from here. Tests swap ``clikit.out`` / ``clikit.err``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from enum import Enum
from typing import Annotated, Any

import typer
from rich.console import Console

from fitcli.errors import GateFailed, Interrupted, UsageError

out = Console(highlight=False)
if not out.is_terminal:  # piped: do not squeeze tables into 80 columns ($COLUMNS leaks into pipes)
    out = Console(highlight=False, width=140)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # one error = one line, never re-wrapped


class Fmt(str, Enum):
    table = "table"
    json = "json"
    markdown = "markdown"
    csv = "csv"
    html = "html"


class Mode(str, Enum):
    zero = "zero"
    mean = "mean"


# ---- shared options, declared once ----------------------------------------------------------
ModelArg = Annotated[str, typer.Argument(help="checkpoint: .safetensors, .pt/.pth, .pt2, or a Hugging Face folder")]
ArchOpt = Annotated[str | None, typer.Option("--arch", help="model factory: package.module:callable or file.py:callable")]
ArchKwOpt = Annotated[str | None, typer.Option("--arch-kwargs", help="JSON object of keyword arguments for --arch")]
TrustOpt = Annotated[bool | None, typer.Option("--trust-checkpoint", help="allow unpickling a whole module (runs code from the file!)")]
DataOpt = Annotated[str | None, typer.Option("--data", help="tensor file, module:callable, random:SHAPE[,n=N][,seed=S], or random:tokens=VOCAB[,len=L][,n=N][,seed=S]")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", min=1, help="samples per batch [default: 64 for tensor "
                                                                            "files, 16 for --text]")]
TEXT_BATCH = 16  # --text samples per batch unless --batch-size says
MaxBatchOpt = Annotated[int | None, typer.Option("--max-batches", min=1, help="stop after N batches")]
LossOpt = Annotated[str | None, typer.Option("--loss", help="cross_entropy, mse, lm (next token; the default for causal LMs), or module:callable(outputs, targets) -> per-sample loss")]
TextOpt = Annotated[str | None, typer.Option("--text", help="text file (one sample per line, or .jsonl with 'text') tokenised with the Hugging Face folder's tokenizer")]
SeqLenOpt = Annotated[int | None, typer.Option("--max-seq-len", min=2, help="truncate --text samples to N tokens [default: 128]")]
LayerOpt = Annotated[list[str] | None, typer.Option("--layer", help="layer name or glob (repeatable) [default: every layer]")]
KindsOpt = Annotated[str | None, typer.Option("--kinds", metavar="KINDS", help="unit kinds, comma-separated, of heads, mlp, hidden, blocks, rows [default: heads,mlp,blocks for a transformer, every layer otherwise]")]
MetricOpt = Annotated[list[str] | None, typer.Option("--metric", help="metric name (repeatable) [default: all whose needs are met]")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu, cuda or auto [default: auto]")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="random seed [default: 0]")]
TauOpt = Annotated[float | None, typer.Option("--tau", help="dead threshold on the dormancy score [default: 0]")]
TopOpt = Annotated[int | None, typer.Option("--top", min=0, help="rows in the ranked table [default: 20]")]
OutputOpt = Annotated[str | None, typer.Option("--output", "-o", help="write the JSON report to this file (atomically)")]
QuietOpt = Annotated[bool | None, typer.Option("--quiet", "-q", help="no progress bar or notes on stderr")]
VerboseOpt = Annotated[bool | None, typer.Option("--verbose", "-v", help="show tracebacks on errors")]
ConfigOpt = Annotated[str | None, typer.Option("--config", help="TOML config file [default: nearest fitcli.toml / pyproject [tool.fitcli]]")]
MaxDeadOpt = Annotated[float | None, typer.Option("--max-dead", help="fail (exit 1) when more than PCT % of units are dead")]
MaxDeadLayerOpt = Annotated[float | None, typer.Option("--max-dead-layer", help="fail (exit 1) when any layer has more than PCT % dead")]
MinCoverageOpt = Annotated[float | None, typer.Option("--min-coverage", help="fail (exit 1) when the audited units own less than PCT % of the model's parameters")]
MaxMemoryOpt = Annotated[str | None, typer.Option("--max-memory", metavar="SIZE", help="audit block by block with at most SIZE of weights in memory (e.g. 2GB, 500MiB), memory-mapped from the .safetensors checkpoint [default: all]")]
ChunkOpt = Annotated[int | None, typer.Option("--chunk-size", min=1, help="units per batched ablation pass [default: from free memory]")]
ModeOpt = Annotated[Mode | None, typer.Option("--mode", help="ablation: zero, or the unit's mean activation [default: zero]")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="cast the model's floating weights for the audit: float32, bfloat16 or float16 (statistics still accumulate in float32/float64) [default: the checkpoint's]")]
DistTimeoutOpt = Annotated[float | None, typer.Option("--dist-timeout", min=0.001, help="under torchrun: seconds a rank waits for the others before giving up (exit 4) [default: $FITCLI_DIST_TIMEOUT, else 120]")]

DEFAULTS: dict[str, Any] = {"format": Fmt.table, "trust_checkpoint": False, "quiet": False, "verbose": False}


def formats(*names: str) -> type[Enum]:
    """The formats one command writes, as the choices of its --format (help and parsing alike)."""
    return Enum("Format", {n: n for n in names}, type=str)  # type: ignore[return-value]


def as_fmt(value: Any, default: Fmt = Fmt.table) -> Fmt:
    """A command's own format choice (or a config file's string) as the shared ``Fmt``."""
    return default if value is None else Fmt(value.value if isinstance(value, Enum) else value)


PAGE_HELP = "html: a self-contained page, written to -o FILE (instead of the JSON report) or to a pipe"
REPORT_FORMATS = formats("table", "json", "markdown", "csv", "html")
ReportFormatOpt = Annotated[REPORT_FORMATS | None, typer.Option(  # type: ignore[valid-type]
    "--format", help=f"what stdout carries: a table, the JSON report, markdown, CSV (one row per unit); {PAGE_HELP} "
    "[default: table]")]


def terminal_page(fmt: Fmt, output: str | None) -> None:
    """--format html with no -o, on a terminal: a page of HTML is not for reading there."""
    if fmt is Fmt.html and not output and sys.stdout.isatty():
        raise UsageError("--format html writes a self-contained page: give -o FILE.html (or pipe stdout to a file)")


def guard(fn):
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


def flag(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def flag_words(name: str, value: str | None = None) -> str:
    """A setting named by an error (``FitcliError.settings``) as the command line spells it:
    ``--max-dead``, ``--batch-size 5``, ``--validate`` (a switch: no value)."""
    if value is None or value == "True":
        return flag(name)
    return f"{flag(name)} {value}"


def said(e) -> tuple[str, str | None]:
    """An error's message and hint in command-line words (its settings as flags)."""
    return e.said(flag_words)


def merge(config: str | None, given: dict[str, Any], fmts: type[Enum] = REPORT_FORMATS) -> dict[str, Any]:
    """Flags win over the config file, which wins over built-in defaults; ``fmts``: the formats
    the command writes (a config file's ``format`` is checked against them)."""
    from fitcli.config import describe, load_config, provenance

    cfg, where = load_config(config)
    merged = dict(DEFAULTS)
    merged.update(cfg)
    merged.update({k: v for k, v in given.items() if v is not None and v != []})
    allowed = [f.value for f in fmts]
    for key, enum, choices in (("format", fmts, allowed), ("ablation_mode", Mode, ["zero", "mean"])):
        if isinstance(merged.get(key), str):
            try:
                merged[key] = enum(merged[key])
            except ValueError as e:
                raise UsageError(f"{flag(key)} {merged[key]!r}: use {' or '.join(choices)}") from e
    merged["format"] = as_fmt(merged.get("format"))
    merged["_config"] = where
    merged["_config_info"] = info = provenance(cfg, where, given)
    if info is not None and not merged.get("quiet") and os.environ.get("RANK", "0") in ("", "0"):  # torchrun rank 0
        err.print("note: " + describe(info), markup=False, style="dim")
    return merged


SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
              "g": 1024**3, "gb": 1000**3, "gib": 1024**3, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}


def parse_size(text: Any) -> int:
    """``2GB``, ``500MiB``, ``1.5G``, ``1048576`` -> bytes (k/M/G alone are binary)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = re.fullmatch(r"\s*(\d{1,15}(?:\.\d{1,9})?)\s*([a-zA-Z]{0,3})\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in SIZE_UNITS or float(m.group(1)) * SIZE_UNITS[unit] < 1:
        raise UsageError(f"--max-memory {text!r}: give a size such as 2GB, 500MiB or 1.5G")
    return int(float(m.group(1)) * SIZE_UNITS[unit])


def checked_settings(merged: dict[str, Any]):
    """The one settings object, checked before anything is loaded (a bad name costs a second)."""
    from fitcli.settings import Settings

    fields = {k: merged.get(k) for k in Settings.names()}
    if fields.get("max_memory") is not None:
        fields["max_memory"] = parse_size(fields["max_memory"])
    if isinstance(fields.get("ablation_mode"), Mode):
        fields["ablation_mode"] = fields["ablation_mode"].value
    if isinstance(fields.get("kinds"), str):
        fields["kinds"] = kinds_list(fields["kinds"])
    return Settings.make(**fields).check()  # an error names its setting; main() words it as the flag


def kinds_list(spec: str) -> list[str]:
    """``heads,mlp`` -> ["heads", "mlp"]; naming none is a usage error."""
    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    if not kinds:
        raise UsageError(f"--kinds {spec!r}: name at least one kind (heads, mlp, hidden, blocks, rows)")
    return kinds


_RANGE = re.compile(r"^\s*(\d{1,12})\s*(?:-\s*(\d{1,12})\s*)?$")


def parse_units(spec: str | None, where: str | None = None) -> list[int] | None:
    """``0,3,7-9`` -> [0, 3, 7, 8, 9] (the library checks each against the layer's size);
    ``where``: how errors name the value [default: ``--units 'SPEC'``]."""
    if spec is None or spec.strip() == "":
        return None
    where = where or f"--units {spec!r}"
    out: list[int] = []
    for part in spec.split(","):
        m = _RANGE.match(part)
        if not m:
            raise UsageError(f"{where}: {part!r} is not an index or a range like 7-9")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if b < a:
            raise UsageError(f"{where}: range {part.strip()} runs backwards")
        if b - a > 10_000_000:
            raise UsageError(f"{where}: range {part.strip()} is too long")
        out.extend(range(a, b + 1))
    return sorted(set(out))


def arch_of(merged: dict[str, Any]) -> dict[str, Any]:
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


def loss_of(spec: str | None) -> Any:
    """--loss NAME or module:callable(outputs, targets) -> what the library takes."""
    if spec is None or ":" not in spec:
        return spec  # a name (checked by the library) or None
    from fitcli.loading import resolve_callable

    fn = resolve_callable(spec, "--loss")

    def loss(outputs: Any, batch: Any) -> Any:
        return fn(outputs, batch.targets)

    loss.fitcli_name = spec  # type: ignore[attr-defined]
    return loss


def data_of(model: str, merged: dict[str, Any], settings) -> Any:
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
    # --batch-size, else text_data's 16 (not the 64 of tensor files: a causal LM's activations, their
    # gradients and the vocabulary-wide logits of 64 x 128 tokens take over 20 GB at 135M parameters)
    return text_data(merged["text"], hf_tokenizer(model), max_seq_len=merged.get("max_seq_len") or 128,
                     batch_size=merged.get("batch_size") or TEXT_BATCH, max_batches=settings.max_batches)


def model_of(model: str, merged: dict[str, Any]):
    from fitcli.api import load

    a = arch_of(merged)
    lazy = merged.get("max_memory") is not None and (str(model).lower().endswith(".safetensors") or os.path.isdir(model))
    return load(model, arch=a["arch"], arch_kwargs=a["arch_kwargs"], trust_checkpoint=bool(merged["trust_checkpoint"]),
                arch_label=a.get("arch_label"), lazy=lazy)


def auto_max_memory(model: str, merged: dict[str, Any]) -> bool:
    """No --max-memory, and a .safetensors model whose weights do not fit the memory available:
    audit it block by block anyway, with half of that memory for the weights (and say so)."""
    if merged.get("max_memory") is not None or not merged.get("arch") or not str(model).lower().endswith(".safetensors"):
        return False
    from fitcli.offload import auto_max_bytes, file_bytes, human

    try:
        cap = auto_max_bytes(file_bytes(model), "cpu")
    except Exception:  # an unreadable file: the loader says what is wrong with it
        return False
    if cap is not None and merged.get("dtype") is None:
        merged["max_memory"] = cap
        if not merged.get("quiet"):
            err.print(f"note: the weights do not fit the memory available: auditing block by block with at most "
                      f"{human(cap)} of them in memory (--max-memory sets the cap)", style="dim")
        return True
    return False


def progress_of(s: dict[str, Any]):
    from fitcli.progress import RichProgress

    return RichProgress() if not s.get("quiet") and sys.stderr.isatty() and is_rank0() else None


def is_rank0() -> bool:
    """True unless this process is a rank other than 0 of a torchrun audit."""
    from fitcli.distributed import rank

    return rank() == 0


def emit_ranked(report, s: dict[str, Any], protect: list[str | None], group: Any = None) -> None:
    """``emit`` on rank 0 only (the others print and write nothing); every rank ends with the
    same outcome: a failed gate, or rank 0 failing to write the report, is every rank's error."""
    if group is None:
        emit(report, s, protect)
        return
    from fitcli import distributed

    d = distributed.of(group)
    with distributed.phase(d):
        if d.rank == 0:
            emit(report, s, protect)
        else:
            g = report.get("gate")
            if g and not g["passed"]:
                raise GateFailed("gate failed: " + "; ".join(g["failures"]))


def write_output(path: str, text: str, protect: list[str | None]) -> None:
    """``-o PATH``: written atomically, never over an input; the refusal names the flag."""
    from fitcli import report as rep

    rep.write_atomic(path, text, protect=[p for p in protect if p])  # a refusal names its setting: output


def emit(report, s: dict[str, Any], protect: list[str | None]) -> None:
    """The report to stdout in --format, and to --output: the JSON report, or with --format html
    the HTML page (``fitcli render`` turns a saved JSON report into HTML later)."""
    from fitcli import report as rep
    from fitcli.render import render_csv, render_markdown, render_report

    data = report.to_dict()
    if s.get("_config_info"):  # the config file read, and the settings that came from it
        data["config"] = {k: s["_config_info"][k] for k in ("path", "keys")}
    fmt = s["format"]
    terminal_page(fmt, s.get("output"))
    if fmt is Fmt.html:
        from fitcli.render.html import render_html

        page = render_html(data)
        if not s.get("output"):
            sys.stdout.write(page)
    if s.get("output"):
        write_output(s["output"], page if fmt is Fmt.html else rep.dumps(data), protect)
    if fmt is Fmt.json:
        sys.stdout.write(rep.dumps(data))
    elif fmt is Fmt.markdown:
        sys.stdout.write(render_markdown(data))
    elif fmt is Fmt.csv:
        sys.stdout.write(render_csv(data))
    elif fmt is Fmt.table:
        out.print(render_report(data, width=out.width))
    if not s.get("quiet"):
        for note in data.get("discovery", {}).get("notes", []):
            err.print(f"note: {note}", style="dim")
        if s.get("output"):
            err.print(f"report written to {s['output']}", style="dim")
    g = data.get("gate")
    if g and not g["passed"]:
        raise GateFailed("gate failed: " + "; ".join(g["failures"]))




REPORT_SCHEMA, COMPARE_SCHEMA = "fitcli.report/1", "fitcli.compare/1"
KIND_WORDS = {"binary": "a binary file (a checkpoint?), not JSON", "report": "an audit report (fitcli score -o)",
              "comparison": "a comparison report (fitcli compare -o)", "history": "a training history (JSON lines)",
              "json": "JSON, but not a fitcli report", "text": "a text file, not JSON"}


def file_kind(path: str) -> str | None:
    """What a file handed to gate, render or history holds: report, comparison, history, json,
    text or binary; None when it cannot be opened (the reader then says why)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3 or b"\0" in head:
            return "binary"
        text = head[:e.start].decode("utf-8")
    if "\0" in text:
        return "binary"
    if not text.lstrip().startswith("{"):
        return "text"
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (ValueError, OSError, RecursionError):
        first = text.lstrip().splitlines()[0]
        try:
            return "history" if isinstance(json.loads(first), dict) else "text"
        except (ValueError, RecursionError):
            return "text"
    if isinstance(obj, dict) and str(obj.get("format", "")).startswith("fitcli.history/"):
        return "history"  # a history of one record
    schema = obj.get("schema") if isinstance(obj, dict) else None
    return {REPORT_SCHEMA: "report", COMPARE_SCHEMA: "comparison"}.get(schema, "json")


def expect_file(path: str, kinds: tuple[str, ...], purpose: str) -> str | None:
    """``path`` holds one of ``kinds``, else an InputError (exit 3) saying what it holds and what
    the command reads (``purpose``); returns the kind (None: unreadable, the reader says why)."""
    from fitcli.errors import InputError

    kind = file_kind(path)
    if kind is not None and kind not in kinds:
        raise InputError(f"{path} is {KIND_WORDS[kind]}: {purpose}")
    return kind


# ---- help in Typer's usual style --------------------------------------------------------------
TYPE_METAVARS = {int: "INTEGER", float: "FLOAT", str: "TEXT", bool: "BOOLEAN"}


def metavar_of(descriptor: Any) -> str:
    """``INTEGER``, ``FLOAT``, ``TEXT`` or ``[a|b|c]`` for an option's type (as Click writes them)."""
    if descriptor.is_choice:
        return "[" + "|".join(str(getattr(c, "value", c)) for c in descriptor.choices or ()) + "]"
    ann = descriptor.annotation
    args = getattr(ann, "__args__", None)
    if descriptor.is_list and args:
        ann = args[0]
    return TYPE_METAVARS.get(ann, "VALUE")


class UsualArgument(typer.core.TyperArgument):
    """An argument shown as ``MODEL`` (``[NAME]`` when optional), with no ``<str>`` beside it."""

    def _usage_display_name(self) -> str:
        name = self.metavar or self.name.upper()
        name = name if self.required else f"[{name}]"
        return name + ("..." if self.nargs != 1 else "")

    def display_type_rich(self, ctx: Any) -> str | None:
        return None


def usual_help(command: Any) -> Any:
    """The built Click command with Typer's usual help: every argument ``NAME``, every option's
    value ``INTEGER``/``FLOAT``/``TEXT``/``[choices]``; returns it."""
    for cmd in [command, *getattr(command, "commands", {}).values()]:
        for p in cmd.params:
            if isinstance(p, typer.core.TyperArgument):
                p.__class__ = UsualArgument
                p.metavar = p.metavar or p.name.upper()
            elif not getattr(p, "is_flag", False) and not getattr(p, "count", False) and p.metavar is None:
                p.metavar = metavar_of(p.type_descriptor)
    return command


def is_click_error(e: BaseException) -> bool:
    """A usage error found by Typer's parser (bad value, unknown option, missing argument)."""
    return type(e).__module__.startswith(("typer", "click")) and hasattr(e, "format_message") \
        and isinstance(getattr(e, "exit_code", None), int)


def click_error_lines(e: Any) -> list[str]:
    """A parser error as fitcli's one-line error (and a hint naming the command's --help)."""
    msg = " ".join(line.strip() for line in str(e.format_message()).splitlines() if line.strip())
    ctx = getattr(e, "ctx", None)
    where = ctx.command_path if ctx is not None else "fitcli"
    return [f"fitcli: error: {msg}", f"  hint: `{where} --help` lists the options"]
