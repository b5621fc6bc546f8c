"""The build context ``fly deploy`` uploads: what ``.dockerignore`` lets through, on real trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.dockerignore import build_context, excluded, read_rules

RULES = read_rules((ROOT / ".dockerignore").read_text())
# What the Dockerfile copies: the lock, the project metadata (pyproject names README.md), the code.
IMAGE_INPUTS = {"requirements.lock", "pyproject.toml", "README.md", "app", "fly_replay_router"}
CACHES = ("__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis")


def copied_sources() -> list[str]:
    sources = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            sources += [word for word in line.split()[1:-1] if not word.startswith("--")]
    return sources


def test_the_repositorys_own_tree_sends_only_what_the_image_copies() -> None:
    # The working tree as a developer has it after the README's commands: a venv, git, caches.
    assert (ROOT / ".venv").is_dir()
    assert (ROOT / ".git").exists()
    sent = build_context(ROOT, RULES)
    assert {path.split("/", 1)[0] for path in sent} == IMAGE_INPUTS
    for source in copied_sources():
        assert any(path == source or path.startswith(source + "/") for path in sent), source
    assert "app/main.py" in sent
    assert "fly_replay_router/serve.py" in sent
    assert "fly_replay_router/py.typed" in sent
    assert not [path for path in sent if any(cache in path.split("/") for cache in CACHES) or path.endswith(".pyc")]
    tracked_code = {path.relative_to(ROOT).as_posix() for path in (ROOT / "fly_replay_router").rglob("*.py")}
    assert {path for path in tracked_code if "__pycache__" not in path} <= sent


def test_a_tree_with_every_kind_of_leftover_sends_none_of_them(tmp_path: Path) -> None:
    wanted = [
        "requirements.lock",
        "pyproject.toml",
        "README.md",
        "app/__init__.py",
        "app/main.py",
        "fly_replay_router/__init__.py",
        "fly_replay_router/edge/static/page.js",
        "fly_replay_router/py.typed",
    ]
    leftovers = [
        ".venv/lib/python3.11/site-packages/mcp/__init__.py",
        ".venv/bin/python",
        ".git/HEAD",
        ".git/objects/ab/cdef",
        ".gitignore",
        ".dockerignore",
        ".env",
        ".ci/run",
        "tests/test_machines.py",
        "tests/edge/conftest.py",
        "docs/edge-page.png",
        "fly.toml",
        "bench-results.json",
        "build/lib/fly_replay_router/__init__.py",
        "dist/fly_replay_router-0.1.0-py3-none-any.whl",
        "fly_replay_router.egg-info/PKG-INFO",
        "__pycache__/x.cpython-311.pyc",
        "app/__pycache__/main.cpython-311.pyc",
        "fly_replay_router/edge/__pycache__/proxy.cpython-311.pyc",
        "fly_replay_router/stray.pyc",
        "fly_replay_router/.mypy_cache/3.11/x.json",
        ".mypy_cache/3.11/app/main.data.json",
        ".ruff_cache/0.6.0/123",
        ".pytest_cache/v/cache/nodeids",
        ".hypothesis/examples/ab/cd",
    ]
    for path in wanted + leftovers:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    assert build_context(tmp_path, RULES) == set(wanted)


# Docker's documented examples (https://docs.docker.com/build/concepts/context/#dockerignore-files):
# the matcher the two tests above rely on reads them as Docker does.
@pytest.mark.parametrize(
    ("lines", "path", "left_out"),
    [
        (["*/temp*"], "somedir/temporary.txt", True),
        (["*/temp*"], "somedir/temp/file", True),
        (["*/temp*"], "temporary.txt", False),
        (["*/*/temp*"], "somedir/subdir/temporary.txt", True),
        (["*/*/temp*"], "somedir/temporary.txt", False),
        (["temp?"], "tempa", True),
        (["temp?"], "tempab", False),
        (["**/*.go"], "main.go", True),
        (["**/*.go"], "cmd/tool/main.go", True),
        (["*.md", "!README*.md", "README-secret.md"], "README.md", False),
        (["*.md", "!README*.md", "README-secret.md"], "README-secret.md", True),
        (["*.md", "!README*.md", "README-secret.md"], "CHANGES.md", True),
        (["*.md", "README-secret.md", "!README*.md"], "README-secret.md", False),
        (["/.venv/"], ".venv/bin/python", True),
        (["# a comment", "  .git  "], ".git/HEAD", True),
        (["*"], "app/main.py", True),
        (["*", "!app"], "app/main.py", False),
        (["*", "!app", "**/__pycache__"], "app/__pycache__/main.pyc", True),
        (["**/__pycache__"], "__pycache__/x.pyc", True),
        (["a[bc]d"], "acd", True),
        (["a\\*b"], "a*b", True),
        (["a\\*b"], "axb", False),
    ],
)
def test_the_matcher_reads_dockerignore_as_docker_does(lines: list[str], path: str, left_out: bool) -> None:
    assert excluded(read_rules("\n".join(lines)), path) is left_out
