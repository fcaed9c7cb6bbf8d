"""The shape of the package: no import cycles, settings checked before any work, docs whose links
resolve inside the repository, help that ends with examples, and the Python floor it promises."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "fitcli"
MODULES = sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                 for p in PKG.rglob("*.py"))


def _imports(path: Path, module: str) -> set[str]:
    """fitcli modules imported anywhere in the file (module level or inside functions), except
    under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fitcli"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fitcli"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in MODULES else node.module)
    return found - {module}


def test_no_import_cycle_in_the_package():
    graph = {m: _imports(REPO / Path(*m.split(".")).with_suffix(".py")
                         if (REPO / Path(*m.split(".")).with_suffix(".py")).exists()
                         else REPO / Path(*m.split(".")) / "__init__.py", m) for m in MODULES}
    cycles = []

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in stack:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, stack + [nxt], done)
        done.add(node)

    done: set[str] = set()
    for m in MODULES:
        if m not in done:
            visit(m, [m], done)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    assert "fitcli.engine" not in graph["fitcli.ablation"]  # the cycle this rule was written for


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone(module):
    res = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_bad_settings_fail_before_the_audit_and_before_torch(tmp_path):
    """`--rank-by nosuch` (and other bad names) exit 2 without importing torch, so long before any
    model is loaded or batch read: the audit, if it ran first, would need torch."""
    cnn = [str(REPO / "sample_models" / "cnn.safetensors"), "--arch", f"{REPO / 'sample_models' / 'models.py'}:cnn",
           "--data", str(REPO / "sample_models" / "cnn_data.safetensors")]
    probe = ("import sys\nfrom fitcli.cli import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
             "    print('torch' in sys.modules, e.code, file=sys.stderr)\n")
    for extra in (["--rank-by", "nosuch"], ["--metric", "nosuch"], ["--tau", "-1"], ["--mode", "half"]):
        res = subprocess.run([sys.executable, "-c", probe, "score", *cnn, *extra], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
        assert res.stderr.strip().endswith("False 2"), (extra, res.stderr)
        assert "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "fitcli", "score", *cnn, "--rank-by", "nosuch"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--rank-by 'nosuch' is not a metric" in res.stderr


def _links(md: Path) -> list[str]:
    text = md.read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks are not links
    return re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r"^\[[^\]]+\]:\s*(\S+)", text, flags=re.M)


def _anchors(md: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+\s+(.*)$", re.sub(r"```.*?```", "", md.read_text(), flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_every_link_in_the_docs_resolves_inside_the_repository():
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "README.md"]
    assert len(docs) >= 6, "README, docs/ and bench/README.md"
    checked = 0
    for md in docs:
        for link in _links(md):
            if link.startswith("#"):
                assert link[1:] in _anchors(md), f"{md.name}: no heading for {link}"
                continue
            if re.match(r"^[a-z]+:", link):
                assert link.startswith(("http://", "https://", "mailto:")), f"{md.name}: {link}"
                continue
            target = (md.parent / link.split("#")[0]).resolve()
            assert target.exists(), f"{md.relative_to(REPO)}: {link} does not exist"
            assert REPO in target.parents or target == REPO, f"{md.relative_to(REPO)}: {link} leaves the repository"
            checked += 1
        assert "../shared" not in md.read_text(), md
    assert checked >= 5


def test_readme_starts_with_the_two_commands():
    head = (REPO / "README.md").read_text()[:1500]
    assert "make demo" in head and "make test" in head


@pytest.mark.parametrize("command", ["score", "ablate", "gate", "inspect", "metrics", "compare", "prune", "render", "history"])
def test_each_command_help_ends_with_examples(command, run_cli):
    res = run_cli([command, "--help"])
    assert res.code == 0
    lines = [x.strip() for x in res.stdout.strip().splitlines()]
    assert "Examples:" in lines
    tail = lines[lines.index("Examples:") + 1:]
    assert tail and all(x.startswith(f"fitcli {command}") or x.startswith("fitcli ") for x in tail if x), tail


def test_python_floor_is_what_pyproject_promises():
    """requires-python says 3.10; 3.10 has no tomllib, so the package depends on tomli there and
    reads config with it; no file uses syntax newer than 3.10."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert meta["requires-python"] == ">=3.10"
    assert any(d.replace(" ", "").startswith("tomli") and "python_version<'3.11'" in d.replace(" ", "")
               for d in meta["dependencies"]), meta["dependencies"]
    for path in PKG.rglob("*.py"):
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 10))
    src = (PKG / "config.py").read_text()
    assert "import tomllib" in src and "import tomli as tomllib" in src


def test_config_reads_with_tomli_when_tomllib_is_missing(tmp_path):
    """Python 3.10's situation, simulated: no tomllib module, tomli in its place."""
    (tmp_path / "fitcli.toml").write_text('tau = 0.25\nmetrics = ["act_mean"]\n')
    (tmp_path / "tomli.py").write_text("from tomllib import *  # stand-in for the tomli package\n"
                                       "from tomllib import TOMLDecodeError, load, loads\n")
    probe = ("import sys, importlib\nsys.path.insert(0, '.')\nimport tomli\nsys.modules['tomllib'] = None\n"
             "import fitcli.config as c\ncfg, where = c.load_config(None)\nprint(c.tomllib.__name__, cfg)\n")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "tomli {'tau': 0.25, 'metrics': ['act_mean']}"


def test_the_api_docs_complete_example_runs(tmp_path):
    """docs/api.md's complete example, run as a user would from a checkout: its printed claims hold."""
    text = (REPO / "docs" / "api.md").read_text()
    section = text[text.index("## A complete example"):]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    (tmp_path / "sample_models").symlink_to(REPO / "sample_models")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert "[3, 17] [5, 20]" in lines
    assert "9 0.651" in lines and "[5, 20]" in lines
    assert "True" in lines
    assert (tmp_path / "mlp-report.json").exists()
