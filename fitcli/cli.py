"""The command line: the Typer app, assembled from one module per command, and ``main()``.

Each command lives in ``fitcli/cmd_<name>.py`` (its Typer signature, docstring, ``SHORT``
line for ``fitcli --help`` and ``EXAMPLES`` epilog); what they share is in ``fitcli/clikit.py``.
stdout carries only the result; progress, notes and errors go to stderr. ``main()`` maps the
exception hierarchy to exit codes (docs/cli.md), an error's settings to their flags.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from typing import Annotated

import typer

from fitcli import __version__, clikit
from fitcli.clikit import guard
from fitcli.errors import FitcliError, GateFailed, Interrupted
from fitcli.runtime import keep_freed_memory, quiet_hf

app = typer.Typer(
    name="fitcli",
    help="Audit a trained PyTorch model: which neurons and layers contribute, and which are dead weight.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Commands, each with a module of its own (fitcli/cmd_<name>.py), registered in this order.
COMMAND_MODULES: tuple[str, ...] = ("score", "ablate", "gate", "inspect", "metrics", "compare", "prune", "history",
                                    "render")


def _register(name: str) -> None:
    mod = importlib.import_module(f"fitcli.cmd_{name}")
    app.command(name=name, epilog=mod.EXAMPLES, short_help=mod.SHORT)(guard(mod.command))


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


def _traceback(verbose: bool) -> None:
    if verbose:
        import traceback

        traceback.print_exc()


def _say(*lines: str) -> None:
    for line in lines:
        clikit.err.print(line, markup=False, highlight=False)


def _run(args: list[str]) -> int:
    """The app on ``args``: its exit code (a parser error raised, not printed)."""
    command = clikit.usual_help(typer.main.get_command(app))
    try:
        rv = command.main(args=args, prog_name="fitcli", standalone_mode=False)
    except KeyboardInterrupt as e:
        raise Interrupted(2) from e
    return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, map FitcliError to its exit code (its settings named as flags),
    a parser error to one line and exit 2; no traceback unless --verbose."""
    args = sys.argv[1:] if argv is None else argv
    verbose = "--verbose" in args or "-v" in args or os.environ.get("FITCLI_VERBOSE") == "1"
    keep_freed_memory()  # this process is ours: reuse freed activation memory (fitcli.runtime)
    quiet_hf(verbose)  # Hugging Face prints its own bars and warnings: not unless --verbose
    try:
        signal.signal(signal.SIGTERM, _sigterm)
    except ValueError:  # not the main thread
        pass
    try:
        code = _run(list(args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except (FitcliError, Interrupted) as e:
        _traceback(verbose)
        message, hint = clikit.said(e) if isinstance(e, FitcliError) else (e.message, e.hint)
        _say(f"fitcli: {message}" if isinstance(e, GateFailed) else f"fitcli: error: {message}")
        if hint:
            _say(f"  hint: {hint}")
        code = e.exit_code
    except Exception as e:
        code = _other(e, verbose)
    sys.exit(code)


def _other(e: Exception, verbose: bool) -> int:
    """A parser error (exit 2), a bad argument (exit 2), or a bug (exit 4): one line each."""
    if clikit.is_click_error(e):
        if type(e).__name__ == "NoArgsIsHelpError":  # `fitcli` alone: the help
            e.show()  # type: ignore[attr-defined]
        elif type(e).__name__ == "Abort":
            _say("fitcli: error: aborted")
        else:
            _say(*clikit.click_error_lines(e))
        return e.exit_code  # type: ignore[attr-defined]
    _traceback(verbose)
    text = str(e).splitlines()[0] if str(e) else ""
    if isinstance(e, ValueError):  # e.g. a NUL byte in a path argument
        _say(f"fitcli: error: invalid argument: {text}")
        return 2
    _say(f"fitcli: error: unexpected {type(e).__name__}: {text}", "  hint: rerun with --verbose for the traceback")
    return 4
