"""A new user's first hour on the command line: structured errors, one module per command, the
ablate ranking and markdown, layer names in narrow tables, per-command formats, Typer's usual
help, inputs of the wrong kind, and the not-audited list. Every run goes through the real entry
point (``fitcli.cli.main`` via ``run_cli``, or ``python -m fitcli`` in a subprocess)."""

from __future__ import annotations

import ast
import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from fitcli import clikit
from fitcli.errors import UsageError

REPO = Path(__file__).resolve().parent.parent
SM = REPO / "sample_models"
MLP = [str(SM / "mlp.safetensors"), "--arch", f"{SM / 'models.py'}:mlp", "--data", str(SM / "mlp_data.safetensors")]
CNN = [str(SM / "cnn.safetensors"), "--arch", f"{SM / 'models.py'}:cnn", "--data", str(SM / "cnn_data.safetensors")]
RESMLP = [str(SM / "resmlp.safetensors"), "--arch", f"{SM / 'models.py'}:resmlp", "--data",
          str(SM / "resmlp_data.safetensors")]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "FITCLI_VERBOSE": ""}


def fitcli_process(*args: str, columns: int | None = None, **kw) -> subprocess.CompletedProcess:
    env = dict(ENV)
    if columns:
        env["COLUMNS"] = str(columns)
    return subprocess.run([sys.executable, "-m", "fitcli", *args], capture_output=True, text=True, timeout=300,
                          env=env, **kw)


def one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines and lines[0].startswith("fitcli: error: "), err
    assert all(x.startswith("  hint: ") for x in lines[1:]), err
    assert "Traceback" not in err and "Usage:" not in err and "Try '" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, Path]:
    """JSON reports written by the CLI once for the module: score on ResMLP and on a tiny GPT-2
    folder, ablate on the MLP."""
    out = tmp_path_factory.mktemp("first_hour")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2,
                                                                 n_positions=32, bos_token_id=0, eos_token_id=0))
    gpt2.save_pretrained(out / "gpt2")
    runs = {"resmlp": ["score", *RESMLP], "gpt2": ["score", str(out / "gpt2"), "--data", "random:tokens=50,len=16,n=8",
                                                        "--kinds", "heads,mlp,rows"],
            "ablate": ["ablate", *MLP, "--layer", "fc1", "--layer", "fc2", "--whole-layer", "--top", "8"]}
    paths = {}
    for name, args in runs.items():
        paths[name] = out / f"{name}.json"
        res = fitcli_process(*args, "--device", "cpu", "--quiet", "--format", "json", "-o", str(paths[name]))
        assert res.returncode == 0, res.stderr[-2000:]
    return paths


# ---- 21.6: structured errors, one module per command --------------------------------------------

def test_an_error_carries_its_setting_and_each_caller_words_it():
    e = UsageError("{batch_size} is too large: use {batch_size=5} or {validate=True}", setting=("batch_size", "validate"))
    assert e.setting == "batch_size" and e.settings == ("batch_size", "validate")
    assert str(e) == "batch_size is too large: use batch_size=5 or validate=True"  # the library's words
    assert clikit.said(e) == ("--batch-size is too large: use --batch-size 5 or --validate", None)  # the CLI's
    assert UsageError("literal {braces} stay", setting="tau").message == "literal {braces} stay"


def test_library_errors_name_settings_and_the_cli_names_flags(run_cli, tmp_path):
    import fitcli

    with pytest.raises(UsageError) as e:
        fitcli.gate({"schema": "x"}, min_coverage=-1)
    assert e.value.setting == "min_coverage" and str(e.value).startswith("min_coverage must be ≥ 0")
    res = run_cli(["score", *MLP, "--layer", "fc1", "--tau", "-1"])
    assert res.code == 2 and one_error_line(res.stderr) == "fitcli: error: --tau must be ≥ 0, got -1.0"
    res = run_cli(["ablate", *MLP, "--layer", "fc2", "--units", "40", "--device", "cpu"])
    assert res.code == 2 and "--units: unit 40 is out of range for fc2" in one_error_line(res.stderr)


