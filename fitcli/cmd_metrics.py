"""``fitcli metrics``: the metric registry, plugins included."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from fitcli import clikit
from fitcli.clikit import Fmt, as_fmt, formats

SHORT = "The metric registry: name, direction, needs, cost and description (plugins included)."
EXAMPLES = """Examples:

\b
  fitcli metrics
  fitcli metrics --format json
"""

METRICS_FORMATS = formats("table", "json")
MetricsFormatOpt = Annotated[METRICS_FORMATS | None, typer.Option(  # type: ignore[valid-type]
    "--format", help="table or json [default: table]")]


def command(fmt: MetricsFormatOpt = None) -> None:
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
    if as_fmt(fmt) is Fmt.json:
        sys.stdout.write(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    else:
        clikit.out.print(render_metrics(rows))
