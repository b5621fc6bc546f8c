"""The README's "Add it to your MCP server" snippet, run exactly as written, on two machines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, Machine, running_pair
from tests.mcp_http import client_recording_tokens, open_session

pytestmark = pytest.mark.anyio


def readme_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Add it to your MCP server", 1)[1]
    match = re.search(r"```python[^\n]*\n(.*?)```", section, re.DOTALL)
    assert match, "the README section has no python block"
    return match.group(1)


@pytest.fixture(scope="module")
def snippet_machines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Machine, Machine]]:
    folder: Path = tmp_path_factory.mktemp("user-app")
    (folder / "my_server.py").write_text(readme_snippet())
    with running_pair(
        ("a1a1a1a1a1a1a1", "b2b2b2b2b2b2b2"), app="my_server:api", extra_env={"PYTHONPATH": str(folder)}
    ) as pair:
        yield pair


def tool_text(result: Any) -> str:
    return str(result.content[0].text)


async def test_the_snippet_serves_mcp_at_the_sub_path_with_affinity(snippet_machines: tuple[Machine, Machine]) -> None:
    machine_a, machine_b = snippet_machines
    async with client_recording_tokens(f"{machine_a.url}/notes/mcp") as (client, tokens):
        counts = [tool_text(await client.call_tool("add_note", {"text": f"n{i}"})) for i in range(3)]
        assert counts == ["1", "2", "3"]
        assert tokens[0].startswith(machine_a.machine_id + ".")
        async with httpx.AsyncClient(timeout=10) as raw:
            landed_on_b = await raw.post(
                f"{machine_b.url}/notes/mcp",
                headers={
                    "accept": "application/json, text/event-stream",
                    "content-type": "application/json",
                    "mcp-session-id": tokens[0],
                    "mcp-protocol-version": "2025-11-25",
                },
                json={"jsonrpc": "2.0", "id": 9, "method": "tools/list"},
            )
        assert landed_on_b.status_code == 307
        assert landed_on_b.headers["fly-replay"].startswith(f"instance={machine_a.machine_id};")


async def test_the_snippets_event_streams_are_uncompressed(snippet_machines: tuple[Machine, Machine]) -> None:
    machine_a, _ = snippet_machines
    url = f"{machine_a.url}/notes/mcp"
    async with httpx.AsyncClient(timeout=10) as raw:
        token = await open_session(raw, url)
        headers = {"accept": "text/event-stream", "mcp-session-id": token, "mcp-protocol-version": "2025-11-25"}
        async with raw.stream("GET", url, headers=headers) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            assert stream.headers["content-encoding"] == "none"


def test_the_snippet_on_fly_without_a_secret_stops_with_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "my_server.py").write_text(readme_snippet())
    env = {k: v for k, v in os.environ.items() if k != "AFFINITY_SECRET"}
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "my_server:api", "--port", "0"],
        cwd=tmp_path, env={**env, "FLY_MACHINE_ID": "a1a1a1a1a1a1a1"}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "fly-replay-router cannot start: AFFINITY_SECRET is not set" in result.stderr
