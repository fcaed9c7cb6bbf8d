"""Machinery for ``tests/test_fuzz.py``: the in-process CLI runner with a per-input timeout, the
outcome oracle, the session counters and a few input builders shared by the fuzz targets.

Budget: ``FITCLI_FUZZ_EXAMPLES`` is the TOTAL number of generated inputs over all fuzz targets
(default 400, which keeps the file to well under a minute); ``budget(name)`` gives each target its
share (weights below, chosen from the measured cost of one input of each target).
``FITCLI_FUZZ_TIMEOUT`` is the per-input time limit in seconds (default 30).
``FITCLI_FUZZ_SUMMARY`` names a file that receives the one-line summary.
``FITCLI_FUZZ_CRASH_DIR`` keeps the inputs of failing cases (default: a pytest temp folder).
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import hashlib
import importlib.util
import io
import math
import os
import re
import signal
import warnings
from pathlib import Path

from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parent.parent
MODELS_PY = REPO / "sample_models" / "models.py"

DEFAULT_TOTAL = 400
TOTAL = int(os.environ.get("FITCLI_FUZZ_EXAMPLES", "") or DEFAULT_TOTAL)
TIMEOUT = float(os.environ.get("FITCLI_FUZZ_TIMEOUT", "") or 30.0)

# share of the total budget per target (sums to 1). The cheap `inspect` targets get most of it,
# the `score`/`ablate` option targets (a forward/backward pass per input) less.
WEIGHTS: dict[str, float] = {
    "safetensors": 0.18,
    "pt": 0.16,
    "pickle": 0.14,
    "toml": 0.12,
    "spec:model": 0.02,
    "spec:data": 0.06,
    "spec:arch": 0.06,
    "spec:arch_kwargs": 0.05,
    "spec:units": 0.04,
    "spec:layer": 0.04,
    "spec:metric": 0.04,
    "spec:loss": 0.03,
    "spec:tau": 0.03,
    "spec:batch_size": 0.03,
}
assert abs(sum(WEIGHTS.values()) - 1.0) < 1e-9
MIN_EXAMPLES = 10


def budget(name: str) -> int:
    return max(MIN_EXAMPLES, math.ceil(TOTAL * WEIGHTS[name]))


def fuzz_settings(name: str) -> settings:
    return settings(
        max_examples=budget(name),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# ---------------------------------------------------------------------------------------------
# session counters (printed by test_zz_summary)

STATS: dict = {
    "inputs": 0,
    "codes": collections.Counter(),
    "crashes": 0,
    "hangs": 0,
    "pickle_files": 0,
    "signatures": collections.OrderedDict(),  # distinct failure -> (repro length, target, text)
    "targets_done": set(),  # targets that ran their whole budget without a failure
    "crash_dir": None,
    "per_target": {},  # target -> Counter of exit codes
}


def crash_dir() -> Path:
    if STATS["crash_dir"] is None:
        d = os.environ.get("FITCLI_FUZZ_CRASH_DIR")
        if d:
            p = Path(d)
        else:
            import tempfile

            p = Path(tempfile.mkdtemp(prefix="fitcli-fuzz-crashes-"))
        p.mkdir(parents=True, exist_ok=True)
        STATS["crash_dir"] = p
    return STATS["crash_dir"]


def summary_line() -> str:
    codes = dict(sorted(STATS["codes"].items(), key=lambda kv: (isinstance(kv[0], str), str(kv[0]))))
    line = (f"fuzz: {STATS['inputs']} inputs tried; exit codes {codes}; {STATS['crashes']} crashes, "
            f"{STATS['hangs']} hangs, {STATS['pickle_files']} files created by pickles")
    if STATS["signatures"]:
        line += f" ({len(STATS['signatures'])} distinct failures)"
    return line


# ---------------------------------------------------------------------------------------------
# running the CLI in-process


class FuzzTimeout(BaseException):
    """Raised by SIGALRM inside the CLI call. A BaseException so that fitcli's own
    ``except Exception`` cannot swallow it and turn a hang into an ordinary error."""


def _on_alarm(signum, frame):
    raise FuzzTimeout()


class Outcome(collections.namedtuple("Outcome", "code stdout stderr hung seconds")):
    pass


def _show_warning(message, category, filename, lineno, file=None, line=None):
    import sys

    (file or sys.stderr).write(warnings.formatwarning(message, category, filename, lineno, line))


def run_cli(argv: list[str], timeout: float = TIMEOUT) -> Outcome:
    """``fitcli.cli.main(argv)`` in this process, cwd = repository root (the caller's fixture).

    stdout/stderr are captured by swapping fitcli's rich Consoles and redirecting sys.stdout /
    sys.stderr; Python warnings are shown on the captured stderr, as the real CLI would. The call is
    bounded by an interval timer (SIGALRM -> FuzzTimeout) and, for a hang inside C code that never
    returns to the interpreter, by faulthandler, which dumps every thread's stack and ends the run.
    """
    import time

    from rich.console import Console

    import fitcli.clikit as cli
    from fitcli.cli import main as cli_main

    out_buf, err_buf = io.StringIO(), io.StringIO()
    saved = (cli.out, cli.err)
    old_term = signal.getsignal(signal.SIGTERM)
    old_alarm = signal.signal(signal.SIGALRM, _on_alarm)
    cli.out = Console(file=out_buf, width=200, soft_wrap=True, highlight=False)
    cli.err = Console(file=err_buf, width=200, soft_wrap=True, highlight=False)
    code: object = "returned"
    hung = False
    t0 = time.perf_counter()
    faulthandler.dump_traceback_later(timeout + 60, exit=True)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        with contextlib.redirect_stdout(out_buf), contextlib.redirect_stderr(err_buf), \
                warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _show_warning
            try:
                cli_main(list(argv))
            except SystemExit as e:
                code = e.code
    except FuzzTimeout:
        hung = True
        code = "timeout"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, old_alarm)
        signal.signal(signal.SIGTERM, old_term)
        cli.out, cli.err = saved
    return Outcome(code, out_buf.getvalue(), err_buf.getvalue(), hung, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# the oracle

_CATCH_ALL = re.compile(r"^fitcli: error: unexpected [A-Za-z_][A-Za-z0-9_.]*:", re.M)
_CATCH_ALL_HINT = "hint: rerun with --verbose for the traceback"
_WARNING_LINE = re.compile(r"^\S.*:\d+: \w*Warning: ")


def _message_lines(stderr: str) -> list[str] | None:
    """The error message: stderr from the first 'fitcli: error:' line on (warnings before it are
    Python's own output, not fitcli's message)."""
    lines = stderr.rstrip("\n").split("\n")
    for i, ln in enumerate(lines):
        if ln.startswith("fitcli: error:"):
            return lines[i:]
    return None


def problems(o: Outcome, allowed: set[int], argv: list[str], *, need_stdout_on_success: bool = True) -> list[str]:
    """Everything wrong with one CLI outcome (empty list: fine)."""
    bad: list[str] = []
    if o.hung:
        return [f"hang: no exit within {TIMEOUT:g} s"]
    if o.code == "returned":
        bad.append("main() returned instead of exiting")
    if "Traceback" in o.stderr or "Traceback" in o.stdout:
        bad.append("traceback printed")
    if _CATCH_ALL.search(o.stderr) or _CATCH_ALL_HINT in o.stderr:
        bad.append("unmapped exception (fitcli's catch-all 'unexpected ...' message)")
    if o.code not in allowed:
        bad.append(f"exit code {o.code!r} not in {sorted(allowed)}")
    if o.code == 0:
        if need_stdout_on_success and not o.stdout.strip():
            bad.append("exit 0 but nothing on stdout (the command did not finish its work)")
    elif isinstance(o.code, int):
        click_usage = o.code == 2 and o.stderr.startswith("Usage:") and "\nError: " in o.stderr
        if not click_usage:
            msg = _message_lines(o.stderr)
            if msg is None:
                bad.append("non-zero exit without a 'fitcli: error:' message on stderr")
            else:
                if not msg[0][len("fitcli: error:"):].strip():
                    bad.append("empty error message")
                multiline_input = any(("\n" in a or "\r" in a) for a in argv)
                if not multiline_input:
                    if len(msg) > 2:
                        bad.append(f"error message is {len(msg)} lines, not one or two")
                    elif len(msg) == 2 and not msg[1].startswith("  hint:"):
                        bad.append("second line of the error message is not a hint")
    return bad


def py_expr(s: str, min_run: int = 8) -> str:
    """A Python expression equal to ``s``, with long repeats folded ('[' * 5000 + ']' * 5000), so a
    repro of a huge argument stays readable and exact."""
    if len(s) <= 120:
        return repr(s)
    parts: list[str] = []
    lit = ""
    i = 0
    while i < len(s):
        best = None
        for k in range(1, 9):
            unit = s[i:i + k]
            if len(unit) < k:
                break
            n = 1
            while s.startswith(unit, i + n * k):
                n += 1
            if n >= min_run and (best is None or n * k > best[0] * len(best[1])):
                best = (n, unit)
        if best:
            if lit:
                parts.append(repr(lit))
                lit = ""
            parts.append(f"{best[1]!r} * {best[0]}")
            i += best[0] * len(best[1])
        else:
            lit += s[i]
            i += 1
    if lit:
        parts.append(repr(lit))
    return " + ".join(parts)


def argv_expr(argv: list[str]) -> str:
    return "[" + ", ".join(py_expr(a) for a in argv) + "]"


def _signature(target: str, o: Outcome, bad: list[str]) -> str:
    msg = _message_lines(o.stderr) or [o.stderr.strip().split("\n")[-1] if o.stderr.strip() else ""]
    first = re.sub(r"'[^']*'|\"[^\"]*\"|/\S+", "Q", msg[0])
    first = re.sub(r"\d+", "N", first)[:90]
    return f"{target} | {bad[0]} | exit {o.code!r} | {first}"


def record(target: str, argv: list[str], o: Outcome, allowed: set[int], repro: str, *,
           need_stdout_on_success: bool = True, files: dict[str, bytes] | None = None,
           extra_problems: list[str] | None = None) -> list[str]:
    """Count one input and judge it. A failure is kept (the shortest repro per distinct failure)
    and fuzzing goes on, so one known bug does not stop a target from exploring the rest of its
    budget; ``check_no_failures(target)`` then fails the test with every distinct failure. With
    FITCLI_FUZZ_SHRINK=1 the first failure raises at once instead, so hypothesis shrinks it."""
    STATS["inputs"] += 1
    STATS["codes"][o.code] += 1
    STATS["per_target"].setdefault(target, collections.Counter())[o.code] += 1
    bad = list(extra_problems or []) + problems(o, allowed, argv, need_stdout_on_success=need_stdout_on_success)
    if not bad:
        return bad
    STATS["crashes"] += 1
    if o.hung:
        STATS["hangs"] += 1
    sig = _signature(target, o, bad)
    saved = ""
    if files:
        d = crash_dir() / hashlib.sha1(sig.encode()).hexdigest()[:12]
        d.mkdir(parents=True, exist_ok=True)
        old = STATS["signatures"].get(sig)
        if old is None or len(repro) < old[0]:
            for name, data in files.items():
                (d / name).write_bytes(data)
        saved = f"\n  input files saved in {d}"
    text = (f"[{target}] {'; '.join(bad)}\n  argv: {argv_expr(argv)}\n  repro: {repro}{saved}\n"
            f"  exit: {o.code!r}\n  stderr: {py_expr(o.stderr[-3000:])}\n  stdout: {py_expr(o.stdout[-300:])}")
    old = STATS["signatures"].get(sig)
    if old is None or len(repro) < old[0]:
        STATS["signatures"][sig] = (len(repro), target, text)
    if SHRINK:
        raise AssertionError(text)
    return bad


SHRINK = os.environ.get("FITCLI_FUZZ_SHRINK") == "1"


def failures(target: str | None = None) -> list[str]:
    return [t for _, tg, t in STATS["signatures"].values() if target is None or tg == target]


def check_no_failures(target: str) -> None:
    """End of a target's run: fail with every distinct failure it found."""
    found = failures(target)
    if found:
        raise AssertionError(f"{len(found)} distinct failure(s) in fuzz target {target}:\n\n" + "\n\n".join(found))
    STATS["targets_done"].add(target)


# ---------------------------------------------------------------------------------------------
# spec safety: fuzzed module:callable / file.py:callable specs are really imported and called by
# fitcli, so only specs whose effect is known are let through (a random string that happens to name
# a real module, e.g. 'os:abort' or 'sample_models/train.py:main', is rejected, never run).

MODELS_SAFE_ATTRS = {"mlp", "cnn", "resmlp", "MLP", "CNN", "ResMLP", "Block", "nope", "mlp.x", "MLP.forward"}


def spec_is_safe(spec: str, allow: frozenset[str] | set[str] = frozenset()) -> bool:
    if spec in allow or ":" not in spec:
        return True
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        return True
    if target.endswith(".py") or "/" in target or "\\" in target:
        try:
            p = Path(target)
            p = p if p.is_absolute() else REPO / p
            exists = os.path.lexists(p)
        except (ValueError, OSError):
            return False
        if not exists:
            return True
        try:
            same = p.resolve() == MODELS_PY.resolve()
        except (ValueError, OSError, RuntimeError):
            return False
        return same and attr in MODELS_SAFE_ATTRS
    parts = target.split(".")
    if not all(p.isidentifier() for p in parts):
        return True  # fitcli refuses it before importing anything
    try:
        found = importlib.util.find_spec(parts[0]) is not None
    except (ImportError, ValueError):
        found = True  # be conservative
    return not found


def argv_safe(s: str) -> bool:
    """Something a shell could pass: no NUL byte, within Linux's per-argument limit."""
    if "\x00" in s:
        return False
    try:
        return len(s.encode("utf-8", "surrogateescape")) < 131072
    except UnicodeEncodeError:  # a lone surrogate no real argv can hold
        return False