def test_no_message_rewriting_and_every_command_in_its_own_module():
    from fitcli.cli import COMMAND_MODULES, app

    src = {p.name: p.read_text() for p in (REPO / "fitcli").glob("*.py")
           if p.name in ("cli.py", "clikit.py") or p.name.startswith("cmd_")}
    for name, text in src.items():
        assert "CLI_WORDS" not in text and "cli_words" not in text, name
        assert not re.search(r"\.message\s*=|\.message\.(replace|startswith)", text), name
    tree = ast.parse(src["cli.py"])
    decorated = [f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                 and any("command" in ast.unparse(d) for d in f.decorator_list)]
    assert decorated == [], decorated  # cli.py assembles the app; no command is defined there
    commands = {c.name for c in app.registered_commands}
    assert commands == set(COMMAND_MODULES) == {"score", "ablate", "gate", "inspect", "metrics", "compare", "prune",
                                                "history", "render"}
    for name in COMMAND_MODULES:
        assert (REPO / "fitcli" / f"cmd_{name}.py").is_file(), name


# ---- 24.2: ablate ranks by |Δloss| ---------------------------------------------------------------

def _table_rows(text: str, title: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith(title))
    rows = []
    for x in lines[start + 1:]:
        if "│" not in x and "┃" not in x and "━" not in x:
            if rows:
                break
            continue
        if "│" in x:
            rows.append([c.strip() for c in x.split("│")])
    return rows


def test_ablate_ranks_units_by_absolute_exact_loss_change(run_cli, tmp_path):
    out = tmp_path / "ab.json"
    res = run_cli(["ablate", *CNN, "--layer", "conv1", "--layer", "conv2", "--layer", "fc1", "--top", "8",
                   "--device", "cpu", "-o", str(out), "--quiet"])
    assert res.code == 0, res.stderr
    report = json.loads(out.read_text())
    every = sorted((abs(v), li, u, lay["name"]) for li, lay in enumerate(report["layers"])
                   for u, v in enumerate(lay["metrics"]["ablation"]) if v is not None)
    expected = [(name, u) for _, _, u, name in every[:8]]  # brute force: the 8 smallest |Δloss|
    title = "Units by |Δloss| when ablated"
    assert title in res.stdout
    shown = [(r[1], int(r[2])) for r in _table_rows(res.stdout, title)]
    assert shown == expected
    # the normalised order the report keeps would put conv2 unit 6 (Δ 0.896) above fc1's (Δ < 0.1)
    assert ("conv2", 6) not in shown and sum(name == "fc1" for name, _ in shown) >= 4


def test_blocks_table_and_greedy_share_the_absolute_rule(run_cli):
    res = run_cli(["ablate", *RESMLP, "--blocks", "--greedy", "1", "--device", "cpu", "--quiet", "--format", "json"])
    assert res.code == 0, res.stderr
    report = json.loads(res.stdout)
    smallest = min(report["blocks"], key=lambda r: abs(r["ablation"]))
    assert report["greedy"][0]["removed"] == smallest["name"]
    table = run_cli(["ablate", *RESMLP, "--blocks", "--device", "cpu", "--quiet"])
    assert "Blocks by |Δloss| when removed, smallest first" in table.stdout
    order = [r[0] for r in _table_rows(table.stdout, "Blocks by |Δloss|")]
    assert order == [r["name"] for r in sorted(report["blocks"], key=lambda r: abs(r["ablation"]))]


# ---- 24.3: ablate markdown -----------------------------------------------------------------------

def test_ablate_markdown_says_what_was_removable_and_the_accuracy_change(run_cli, reports):
    report = json.loads(reports["ablate"].read_text())
    removable = {lay["name"]: lay["removable"] for lay in report["layers"]}
    total = sum(v is not None for lay in report["layers"] for v in lay["metrics"]["ablation"])
    for res in (run_cli(["render", str(reports["ablate"]), "--format", "markdown"]),):
        md = res.stdout
        assert res.code == 0 and "units dead" not in md
        assert f"**{sum(map(len, removable.values()))} of {total} ablated units removable**" in md
        for name, units in removable.items():
            assert f"- `{name}`: {', '.join(map(str, units))}" in md
            lay = next(x for x in report["layers"] if x["name"] == name)
            assert f"{lay['layer_ablation_accuracy']:.4g}" in md  # the whole layer's accuracy change
        assert "| # | layer | unit | Δloss | Δaccuracy |" in md


