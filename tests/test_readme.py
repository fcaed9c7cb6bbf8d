"""The README, run as a reader runs it.

- ``test_quick_start_from_a_fresh_clone``: the working tree copied to a temporary folder (what
  ``git ls-files`` lists, tracked or not ignored: a fresh clone of it), ``make demo``, then every
  command of the README's opening block and of "Quick start" (command line and Python), exactly
  as written, in one bash session whose PATH does not hold ``fitcli``: only the README's
  ``. .venv/bin/activate`` puts it there. The clone's ``.venv`` reuses the interpreter running the
  tests (its ``bin/``, and a fresh stamp so that make installs nothing); ``PYTHONPATH`` points at
  the clone, as the editable install of a real ``make demo`` would.
- ``test_readme_output_blocks``: each ```` ```text ```` block under an "output of the command
  below" comment is a command (``$ fitcli ...``) and what it prints to stdout; the command is run
  through the real entry point and its output must equal the block. After a change to the
  tables, regenerate the blocks with::

      FITCLI_UPDATE_README=1 pytest tests/test_readme.py -k output
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MARK = "<!-- output of the command below, written by tests/test_readme.py"
UPDATE = os.environ.get("FITCLI_UPDATE_README") == "1"
RC = "@@readme-rc"


# ---- the README's text ----------------------------------------------------------------------------

def _section(text: str, title: str) -> str:
    """From the heading ``## {title}`` to the next ``## `` heading."""
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", text, flags=re.S | re.M)


def _commands(block: str) -> list[str]:
    """Shell commands of a bash block: comment lines dropped, continuation lines joined."""
    out: list[str] = []
    pending = ""
    for line in block.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line + "\n"
        if not line.rstrip().endswith("\\"):
            out.append(pending.rstrip("\n"))
            pending = ""
    assert not pending, f"a command ends with a continuation: {pending!r}"
    return out


def quick_start() -> tuple[list[str], str]:
    """(shell commands, Python code) of the README's opening block and quick start, in order."""
    text = README.read_text(encoding="utf-8")
    opening = text[:text.index("\n## ")]
    cli = _section(text, "Quick start: command line")
    python = _section(text, "Quick start: Python")
    commands = [c for block in _blocks(opening, "bash") + _blocks(cli, "bash") for c in _commands(block)]
    (code,) = _blocks(python, "python")
    return commands, code


# ---- the quick start, from a fresh clone -----------------------------------------------------------

