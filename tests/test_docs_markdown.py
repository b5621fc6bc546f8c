"""Reading the docs' Markdown: fenced code blocks and tables, with the line each starts on.

The doc tests (``test_docs_blocks.py``, ``test_docs_reference.py``, ``test_docs_site.py``) share these
readers, and the tests here pin what they find in the grammar the pages use (CommonMark fences,
GitHub-style pipe tables, the Material theme's ``title="..."`` on a fence).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import ROOT

PAGES = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
NOT_RUN = "Not run by the tests:"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`\n]*)$")
_TITLE = re.compile(r"""title=(?:"([^"]*)"|'([^']*)')""")
_CODE_SPAN = re.compile(r"`([^`]+)`")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced code block: its language, its title (Material's ``title="..."``) and its text."""

    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    title: str
    text: str
    section: str  # the heading above it

    @property
    def where(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page
        return f"{page}:{self.line}"

    @property
    def not_run(self) -> bool:
        return self.title.startswith(NOT_RUN)


@dataclass
class Table:
    """One pipe table: its header cells and rows (cells as written, escapes ``\\|`` kept as ``|``)."""

    page: Path
    line: int
    section: str
    header: list[str]
    rows: list[dict[str, str]] = field(default_factory=list)
    row_lines: list[int] = field(default_factory=list)


def fenced_blocks(page: Path) -> list[Block]:
    """Every fenced code block of ``page``, in order (indented fences inside list items included)."""
    lines = page.read_text().splitlines()
    blocks: list[Block] = []
    section = ""
    index = 0
    while index < len(lines):
        heading = _HEADING.match(lines[index])
        if heading:
            section = heading.group(2)
        opening = _FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, fence, info = opening.group("indent"), opening.group("fence"), opening.group("info").strip()
        body: list[str] = []
        close = index + 1
        while close < len(lines) and not re.match(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[close]):
            line = lines[close]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            close += 1
        title_match = _TITLE.search(info)
        title = next((group for group in title_match.groups() if group is not None), "") if title_match else ""
        language = info.split()[0] if info and not info.startswith("title=") else ""
        blocks.append(Block(page, index + 1, language, title, "\n".join(body) + "\n", section))
        index = close + 1
    return blocks


def tables(page: Path) -> list[Table]:
    """Every pipe table of ``page`` outside code blocks."""
    lines = page.read_text().splitlines()
    in_code = False
    section = ""
    found: list[Table] = []
    current: Table | None = None
    for number, line in enumerate(lines, start=1):
        if _FENCE.match(line):
            in_code = not in_code
            current = None
            continue
        if in_code:
            continue
        heading = _HEADING.match(line)
        if heading:
            section = heading.group(2)
        stripped = line.strip()
        if not stripped.startswith("|"):
            current = None
            continue
        cells = _cells(stripped)
        if current is None:
            current = Table(page, number, section, cells)
            found.append(current)
        elif all(re.fullmatch(r":?-{3,}:?", cell) for cell in cells):
            continue
        else:
            current.rows.append(dict(zip(current.header, cells, strict=False)))
            current.row_lines.append(number)
    return found


def table_under(page: Path, section: str, first_column: str) -> Table:
    """The table under the heading ``section`` whose first column is ``first_column``."""
    for table in tables(page):
        if table.section == section and table.header and table.header[0] == first_column:
            return table
    raise AssertionError(f"{page.relative_to(ROOT)} has no table under '{section}' with a '{first_column}' column")


def code_spans(cell: str) -> list[str]:
    """The inline code spans of a table cell or a line, in order."""
    return _CODE_SPAN.findall(cell)


def _cells(row: str) -> list[str]:
    inner = row.strip().removeprefix("|").removesuffix("|")
    parts = re.split(r"(?<!\\)\|", inner)
    return [part.strip().replace("\\|", "|") for part in parts]


def test_blocks_are_read_with_language_title_and_indented_fences(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        '# A\n\n```sh\necho one\n```\n\n1. step\n\n    ```sh title="Not run by the tests: why"\n'
        "    echo two\n    ```\n\n## B\n\n```\nplain\n```\n"
    )
    blocks = fenced_blocks(page)
    assert [(b.language, b.title, b.text, b.section, b.line) for b in blocks] == [
        ("sh", "", "echo one\n", "A", 3),
        ("sh", "Not run by the tests: why", "echo two\n", "A", 9),
        ("", "", "plain\n", "B", 15),
    ]
    assert [b.not_run for b in blocks] == [False, True, False]


def test_tables_are_read_with_escaped_pipes_and_not_from_code(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("## T\n\n| a | b |\n|---|---|\n| `x\\|y` | 2 |\n| 3 | 4 |\n\n```\n| not | a table |\n```\n")
    (table,) = tables(page)
    assert table.header == ["a", "b"]
    assert table.rows == [{"a": "`x|y`", "b": "2"}, {"a": "3", "b": "4"}]
    assert table.row_lines == [5, 6]
    assert code_spans(table.rows[0]["a"]) == ["x|y"]