# ---- 24.8: layer names never cut ------------------------------------------------------------------

def _layer_cells(text: str) -> list[str]:
    """The layer column of the Layers table, continuation lines (an empty type cell) joined."""
    rows = _table_rows(text, "Layers")
    names: list[str] = []
    for r in rows:
        if r[1]:
            names.append(r[0])
        else:
            names[-1] += r[0]
    return names


@pytest.mark.parametrize("model", ["resmlp", "gpt2"])
@pytest.mark.parametrize("width", [100, 60])
def test_layer_names_wrap_and_are_never_cut(model, width, reports, run_cli, monkeypatch):
    monkeypatch.setattr(clikit, "out", Console(width=width, highlight=False))
    res = run_cli(["render", str(reports[model]), "--format", "table"])
    assert res.code == 0, res.stderr
    assert "…" not in res.stdout and max(len(x) for x in res.stdout.splitlines()) <= width
    names = [lay["name"] for lay in json.loads(reports[model].read_text())["layers"]]
    m = re.search(r"layer names below start with '([^']+)'", res.stdout.split("Layers", 1)[1].split("\n", 2)[1])
    prefix = m.group(1) if m else ""
    assert [prefix + n for n in _layer_cells(res.stdout)] == names


def test_layer_names_are_not_cut_when_piped(reports):
    """Piped (not a terminal: 140 columns): GPT-2's names whole, in every table, nothing cut."""
    res = fitcli_process("render", str(reports["gpt2"]), "--format", "table")
    assert res.returncode == 0, res.stderr
    assert "…" not in res.stdout and max(len(x) for x in res.stdout.splitlines()) <= 140
    names = [lay["name"] for lay in json.loads(reports["gpt2"].read_text())["layers"]]
    assert _layer_cells(res.stdout) == names
    res = fitcli_process("inspect", *RESMLP[:3])
    assert res.returncode == 0 and "…" not in res.stdout and "blocks.0.attn.heads" in res.stdout


# ---- 24.11: each command offers the formats it writes ------------------------------------------

FORMATS = {"score": "table|json|markdown|csv|html", "ablate": "table|json|markdown|csv|html",
           "gate": "table|json|markdown", "inspect": "table|json|markdown|csv", "metrics": "table|json",
           "compare": "table|json|markdown|html", "prune": "table|json|markdown|csv",
           "history": "table|json|markdown|csv", "render": "html|markdown|csv|table"}


@pytest.mark.parametrize("command", sorted(FORMATS))
def test_each_command_offers_exactly_its_formats(command, run_cli):
    res = run_cli([command, "--help"])
    assert res.code == 0
    assert re.search(r"--format \[([a-z|]+)\]", res.stdout).group(1) == FORMATS[command]
    lines = res.stdout.split("Examples:")[0].splitlines()
    start = next(i for i, x in enumerate(lines) if x.strip().startswith("--format"))
    block = " ".join([lines[start]] + [x for x in lines[start + 1:] if x.startswith(" " * 10)][:4])
    help_text = block.split("]", 1)[1]  # what the option says, after its choices
    assert ("html" in help_text) == ("html" in FORMATS[command]), block
    assert "--output" in res.stdout or "-o" not in help_text, block  # no "with -o" where there is no -o
    assert "html" not in FORMATS[command] or "-o" in help_text, block  # where the page goes


def test_a_format_a_command_does_not_write_is_refused(run_cli, tmp_path):
    res = run_cli(["metrics", "--format", "csv"])
    assert res.code == 2 and res.stdout == "" and "'csv' is not one of 'table', 'json'" in one_error_line(res.stderr)
    res = run_cli(["gate", str(tmp_path / "r.json"), "--format", "csv"])
    assert res.code == 2 and res.stdout == "" and "--format" in one_error_line(res.stderr)


# ---- 24.12: Typer's usual help, one error style ---------------------------------------------------

