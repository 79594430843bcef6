"""Every reference a reader of the repository meets can be followed inside it: the code and the
pages cite `docs/*.md` (which exist, with the sections named), never a design or contract file
kept outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.integration.docs.snippets import REPO

SOURCE_DIRS = ("tuner", "probes", "storage", "api", "tests", "bench", "scripts", "examples", "docs")
TOP_FILES = ("README.md", "pyproject.toml", "Makefile", "Dockerfile", "docker-compose.yml")
SUFFIXES = {".py", ".md", ".toml", ".html", ".sh", ".yml", ".yaml", ".j2", ".txt"}
# Spelled in two parts so that this file does not cite them itself.
OUTSIDE_FILES = ("DESIGN" + ".md", "CONTRACT" + ".md")

_DOCS_PATH = re.compile(r"\bdocs/(?P<page>[\w-]+\.md)(?:#(?P<anchor>[\w-]+))?")
_MARKDOWN_LINK = re.compile(r"\]\((?P<target>[\w./-]+\.md)?(?:#(?P<anchor>[\w-]+))?\)")
_HEADING = re.compile(r"^#{1,6}\s+(?P<title>.+?)\s*$", re.M)
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _files() -> list[Path]:
    found = [REPO / name for name in TOP_FILES if (REPO / name).is_file()]
    for directory in SOURCE_DIRS:
        found += [p for p in (REPO / directory).rglob("*") if p.is_file() and p.suffix in SUFFIXES]
    return sorted(found)


def _slug(title: str) -> str:
    """The anchor a Markdown renderer (GitHub's) gives a heading."""
    text = title.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_slug(match["title"]) for match in _HEADING.finditer(text)}


FILES = _files()


def test_the_files_scanned_include_code_and_pages() -> None:
    names = {str(p.relative_to(REPO)) for p in FILES}
    assert {"README.md", "docs/contract.md", "tuner/planner.py", "api/app.py"} <= names


@pytest.mark.parametrize("name", OUTSIDE_FILES)
def test_nothing_cites_a_file_outside_the_repository(name: str) -> None:
    citing = [
        f"{p.relative_to(REPO)}:{n}"
        for p in FILES
        for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if name in line
    ]
    assert citing == [], f"{name} is not in the repository; cite the page of docs/ that holds it: {citing}"


def test_every_docs_page_the_code_names_exists_with_its_section() -> None:
    missing = []
    for path in FILES:
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in _DOCS_PATH.finditer(text):
            page = REPO / "docs" / match["page"]
            if not page.is_file():
                missing.append(f"{path.relative_to(REPO)}: docs/{match['page']}")
            elif match["anchor"] and match["anchor"] not in _anchors(page):
                missing.append(f"{path.relative_to(REPO)}: docs/{match['page']}#{match['anchor']}")
    assert missing == []


def test_every_link_between_pages_reaches_a_page_and_a_section() -> None:
    broken = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = _FENCE.sub("", page.read_text(encoding="utf-8"))
        for match in _MARKDOWN_LINK.finditer(text):
            target = (page.parent / match["target"]).resolve() if match["target"] else page
            if not target.is_file():
                broken.append(f"{page.relative_to(REPO)}: {match['target']}")
            elif match["anchor"] and match["anchor"] not in _anchors(target):
                broken.append(f"{page.relative_to(REPO)}: {match['target'] or ''}#{match['anchor']}")
    assert broken == []
