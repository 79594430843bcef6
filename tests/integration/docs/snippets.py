"""The code blocks of README.md and docs/*.md, as the snippet test reads them.

Every fenced block names its language, which says what the test does with it:

- `python`: the page's python blocks run in order, as one script (a page reads like a notebook),
  in a fresh directory, with the repository importable and no `TUNER_SERVER`.
- `bash`: each block runs with `bash -e`, in a fresh directory that holds `examples/`, with a
  tuner service (`tuner serve`, an estimate worker) where the block says `127.0.0.1:8000`.
- `console`: each `$ ` command runs the same way; a `micro-batch size` row it documents must be
  the row the command prints.
- `json`: parsed; a workload spec (a `"model"` key) is validated as `tuner plan` would.
- `text` (synopses, output, formulas) and `sql` (statement shapes with placeholders) are shown,
  not run.

A comment `<!-- snippet: ... -->` on the line before a block qualifies it: `starts a server` (run
in the background until its `/healthz` answers, then stopped), `needs gpu`, `needs docker`
(skipped where there is none), or `not run by the snippet test; <where it is tested instead>`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
PAGES = ("README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")))
RUN = frozenset({"python", "bash", "console"})
CHECKED = frozenset({"json"})
SHOWN = frozenset({"text", "sql"})
LANGUAGES = RUN | CHECKED | SHOWN

_FENCE = re.compile(r"^```(?P<language>[\w-]*)[^\n]*\n(?P<code>.*?)^```[ \t]*$", re.S | re.M)
_MARKER = re.compile(r"<!--\s*snippet:\s*(?P<marker>.*?)\s*-->\s*\Z", re.S)


@dataclass(frozen=True)
class Snippet:
    """One fenced block of a page."""

    page: str
    line: int
    """The line of its opening fence (1-based)."""
    language: str
    code: str
    marker: str | None = None
    """What the `<!-- snippet: ... -->` comment before it says."""

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def starts_server(self) -> bool:
        return self.marker == "starts a server"

    @property
    def needs(self) -> str | None:
        """`gpu` or `docker` when the block needs one."""
        if self.marker and self.marker.startswith("needs "):
            return self.marker.removeprefix("needs ")
        return None

    @property
    def not_run(self) -> str | None:
        """Where a block the snippet test does not run is tested instead."""
        if self.marker and self.marker.startswith("not run by the snippet test"):
            return self.marker
        return None


def snippets(page: str) -> list[Snippet]:
    """The fenced blocks of `page` (relative to the repository), in order."""
    text = (REPO / page).read_text(encoding="utf-8")
    found = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()]
        marker = _MARKER.search(before.rstrip("\n").rsplit("\n\n", 1)[-1])
        found.append(
            Snippet(
                page=page,
                line=before.count("\n") + 1,
                language=match.group("language"),
                code=match.group("code"),
                marker=marker.group("marker") if marker else None,
            )
        )
    return found


def all_snippets() -> list[Snippet]:
    return [snippet for page in PAGES for snippet in snippets(page)]


def console_commands(code: str) -> list[str]:
    """The `$ ` commands of a console block, continuation lines (`\\`) joined."""
    commands: list[str] = []
    current: list[str] | None = None
    for line in code.splitlines():
        if current is not None:
            current.append(line)
        elif line.startswith("$ "):
            current = [line[2:]]
        else:
            continue
        if not line.rstrip().endswith("\\"):
            commands.append("\n".join(current))
            current = None
    return commands


def documented_rows(code: str, label: str) -> list[str]:
    """The table rows of a console block's output whose first cell is `label`."""
    return [
        " ".join(cell.strip() for cell in line.strip("│ ").split("│"))
        for line in code.splitlines()
        if line.startswith("│") and line.strip("│ ").split("│")[0].strip() == label
    ]
