"""Autostop and in-memory MCP sessions, end to end with the demo app (fly.toml's auto_stop_machines).

``suspend`` keeps a session: its next call resumes the owner and the count continues. ``stop``
loses it: the owner comes back with empty memory and answers 404; a new session works. A client
holding a stream open keeps its owner busy, so autostop leaves that machine alone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client

from tests.edge.edge_cli import FleetProcess, wait_gone

pytestmark = pytest.mark.anyio

_HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
_VERSION = "2025-11-25"


def _fleet(tmp_path: Path, auto_stop: str) -> FleetProcess:
    fly_toml = tmp_path / "fly.toml"
    fly_toml.write_text(
        f'app = "autostop-demo"\nprimary_region = "lcl"\n\n[http_service]\n  internal_port = 8080\n'
        f'  auto_stop_machines = "{auto_stop}"\n  min_machines_running = 0\n'
    )
    args = ["--machines", "2", "--fly-toml", str(fly_toml), "--autostop-interval", "0.5"]
    return FleetProcess(args, tmp_path / "edge.log")


@pytest.fixture
def fleets() -> Iterator[list[FleetProcess]]:
    started: list[FleetProcess] = []
    yield started
    for process in started:
        pids = [m["pid"] for m in process.status()["machines"] if m["pid"]] if process.url else []
        assert process.stop() == 0
        assert not wait_gone(pids + process.machine_pids)


class RawSession:
    """An MCP session over plain POSTs: no stream held open between calls, so its owner can go idle."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.token = ""
        self.calls = 1

    async def open(self) -> None:
        params = {"protocolVersion": _VERSION, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
        response = await self._post({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params})
        assert response.status_code == 200, response.text
        self.token = response.headers["mcp-session-id"]
        await self._post({"jsonrpc": "2.0", "method": "notifications/initialized"})

    async def call(self, tool: str) -> httpx.Response:
        self.calls += 1
        call = {"jsonrpc": "2.0", "id": self.calls, "method": "tools/call", "params": {"name": tool, "arguments": {}}}
        return await self._post(call)

    async def _post(self, message: dict[str, Any]) -> httpx.Response:
        headers = dict(_HEADERS)
        if self.token:
            headers |= {"mcp-session-id": self.token, "mcp-protocol-version": _VERSION}
        return await self.client.post("/mcp", headers=headers, content=json.dumps(message))


def _result_text(response: httpx.Response) -> str:
    match = re.search(r'"text"\s*:\s*"([^"]*)"', response.text)
    assert match, response.text
    return match.group(1)


def _state(fleet: FleetProcess, machine_id: str) -> str:
    return next(m["state"] for m in fleet.status()["machines"] if m["id"] == machine_id)


async def _wait_state(fleet: FleetProcess, machine_id: str, state: str, within: float = 15) -> None:
    with anyio.fail_after(within):
        while _state(fleet, machine_id) != state:  # noqa: ASYNC110  # another process: poll its status
            await anyio.sleep(0.1)


async def test_autostop_suspend_keeps_the_session_count(tmp_path: Path, fleets: list[FleetProcess]) -> None:
    fleet = _fleet(tmp_path, "suspend")
    fleets.append(fleet)
    fleet.wait_ready()
    async with httpx.AsyncClient(base_url=fleet.url, timeout=30) as client:
        session = RawSession(client)
        await session.open()
        owner = session.token.split(".", 1)[0]
        assert _result_text(await session.call("count")) == "1"
        await _wait_state(fleet, owner, "suspended")
        again = await session.call("count")
    assert again.status_code == 200
    assert _result_text(again) == "2"  # resumed with its memory
    assert _state(fleet, owner) == "started"
    assert fleet.status()["autostops"] >= 1


async def test_autostop_stop_loses_the_session_and_a_new_one_works(tmp_path: Path, fleets: list[FleetProcess]) -> None:
    fleet = _fleet(tmp_path, "stop")
    fleets.append(fleet)
    fleet.wait_ready()
    async with httpx.AsyncClient(base_url=fleet.url, timeout=30) as client:
        session = RawSession(client)
        await session.open()
        owner = session.token.split(".", 1)[0]
        assert _result_text(await session.call("count")) == "1"
        await _wait_state(fleet, owner, "stopped")
        lost = await session.call("count")
        fresh = RawSession(client)
        await fresh.open()
        first = await fresh.call("count")
    assert lost.status_code == 404
    assert _result_text(first) == "1"


async def test_a_client_holding_a_stream_keeps_its_owner_running(tmp_path: Path, fleets: list[FleetProcess]) -> None:
    fleet = _fleet(tmp_path, "stop")
    fleets.append(fleet)
    fleet.wait_ready()
    async with Client(f"{fleet.url}/mcp", mode="legacy") as client:
        owner = str((await client.call_tool("whoami", {})).content[0].text)
        other = next(m["id"] for m in fleet.status()["machines"] if m["id"] != owner)
        await _wait_state(fleet, other, "stopped")
        await anyio.sleep(1.5)  # three more checks
        assert _state(fleet, owner) == "started"
        assert str((await client.call_tool("count", {})).content[0].text) == "1"
