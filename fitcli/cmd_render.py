"""``fitcli render REPORT.json``: a saved report as an HTML page (or markdown, CSV, a table)."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from fitcli import clikit
from fitcli.clikit import Fmt, QuietOpt, VerboseOpt, as_fmt, formats
from fitcli.errors import InputError, UsageError

SHORT = "Render a saved JSON report as a self-contained HTML page, markdown, CSV or a table."
EXAMPLES = """Examples:

\b
  fitcli score model.pt --arch models.py:Net --data val.pt -o report.json
  fitcli render report.json -o report.html
  fitcli render report.json --format markdown >> "$GITHUB_STEP_SUMMARY"
  fitcli render report.json --format csv -o units.csv
"""

COMPARE_SCHEMA = clikit.COMPARE_SCHEMA
RENDER_FORMATS = formats("html", "markdown", "csv", "table")
RenderFormatOpt = Annotated[RENDER_FORMATS | None, typer.Option(  # type: ignore[valid-type]
    "--format", help="html (a self-contained page: to -o FILE or a pipe), markdown, csv or table [default: html]")]
PURPOSE = "render reads the JSON report that `fitcli score/ablate/compare -o FILE.json` writes"


def read_any(path: str) -> dict:
    """An audit report (checked against its schema) or a comparison report."""
    from fitcli import report as rep

    try:
        with open(path, encoding="utf-8") as f:
            head = json.load(f)
    except FileNotFoundError as e:
        raise InputError(f"report not found: {path}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read report {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from e
    if isinstance(head, dict) and head.get("schema") == COMPARE_SCHEMA:
        return head
    return rep.read(path)


def command(
    report: Annotated[str, typer.Argument(metavar="REPORT", help="a JSON report written by `fitcli score/ablate/compare --output`")],
    fmt: RenderFormatOpt = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="write the rendered report to this file (atomically) instead of stdout")] = None,
    quiet: QuietOpt = None, verbose: VerboseOpt = None,
) -> None:
    """Render a saved JSON report: a self-contained HTML page (default), markdown, CSV or a table."""
    from fitcli.render import render_csv, render_markdown, render_report

    fmt = as_fmt(fmt, Fmt.html)
    clikit.terminal_page(fmt, output)
    clikit.expect_file(report, ("report", "comparison"), PURPOSE)
    data = read_any(report)
    compare = data.get("schema") == COMPARE_SCHEMA
    if compare and fmt is not Fmt.html:
        raise UsageError(f"--format {fmt.value}: a comparison report renders as html only")
    if fmt is Fmt.html:
        from fitcli.render.html import render_html

        text = render_html(data)
    elif fmt is Fmt.markdown:
        text = render_markdown(data)
    elif fmt is Fmt.csv:
        text = render_csv(data)
    elif output:
        raise UsageError("--format table prints to the terminal; use html, markdown or csv with --output")
    else:
        clikit.out.print(render_report(data, width=clikit.out.width))
        return
    if output:
        clikit.write_output(output, text, [report])
        if not quiet:
            clikit.err.print(f"{fmt.value} written to {output}", style="dim")
    else:
        sys.stdout.write(text)
