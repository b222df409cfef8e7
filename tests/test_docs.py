"""The README and docs/ point only at what exists: every relative link (and its #anchor), every
code path in backticks, and every dotted name of our code (``runs.services.run_start``)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
APPS = ("core", "runs", "approvals", "demo", "bench", "tests")
# Written by commands at run time, never committed.
GENERATED = (
    "var/",
    "bench/results.json",
    "bench/pages.json",
    "bench/soak.json",
    "bench/peers.json",
    "bench/logs/",
)
# Workflow keys (``demo.crm_update``) and Celery task names look dotted too: the ones declared.
DECLARED = {
    name
    for source in ROOT.glob("[a-z]*/**/*.py")
    if ".venv" not in source.parts
    for name in re.findall(r'(?:workflow|shared_task)\(\s*(?:name=)?"([\w.]+)"', source.read_text())
}

LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")
PATH = re.compile(r"^(?:\.ci|scripts|docs|templates|static|tests|core|runs|approvals|demo|bench)/[\w./-]*$")
DOTTED = re.compile(rf"^(?:{'|'.join(APPS)})(?:\.\w+)+$")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc: Path) -> None:
    broken = []
    for target in LINK.findall(doc.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (doc.parent / file_part).resolve() if file_part else doc
        outside = not resolved.exists() or not resolved.is_relative_to(ROOT)
        if outside or (anchor and resolved.suffix == ".md" and anchor not in anchors(resolved)):
            broken.append(target)
    assert not broken, f"{doc.name}: links that lead nowhere: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_code_path_and_dotted_name_exists(doc: Path) -> None:
    missing = []
    for code in CODE.findall(doc.read_text()):
        code = code.strip()
        if PATH.match(code) and not code.startswith(GENERATED):
            if not (ROOT / code.split("::")[0]).exists():
                missing.append(code)
        elif DOTTED.match(code) and code not in DECLARED and not _resolves(code):
            missing.append(code)
    assert not missing, f"{doc.name} names what does not exist: {missing}"


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                target = getattr(target, name)
        except AttributeError:
            return False
        return True
    return False


def test_the_readme_is_a_front_door() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "../shared" not in readme and all("../shared" not in d.read_text() for d in DOCS)
