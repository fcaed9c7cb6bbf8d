"""``fitcli gate REPORT``: a CI gate on a saved report (exit 1 when a threshold is exceeded)."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from fitcli import clikit
from fitcli.clikit import (
    MaxDeadLayerOpt,
    MaxDeadOpt,
    MinCoverageOpt,
    QuietOpt,
    VerboseOpt,
    as_fmt,
    formats,
)
from fitcli.errors import GateFailed

SHORT = "CI gate on a saved report: exit 1 above a dead-unit threshold or below a coverage floor."
EXAMPLES = """Examples:

\b
  fitcli score model.pt --arch models.py:Net --data val.pt -o report.json
  fitcli gate report.json --max-dead 5 --max-dead-layer 20
  fitcli gate report.json --format markdown >> "$GITHUB_STEP_SUMMARY"
"""

GATE_FORMATS = formats("table", "json", "markdown")
ReportArg = Annotated[str, typer.Argument(metavar="REPORT", help="a JSON report written by `fitcli score -o report.json`")]
GateFormatOpt = Annotated[GATE_FORMATS | None, typer.Option(  # type: ignore[valid-type]
    "--format", help="table (the verdict), json (the verdict as JSON) or markdown (the report's summary) "
    "[default: table]")]
PURPOSE = "gate reads the JSON report that `fitcli score -o report.json` writes"


def command(
    report: ReportArg, max_dead: MaxDeadOpt = None, max_dead_layer: MaxDeadLayerOpt = None,
    min_coverage: MinCoverageOpt = None, fmt: GateFormatOpt = None, quiet: QuietOpt = None,
    verbose: VerboseOpt = None,
) -> None:
    """CI gate on a saved report: exit 1 when a dead-unit threshold is exceeded, when no unit was
    audited, or when the audit covers too little of the model (--min-coverage)."""
    from fitcli import api
    from fitcli import report as rep
    from fitcli.render import render_markdown

    fmt = as_fmt(fmt)
    from fitcli.settings import Settings

    Settings.make(max_dead=max_dead, max_dead_layer=max_dead_layer, min_coverage=min_coverage).check()
    clikit.expect_file(report, ("report",), PURPOSE)
    data = rep.read(report)
    result = api.gate(data, max_dead, max_dead_layer, min_coverage)
    data = {**data, "gate": result.to_dict()}  # the report as gated (for --format markdown)
    if fmt is clikit.Fmt.json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
    elif fmt is clikit.Fmt.markdown:
        sys.stdout.write(render_markdown(data))
    else:
        s = data["summary"]
        given = [f"{clikit.flag(k)} {getattr(result, k):g}%" for k in ("max_dead", "max_dead_layer", "min_coverage")
                 if getattr(result, k) is not None]
        clikit.out.print(f"{s['dead']}/{s['units']} units dead ({100 * s['dead_fraction']:.2f}%): "
                         + ("gate passed" if result.passed else "gate FAILED") + f" ({', '.join(given)})")
        for f in result.failures:
            clikit.out.print(f"  {f}")
    if not result.passed:
        raise GateFailed("gate failed: " + "; ".join(result.failures))