def _fresh_clone(dest: Path) -> Path:
    """The files of the working tree that git would commit (tracked, or untracked and not ignored)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info"))
        return dest
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _venv_of_this_interpreter(clone: Path) -> Path:
    """``clone/.venv``: the running interpreter's ``bin/`` (with its fitcli and activate script),
    and a stamp newer than the Makefile and pyproject.toml, so ``make demo`` installs nothing."""
    bin_dir = Path(sys.prefix) / "bin"
    if not (bin_dir / "fitcli").exists() or not (bin_dir / "activate").exists():
        pytest.fail(f"{bin_dir} has no fitcli or no activate script: run the tests from the venv `make test` makes")
    venv = clone / ".venv"
    venv.mkdir()
    (venv / "bin").symlink_to(bin_dir, target_is_directory=True)
    (venv / ".installed-core").touch()
    return venv


def _run_session(clone: Path, commands: list[str]) -> tuple[list[tuple[int, str]], str]:
    """Every command in one bash session; returns [(exit code, stdout)] per command, and stderr."""
    script = "".join(f"{c}\necho \"{RC} $?\"\n" for c in commands)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "MAKEFLAGS", "MFLAGS")}
    env.update(PATH="/usr/local/bin:/usr/bin:/bin", PYTHONPATH=str(clone), COLUMNS="100",
               PY="false")  # were make to build a venv here, it would fail instead of touching the shared one
    probe = subprocess.run(["bash", "-c", "command -v fitcli"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0, f"fitcli is on PATH before the README activates the venv: {probe.stdout}"
    proc = subprocess.run(["bash", "-c", script], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    results: list[tuple[int, str]] = []
    chunk: list[str] = []
    for line in proc.stdout.splitlines():
        if line.startswith(RC + " "):
            results.append((int(line.split()[1]), "\n".join(chunk)))
            chunk = []
        else:
            chunk.append(line)
    return results, proc.stderr


# what each command of the quick start must do: (start of the command, exit code, text in its stdout)
EXPECTED = [
    ("make demo", 0, "4 of 64 units dead"),
    (". .venv/bin/activate", 0, ""),
    ("fitcli inspect sample_models/mlp.safetensors", 0, "fc2 -> relu2"),
    ("fitcli score sample_models/mlp.safetensors", 0, "Least-fit units"),
    ("fitcli ablate sample_models/mlp.safetensors", 0, "removable"),
    ("fitcli gate report.json --max-dead 5", 1, ""),  # 6.25 % dead: the README says the gate fails
    ("fitcli metrics", 0, "taylor"),
    ("fitcli score sample_models/cnn.safetensors", 0, ""),
    ("python quickstart.py", 0, "fc2"),
]


@pytest.mark.slow
def test_quick_start_from_a_fresh_clone(tmp_path: Path, truth: dict):
    if shutil.which("make") is None or shutil.which("bash") is None:
        pytest.skip("needs make and bash")
    clone = _fresh_clone(tmp_path / "clone")
    _venv_of_this_interpreter(clone)
    commands, code = quick_start()
    (clone / "quickstart.py").write_text(code)
    commands.append("python quickstart.py")
    for cmd, (start, _, _) in zip(commands, EXPECTED, strict=False):
        assert cmd.startswith(start), f"the quick start changed: {cmd!r} (expected {start!r}): update EXPECTED"
    assert len(commands) == len(EXPECTED), commands

    results, stderr = _run_session(clone, commands)
    assert len(results) == len(commands), stderr[-3000:]
    for cmd, (rc, out), (_, want_rc, want_text) in zip(commands, results, EXPECTED, strict=True):
        assert rc == want_rc, f"{cmd}\nexit {rc}, not {want_rc}\n{out[-2000:]}\n{stderr[-3000:]}"
        assert want_text in out, f"{cmd}: {want_text!r} not in\n{out[-2000:]}"
    assert "command not found" not in stderr

    # what the README says the quick start gives, checked against the planted facts (truth.json)
    report = json.loads((clone / "report.json").read_text())  # the Python quick start saved it last
    assert report["summary"]["dead"] == 4 and report["summary"]["units"] == 64
    assert {lay["name"]: lay["dead"] for lay in report["layers"] if lay["dead"]} == truth["mlp"]["dead"]
    assert (clone / "report.html").read_text(encoding="utf-8").lstrip().lower().startswith("<!doctype html")


# ---- the output blocks ------------------------------------------------------------------------------

def output_blocks(text: str) -> list[tuple[int, int, str]]:
    """[(first output line, end line, command)] of each marked ```text block (line indices)."""
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.startswith(MARK):
            continue
        assert lines[i + 1] == "```text", f"README line {i + 2}: a ```text block must follow the comment"
        j = i + 2
        assert lines[j].startswith("$ "), f"README line {j + 1}: the block starts with '$ command'"
        command = lines[j][2:]
        while lines[j].endswith("\\"):
            j += 1
            command += "\n" + lines[j]
        end = lines.index("```", j + 1)
        out.append((j + 1, end, command))
    return out


def _stdout_of(command: str) -> str:
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[0] == "fitcli", command
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "100"}
    env.pop("FITCLI_VERBOSE", None)
    proc = subprocess.run([sys.executable, "-m", "fitcli", *argv[1:]], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return "\n".join(line.rstrip() for line in proc.stdout.rstrip("\n").split("\n"))


def test_readme_output_blocks():
    text = README.read_text(encoding="utf-8")
    blocks = output_blocks(text)
    commands = [c for _, _, c in blocks]
    assert any(c.startswith("fitcli score ") for c in commands) and any(c.startswith("fitcli ablate ") for c in commands)
    lines = text.split("\n")
    stale = []
    for first, end, command in reversed(blocks):  # from the end: earlier line numbers stay valid
        got = _stdout_of(command)
        shown = "\n".join(line.rstrip() for line in lines[first:end])
        if shown != got:
            stale.append(command.split("\\")[0].strip())
            lines[first:end] = got.split("\n")
    if stale and UPDATE:
        README.write_text("\n".join(lines), encoding="utf-8")
        return
    assert not stale, ("the README shows output that the commands no longer print: "
                       f"{stale}; regenerate with FITCLI_UPDATE_README=1 pytest tests/test_readme.py -k output")
