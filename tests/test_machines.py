"""Two real machines of app.main:app (one app, one secret, two ids) and the official MCP client.

No edge here: requests sent to the wrong machine show the raw ``fly-replay`` answer that Fly's
proxy would act on.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import Machine

pytestmark = pytest.mark.anyio

HANDSHAKE = "2025-11-25"
JSON_AND_SSE = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


def call_count_message(request_id: int) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": {"name": "count", "arguments": {}}}


def tool_text(result: Any) -> str:
    return str(result.content[0].text)


async def test_a_session_counts_on_its_machine_and_the_other_machine_replays_it(
    two_machines: tuple[Machine, Machine],
) -> None:
    machine_a, machine_b = two_machines
    tokens: list[str] = []

    async def record_token(response: httpx2.Response) -> None:
        if "mcp-session-id" in response.headers:
            tokens.append(response.headers["mcp-session-id"])

    async with (
        httpx2.AsyncClient(event_hooks={"response": [record_token]}, timeout=30) as http,
        Client(streamable_http_client(f"{machine_a.url}/mcp", http_client=http), mode="legacy") as client,
    ):
        assert tool_text(await client.call_tool("whoami", {})) == machine_a.machine_id
        assert [tool_text(await client.call_tool("count", {})) for _ in range(3)] == ["1", "2", "3"]
        assert tokens
        assert len(set(tokens)) == 1  # one session, one token, on every response
        token = tokens[0]
        assert token.startswith(machine_a.machine_id + ".")

        # The same session's next request, landing on B: B answers for Fly's proxy, not for the client.
        async with httpx.AsyncClient(timeout=10) as raw:
            landed_on_b = await raw.post(
                f"{machine_b.url}/mcp",
                headers={**JSON_AND_SSE, "mcp-session-id": token, "mcp-protocol-version": HANDSHAKE},
                json=call_count_message(99),
            )
        assert landed_on_b.status_code == 307
        assert landed_on_b.headers["fly-replay"] == f"instance={machine_a.machine_id};timeout=5s;fallback=force_self"

        # B did not touch the session: A still counts on from 3.
        assert tool_text(await client.call_tool("count", {})) == "4"


async def test_a_replayed_request_that_fly_brought_back_gets_404(two_machines: tuple[Machine, Machine]) -> None:
    machine_a, machine_b = two_machines
    async with httpx.AsyncClient(timeout=10) as raw:
        initialize = await raw.post(
            f"{machine_a.url}/mcp",
            headers=JSON_AND_SSE,
            json={
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": HANDSHAKE,
                    "capabilities": {},
                    "clientInfo": {"name": "t", "version": "1"},
                },
            },
        )
        token = initialize.headers["mcp-session-id"]
        fell_back = await raw.post(
            f"{machine_b.url}/mcp",
            headers={
                **JSON_AND_SSE,
                "mcp-session-id": token,
                "mcp-protocol-version": HANDSHAKE,
                "fly-replay-failed": f"instance={machine_a.machine_id};reason=timeout;elapsed_ms=5001",
            },
            json=call_count_message(2),
        )
    assert fell_back.status_code == 404
    assert fell_back.json()["error"]["message"] == "Session not found"


async def test_a_token_of_another_fleet_gets_404_on_every_machine(two_machines: tuple[Machine, Machine]) -> None:
    foreign = (
        "aaaaaaaaaaaaaa.N2RhNGU4MDY2NWJkNGM2ZmI3MzIzMWQ2M2YwYzIyN2Y.awIoYA.o_lsb25IJNGzr0mevP5LEzeqMtBQ4HjtuWyDZfCkWgg"
    )
    async with httpx.AsyncClient(timeout=10) as raw:
        for machine in two_machines:
            response = await raw.post(
                f"{machine.url}/mcp",
                headers={**JSON_AND_SSE, "mcp-session-id": foreign, "mcp-protocol-version": HANDSHAKE},
                json=call_count_message(1),
            )
            assert response.status_code == 404
            assert "fly-replay" not in response.headers


async def test_legacy_sse_endpoint_carries_a_token_and_a_message_posted_to_the_other_machine_is_replayed(
    two_machines: tuple[Machine, Machine],
) -> None:
    machine_a, machine_b = two_machines
    session_ids: list[str] = []
    async with Client(
        sse_client(f"{machine_a.url}/sse", on_session_created=session_ids.append), mode="legacy"
    ) as client:
        assert [tool_text(await client.call_tool("count", {})) for _ in range(3)] == ["1", "2", "3"]
        assert tool_text(await client.call_tool("whoami", {})) == machine_a.machine_id
        assert len(session_ids) == 1
        token = session_ids[0]
        assert token.startswith(machine_a.machine_id + ".")

        async with httpx.AsyncClient(timeout=10) as raw:
            landed_on_b = await raw.post(
                f"{machine_b.url}/messages/",
                params={"session_id": token},
                headers={"content-type": "application/json"},
                content=json.dumps(call_count_message(50)),
            )
        assert landed_on_b.status_code == 307
        assert landed_on_b.headers["fly-replay"].startswith(f"instance={machine_a.machine_id};")
        assert tool_text(await client.call_tool("count", {})) == "4"


async def test_modern_clients_are_served_by_whichever_machine_they_hit(two_machines: tuple[Machine, Machine]) -> None:
    for machine in two_machines:
        async with Client(f"{machine.url}/mcp") as client:
            assert tool_text(await client.call_tool("whoami", {})) == machine.machine_id
            assert tool_text(await client.call_tool("measure", {"data": "héllo"})) == "5"


async def test_health_check_answers_on_every_machine(two_machines: tuple[Machine, Machine]) -> None:
    async with httpx.AsyncClient(timeout=10) as raw:
        for machine in two_machines:
            response = await raw.get(f"{machine.url}/healthz")
            assert (response.status_code, response.text) == (200, "ok")
