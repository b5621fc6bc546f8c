"""The documentation site builds strictly, and the README stays a short page whose links land.

``mkdocs build --strict`` (mkdocs.yml turns every link, anchor and navigation problem into a
warning, and ``--strict`` makes a warning fatal). The README is not part of the site: its links into
``docs/`` are checked here against the built pages' anchors.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_docs_markdown import fenced_blocks

README = ROOT / "README.md"
# The two set-up commands the README opens with: CI runs the second one exactly (.ci/run).
SET_UP = """\
# Start a local fleet of 3 machines behind a simulated Fly edge (no Fly account needed):
python3 -m venv .venv && .venv/bin/pip install -q -e ".[demo]" && .venv/bin/fly-replay-edge

# Run the tests (on the pinned versions the image runs):
python3 -m venv .venv && .venv/bin/pip install -q -c requirements.lock -c requirements-dev.lock -e ".[dev]" && .venv/bin/python -m pytest
"""  # noqa: E501  (the README's line, as written)


class _Ids(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.ids.update(value for name, value in attrs if name == "id" and value)


def build(site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = build(out)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}{result.stderr}"
    return out


def test_the_site_builds_strictly_with_every_page_in_the_navigation(site: Path) -> None:
    pages = sorted(path.stem for path in (ROOT / "docs").glob("*.md"))
    built = sorted(path.parent.name if path.parent != site else "index" for path in site.glob("**/index.html"))
    assert [page for page in pages if page not in built] == []
    assert (site / "edge-page.png").exists()


def test_a_broken_anchor_fails_the_strict_build(tmp_path: Path) -> None:
    # The build must really check anchors: a copy of the docs with one link to a missing heading fails.
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    broken = tmp_path / "docs" / "index.md"
    broken.write_text(broken.read_text() + "\nSee [nowhere](deploy.md#no-such-heading).\n")
    (tmp_path / "mkdocs.yml").write_text((ROOT / "mkdocs.yml").read_text())
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "no-such-heading" in result.stdout + result.stderr


def test_the_readme_is_a_short_page_that_opens_with_the_two_commands() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines: move the detail into docs/"
    first = fenced_blocks(README)[0]
    assert first.language == "sh"
    assert first.text == SET_UP
    ci = (ROOT / ".ci" / "run").read_text()
    # .ci/run passes its own arguments on to pytest ("$@"); with none, it runs the README's line.
    runs = [line.removesuffix(' "$@"') for line in ci.splitlines()]
    assert SET_UP.splitlines()[-1] in runs, ".ci/run no longer runs the README's test command"


def test_the_readmes_links_into_docs_land_on_a_page_and_heading(site: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", README.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        if not path:
            ids = {re.sub(r"[^a-z0-9 -]", "", line[3:].lower()).replace(" ", "-") for line in _headings(README)}
            if anchor not in ids:
                broken.append(target)
            continue
        if not (ROOT / path).exists():
            broken.append(target)
            continue
        if anchor:
            page = Path(path)
            html = site / ("index.html" if page.stem == "index" else f"{page.stem}/index.html")
            parser = _Ids()
            parser.feed(html.read_text())
            if anchor not in parser.ids:
                broken.append(target)
    assert broken == [], f"README.md links to missing pages or headings: {broken}"


def test_the_readmes_mount_example_is_the_one_the_sdk_page_shows() -> None:
    readme = [block for block in fenced_blocks(README) if block.title == "my_server.py"]
    page = [block for block in fenced_blocks(ROOT / "docs" / "add-to-your-server.md") if block.title == "my_server.py"]
    assert len(readme) == 1
    assert len(page) == 1
    assert readme[0].text == page[0].text, "README.md and docs/add-to-your-server.md show different my_server.py"


def _headings(page: Path) -> list[str]:
    return [line for line in page.read_text().splitlines() if line.startswith("## ")]
