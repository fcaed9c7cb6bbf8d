"""``fitcli history FILE``: a training history written by ``fitcli.Tracker``, read back: dead
fraction per layer over steps, and the step each unit died at (dead from that record through the
last one)."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from fitcli import clikit
from fitcli.clikit import Fmt, FormatOpt, LayerOpt, QuietOpt, VerboseOpt, no_html

EXAMPLES = """Examples:

\b
  fitcli history history.jsonl
  fitcli history history.jsonl --layer 'conv*' --format markdown >> "$GITHUB_STEP_SUMMARY"
  fitcli history history.jsonl --format csv > dead_over_steps.csv
"""


def command(
    file: Annotated[str, typer.Argument(help="a history file written by fitcli.Tracker (JSON lines)")],
    layer: LayerOpt = None, fmt: FormatOpt = None, quiet: QuietOpt = None, verbose: VerboseOpt = None,
) -> None:
    """Dead fraction per layer over training steps, and the step each unit died at, from a
    fitcli.Tracker history file."""
    no_html(fmt)
    from fitcli.render.history import render_history, render_history_csv, render_history_markdown
    from fitcli.tracker import history_summary, read_history

    summary = history_summary(read_history(file), layer)
    summary["file"] = file
    fmt = fmt or Fmt.table
    if fmt is Fmt.json:
        sys.stdout.write(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    elif fmt is Fmt.markdown:
        sys.stdout.write(render_history_markdown(summary))
    elif fmt is Fmt.csv:
        sys.stdout.write(render_history_csv(summary))
    else:
        clikit.out.print(render_history(summary))
