"""Autostop and in-memory MCP sessions, end to end with the demo app (fly.toml's auto_stop_machines).

``suspend`` keeps a session: its next call resumes the owner and the count continues. ``stop``
loses it: the owner comes back with empty memory and answers 404; a new session works. A client
holding a stream open keeps its owner busy, so autostop leaves that machine alone.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import pytest
from mcp import Client

from tests.edge.edge_cli import FleetProcess, running_fleet
from tests.mcp_http import call_count_message, open_session, session_headers, tool_text

pytestmark = pytest.mark.anyio


def _fleet_args(tmp_path: Path, auto_stop: str) -> tuple[list[str], Path]:
    fly_toml = tmp_path / "fly.toml"
    fly_toml.write_text(
        f'app = "autostop-demo"\nprimary_region = "lcl"\n\n[http_service]\n  internal_port = 8080\n'
        f'  auto_stop_machines = "{auto_stop}"\n  min_machines_running = 0\n'
    )
    return ["--machines", "2", "--fly-toml", str(fly_toml), "--autostop-interval", "0.5"], tmp_path / "edge.log"


async def _count(client: httpx.AsyncClient, token: str) -> httpx.Response:
    """One ``count`` call over a plain POST: no stream held open, so the owner can go idle."""
    return await client.post("/mcp", headers=session_headers(token), json=call_count_message(2))


def _state(fleet: FleetProcess, machine_id: str) -> str:
    return next(m["state"] for m in fleet.status()["machines"] if m["id"] == machine_id)


async def _wait_state(fleet: FleetProcess, machine_id: str, state: str, within: float = 15) -> None:
    with anyio.fail_after(within):
        while _state(fleet, machine_id) != state:  # noqa: ASYNC110  # another process: poll its status
            await anyio.sleep(0.1)


async def test_autostop_suspend_keeps_the_session_count(tmp_path: Path) -> None:
    with running_fleet(*_fleet_args(tmp_path, "suspend")) as fleet:
        async with httpx.AsyncClient(base_url=fleet.url, timeout=30) as client:
            token = await open_session(client, "/mcp")
            owner = token.split(".", 1)[0]
            assert tool_text(await _count(client, token)) == "1"
            await _wait_state(fleet, owner, "suspended")
            again = await _count(client, token)
        assert again.status_code == 200
        assert tool_text(again) == "2"  # resumed with its memory
        assert _state(fleet, owner) == "started"
        assert fleet.status()["autostops"] >= 1


async def test_autostop_stop_loses_the_session_and_a_new_one_works(tmp_path: Path) -> None:
    with running_fleet(*_fleet_args(tmp_path, "stop")) as fleet:
        async with httpx.AsyncClient(base_url=fleet.url, timeout=30) as client:
            token = await open_session(client, "/mcp")
            owner = token.split(".", 1)[0]
            assert tool_text(await _count(client, token)) == "1"
            await _wait_state(fleet, owner, "stopped")
            lost = await _count(client, token)
            first = await _count(client, await open_session(client, "/mcp"))
        assert lost.status_code == 404
        assert tool_text(first) == "1"


async def test_a_client_holding_a_stream_keeps_its_owner_running(tmp_path: Path) -> None:
    with running_fleet(*_fleet_args(tmp_path, "stop")) as fleet:
        async with Client(f"{fleet.url}/mcp", mode="legacy") as client:
            owner = str((await client.call_tool("whoami", {})).content[0].text)
            other = next(m["id"] for m in fleet.status()["machines"] if m["id"] != owner)
            await _wait_state(fleet, other, "stopped")
            await anyio.sleep(1.5)  # three more checks
            assert _state(fleet, owner) == "started"
            assert str((await client.call_tool("count", {})).content[0].text) == "1"
