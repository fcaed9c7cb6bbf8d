"""``fitcli history FILE``: a training history written by ``fitcli.Tracker``, read back: dead
fraction per layer over steps, and the step each unit died at (dead from that record through the
last one)."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from fitcli import clikit
from fitcli.clikit import Fmt, LayerOpt, QuietOpt, VerboseOpt, as_fmt, formats

SHORT = "A fitcli.Tracker training history: dead fraction per layer over steps, when each unit died."
EXAMPLES = """Examples:

\b
  fitcli history history.jsonl
  fitcli history history.jsonl --layer 'conv*' --format markdown >> "$GITHUB_STEP_SUMMARY"
  fitcli history history.jsonl --format csv > dead_over_steps.csv
"""

HISTORY_FORMATS = formats("table", "json", "markdown", "csv")
HistoryFormatOpt = Annotated[HISTORY_FORMATS | None, typer.Option(  # type: ignore[valid-type]
    "--format", help="table, json, markdown, or csv (dead fraction per layer and step) [default: table]")]
PURPOSE = "history reads the JSON-lines file that fitcli.Tracker writes during training"


def command(
    file: Annotated[str, typer.Argument(metavar="FILE", help="a history file written by fitcli.Tracker (JSON lines)")],
    layer: LayerOpt = None, fmt: HistoryFormatOpt = None, quiet: QuietOpt = None, verbose: VerboseOpt = None,
) -> None:
    """Dead fraction per layer over training steps, and the step each unit died at, from a
    fitcli.Tracker history file."""
    clikit.expect_file(file, ("history", "json", "text"), PURPOSE + (" (`fitcli gate` and `fitcli render` read reports)"))
    from fitcli.history import history_summary, read_history
    from fitcli.render.history import render_history, render_history_csv, render_history_markdown

    summary = history_summary(read_history(file), layer)
    summary["file"] = file
    fmt = as_fmt(fmt)
    if fmt is Fmt.json:
        sys.stdout.write(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    elif fmt is Fmt.markdown:
        sys.stdout.write(render_history_markdown(summary))
    elif fmt is Fmt.csv:
        sys.stdout.write(render_history_csv(summary))
    else:
        clikit.out.print(render_history(summary))
