"""``fitcli inspect MODEL``: the layers, units and activation points found in a checkpoint."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from fitcli import clikit
from fitcli.clikit import (
    ArchKwOpt,
    ArchOpt,
    ConfigOpt,
    DataOpt,
    Fmt,
    ModelArg,
    QuietOpt,
    SeqLenOpt,
    TextOpt,
    TrustOpt,
    VerboseOpt,
    checked_settings,
    data_of,
    formats,
    merge,
    model_of,
)

SHORT = "The layers, unit counts and activation points found in a checkpoint."
EXAMPLES = """Examples:

\b
  fitcli inspect model.safetensors
  fitcli inspect model.safetensors --arch models.py:Net --format json
  fitcli inspect model.pt2
"""

INSPECT_FORMATS = formats("table", "json", "markdown", "csv")
InspectFormatOpt = Annotated[INSPECT_FORMATS | None, typer.Option(  # type: ignore[valid-type]
    "--format", help="table, json, markdown or csv: one row per layer [default: table]")]
COLUMNS = ("layer", "type", "units", "activation_point", "parameters", "final")


def rows(info: dict) -> list[list[str]]:
    return [list(COLUMNS)] + [[x["name"], x["type"], str(x["units"]), x["activation_point"], str(x["parameters"]),
                               str(x["final"]).lower()] for x in info["layers"]]


def command(
    model: ModelArg, arch: ArchOpt = None, arch_kwargs: ArchKwOpt = None, trust_checkpoint: TrustOpt = None,
    data: DataOpt = None, text: TextOpt = None, max_seq_len: SeqLenOpt = None, fmt: InspectFormatOpt = None,
    quiet: QuietOpt = None, verbose: VerboseOpt = None, config: ConfigOpt = None,
) -> None:
    """Layers, unit counts, activation points and the format found in a checkpoint."""
    from fitcli import api
    from fitcli.render import render_inspect

    m = merge(config, dict(arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint, data=data,
                           text=text, max_seq_len=max_seq_len, format=fmt, quiet=quiet, verbose=verbose), INSPECT_FORMATS)
    info = api.inspect(model_of(model, m), data_of(model, m, checked_settings(m))).to_dict()
    if m["format"] is Fmt.json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    elif m["format"] is Fmt.markdown:
        table = rows(info)
        lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
        sys.stdout.write("\n".join(lines + ["| " + " | ".join(r) + " |" for r in table[1:]]) + "\n")
    elif m["format"] is Fmt.csv:
        sys.stdout.write("\n".join(",".join(r) for r in rows(info)) + "\n")
    else:
        clikit.out.print(render_inspect(info, width=clikit.out.width))