def test_help_in_typers_usual_style():
    top = fitcli_process("--help", columns=100)
    assert top.returncode == 0 and "-h, --help" in top.stdout and "--install-completion" in top.stdout
    listing = top.stdout.split("Commands:")[1]
    assert "..." not in listing and "…" not in listing
    assert fitcli_process("score", "-h", columns=100).stdout == fitcli_process("score", "--help", columns=100).stdout
    score = fitcli_process("score", "--help", columns=100).stdout
    assert score.startswith("Usage: fitcli score [OPTIONS] MODEL")
    assert "MODEL  checkpoint" in score and "--top INTEGER" in score and "--layer TEXT" in score
    assert "--tau FLOAT" in score and "--format [table|json|markdown|csv|html]" in score
    for odd in ("{model}", "<int range>", "<list[str]>", "<str>", "<float>", "<int>"):
        assert odd not in score, odd


def test_parser_errors_are_one_line_with_exit_2(run_cli):
    for args, word in ((["score", "m.pt", "--top", "abc"], "--top"), (["score", "m.pt", "--nosuch"], "--nosuch"),
                       (["gate"], "REPORT")):
        res = run_cli(args)
        assert res.code == 2 and word in one_error_line(res.stderr), res.stderr
    proc = fitcli_process("inspect", "m.pt", "--format", "xml")
    assert proc.returncode == 2 and "Invalid value for '--format'" in one_error_line(proc.stderr)


# ---- 24.13: inputs of the wrong kind ------------------------------------------------------------

def test_a_checkpoint_given_to_gate_says_what_gate_reads(run_cli):
    res = run_cli(["gate", str(SM / "mlp.safetensors"), "--max-dead", "5"])
    line = one_error_line(res.stderr)
    assert res.code == 3 and "codec" not in line and "gate reads the JSON report" in line and "not JSON" in line


def test_a_report_given_to_history_says_what_history_reads(run_cli, reports):
    res = run_cli(["history", str(reports["resmlp"])])
    line = one_error_line(res.stderr)
    assert res.code == 3 and "is an audit report" in line and "fitcli.Tracker" in line and "not JSON" not in line


def test_greedy_without_blocks_is_refused(run_cli):
    res = run_cli(["ablate", *MLP, "--layer", "fc2", "--greedy", "2"])
    line = one_error_line(res.stderr)
    assert res.code == 2 and "--greedy 2" in line and "needs --blocks" in line


def test_a_percentage_over_100_is_a_usage_error(run_cli, reports):
    res = run_cli(["gate", str(reports["resmlp"]), "--min-coverage", "200"])
    assert res.code == 2 and "--min-coverage is a percentage: at most 100" in one_error_line(res.stderr)


def _on_a_terminal(*args: str) -> tuple[int, bytes]:
    """``python -m fitcli ARGS`` with stdout on a pseudo-terminal: (exit code, what it printed)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "fitcli", *args], stdout=slave, stderr=subprocess.PIPE,
                              env=ENV, timeout=300)
    finally:
        os.close(slave)
    printed = b""
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:
            break
        if not chunk:
            break
        printed += chunk
    os.close(master)
    return proc.returncode, printed + proc.stderr


def test_html_is_not_written_to_a_terminal(reports):
    code, printed = _on_a_terminal("render", str(reports["resmlp"]))
    assert code == 2 and b"<html" not in printed.lower() and b"-o FILE.html" in printed and len(printed) < 2000
    code, printed = _on_a_terminal("score", *MLP, "--format", "html", "--quiet")
    assert code == 2 and b"<html" not in printed.lower() and b"-o FILE.html" in printed


# ---- 24.14: not audited, grouped by reason --------------------------------------------------------

def test_not_audited_is_grouped_by_reason(run_cli, reports):
    report = json.loads(reports["gpt2"].read_text())
    missing = report["coverage"]["not_audited"]
    layernorms = [x for x in missing if x["type"] == "LayerNorm"]
    assert len(layernorms) == 5 and len({x["reason"] for x in layernorms}) == 1
    res = run_cli(["render", str(reports["gpt2"]), "--format", "table"])
    text = " ".join(res.stdout.split())
    assert text.count(layernorms[0]["reason"]) == 1
    assert f"LayerNorm x 5: {layernorms[0]['reason']}" in text
