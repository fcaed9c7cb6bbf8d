"""Import layers, checked on the source by AST (imports anywhere in a file, functions included):
discovery never imports the engine (nor anything above it), and offloading finds blocks through
discovery, not through the block-ablation module."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "fitcli"
ABOVE_DISCOVERY = ("fitcli.engine", "fitcli.api", "fitcli.ablation", "fitcli.tracker", "fitcli.residual",
                   "fitcli.cli", "fitcli.clikit", "fitcli.pruning", "fitcli.report")


def imported(path: Path) -> set[str]:
    """Every module named by an import in the file; ``from a import b`` gives ``a`` and ``a.b``."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _hits(names: set[str], banned: tuple[str, ...]) -> set[str]:
    return {n for n in names for b in banned if n == b or n.startswith(b + ".")}


def test_discovery_never_imports_the_engine():
    files = sorted((PKG / "discovery").rglob("*.py"))
    assert len(files) >= 5  # a package, split by concern
    bad = {f.name: _hits(imported(f), ABOVE_DISCOVERY) for f in files}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_offload_finds_blocks_through_discovery():
    names = imported(PKG / "offload.py")
    assert not _hits(names, ("fitcli.residual",)), names
    assert any(n.startswith("fitcli.discovery") for n in names)


def test_the_rules_see_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from fitcli.engine import audit\n    import fitcli.residual\n")
    assert _hits(imported(f), ABOVE_DISCOVERY) == {"fitcli.engine", "fitcli.engine.audit", "fitcli.residual"}


CLI = ("fitcli.cli", "fitcli.clikit")


def _cli_module(path: Path) -> bool:
    return path.parent == PKG and (path.stem in ("cli", "clikit", "__main__") or path.stem.startswith("cmd_"))


def test_the_engine_never_imports_ablation():
    for f in (PKG / "engine.py", PKG / "feeder.py"):
        assert not _hits(imported(f), ("fitcli.ablation",)), f.name


def test_nothing_below_the_command_line_imports_it():
    below = [f for f in sorted(PKG.rglob("*.py")) if not _cli_module(f)]
    bad = {str(f.relative_to(PKG)): _hits(imported(f), CLI) | {n for n in imported(f) if n.startswith("fitcli.cmd_")}
           for f in below}
    assert not {k: v for k, v in bad.items() if v}, bad


def _private_imports(path: Path) -> list[str]:
    """``from fitcli.x import _name`` and ``fitcli.x._name`` / ``mod._name`` attribute reads of
    another fitcli module imported by this file."""
    tree = ast.parse(path.read_text())
    out, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fitcli"):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    out.append(f"{node.module}.{a.name}")
                else:
                    modules.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            modules.update(a.asname or a.name for a in node.names if a.name.startswith("fitcli"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in modules):
            out.append(f"{node.value.id}.{node.attr}")
    return out


def test_no_private_name_crosses_a_module():
    bad = {str(f.relative_to(REPO)): _private_imports(f) for f in sorted(PKG.rglob("*.py"))}
    assert not {k: v for k, v in bad.items() if v}, {k: v for k, v in bad.items() if v}


def test_the_private_name_rule_sees_both_forms(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from fitcli.validate import _corr\nfrom fitcli import report\nx = report._meta\n")
    assert _private_imports(f) == ["fitcli.validate._corr", "report._meta"]
