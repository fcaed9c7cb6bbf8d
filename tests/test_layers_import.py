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
