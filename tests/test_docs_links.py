"""Everything a reader is sent to lives in the repository: no citation of documents that are not
in it, and every relative link of the README and docs/ resolves to a file (and a heading, when it
names one)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SEARCHED = ("README.md", "docs", "fitcli", "bench", "examples", "tests")
TEXT_SUFFIXES = {".md", ".py", ".j2", ".html", ".toml", ".json", ".txt", ".cfg", ".yml", ".yaml"}
# the phrases are assembled so that this file does not match itself
MISSING = [re.compile(r"\bspec/[\w.-]+\.md\b"), re.compile("design" + r"[\s_-]+note", re.I),
           re.compile("seed" + r"[\s_-]+note", re.I)]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _files() -> list[Path]:
    out = []
    for name in SEARCHED:
        p = REPO / name
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out.extend(f for f in sorted(p.rglob("*")) if f.is_file() and f.suffix in TEXT_SUFFIXES
                       and "__pycache__" not in f.parts)
    return out


def test_no_reference_to_documents_outside_the_repository():
    files = _files()
    assert any(f.name == "README.md" for f in files) and any(f.suffix == ".py" for f in files)
    hits = []
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            hits += [f"{f.relative_to(REPO)}:{n}: {m.group(0)!r}" for pat in MISSING for m in pat.finditer(line)]
    assert not hits, "documents that are not in the repository are cited:\n" + "\n".join(hits)


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation but '-' and '_' dropped,
    spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    out: set[str] = set()
    fenced = False
    for line in md.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            base = _slug(line.lstrip("#"))
            slug, k = base, 1
            while slug in out:
                slug, k = f"{base}-{k}", k + 1
            out.add(slug)
    return out


def _markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "README.md"]


def _links(md: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.S)
    return [a or b for a, b in LINK.findall(text)]


def test_slug_matches_github_on_hand_examples():
    assert _slug(" Hugging Face folders") == "hugging-face-folders"
    assert _slug(" Heads and blocks") == "heads-and-blocks"
    assert _slug(" `--max-memory`: offload, and why") == "--max-memory-offload-and-why"
    assert _slug(" `metric_info`") == "metric_info"


@pytest.mark.parametrize("md", _markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(md: Path):
    broken = []
    for target in _links(md):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not broken, f"{md.relative_to(REPO)}: broken links:\n" + "\n".join(broken)
