"""MCP helpers for tests: handshake-era MCP in raw HTTP, and the official client with its tokens.

The official client hides status codes (and never re-initializes after a 404); the raw helpers
send the same JSON-RPC messages and hand back the ``httpx.Response``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

HANDSHAKE = "2025-11-25"
JSON_AND_SSE = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": {"name": "tests", "version": "1"}},
}


def tool_call(name: str, arguments: dict[str, Any] | None = None, request_id: int = 2) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments or {}},
    }


def call_count_message(request_id: int) -> dict[str, Any]:
    return tool_call("count", request_id=request_id)


def measure_body(size: int) -> bytes:
    return json.dumps(tool_call("measure", {"data": "x" * size}, request_id=7)).encode()


def read_rpc_result(response: httpx.Response) -> Any:
    """The JSON-RPC result of a Streamable HTTP answer, whether JSON or a one-event SSE stream."""
    if response.headers["content-type"].startswith("text/event-stream"):
        data = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
        return json.loads(data[-1])["result"]
    return response.json()["result"]


def tool_text(response: httpx.Response) -> str:
    return str(read_rpc_result(response)["content"][0]["text"])


async def open_session(raw: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None) -> str:
    """Initialize a handshake-era session with raw HTTP; return its token. ``headers`` go on both requests."""
    extra = headers or {}
    initialize = await raw.post(url, headers={**JSON_AND_SSE, **extra}, json=INITIALIZE)
    assert initialize.status_code == 200, initialize.text
    token = initialize.headers["mcp-session-id"]
    initialized = await raw.post(
        url, headers=session_headers(token, **extra), json={"jsonrpc": "2.0", "method": "notifications/initialized"}
    )
    assert initialized.status_code == 202, initialized.text
    return token


def session_headers(token: str, **extra: str) -> dict[str, str]:
    return {**JSON_AND_SSE, "mcp-session-id": token, "mcp-protocol-version": HANDSHAKE, **extra}


@asynccontextmanager
async def client_recording_tokens(url: str) -> AsyncIterator[tuple[Client, list[str]]]:
    """The official client in legacy mode, and every ``Mcp-Session-Id`` its responses carried."""
    tokens: list[str] = []

    async def record_token(response: httpx2.Response) -> None:
        if "mcp-session-id" in response.headers:
            tokens.append(response.headers["mcp-session-id"])

    async with (
        httpx2.AsyncClient(event_hooks={"response": [record_token]}, timeout=30) as http,
        Client(streamable_http_client(url, http_client=http), mode="legacy") as client,
    ):
        yield client, tokens


class ServedBy:
    """The ``affinity-served-by`` header of every answer an ``httpx2`` client receives (use it as the
    client's response event hook): who served each request, and how it arrived."""

    def __init__(self) -> None:
        self.values: list[tuple[str, str]] = []  # (request path, header value)

    async def __call__(self, response: httpx2.Response) -> None:
        value = response.headers.get("affinity-served-by")
        if value is not None:
            self.values.append((response.request.url.path, value))

    def handed_over(self, path: str = "/") -> int:
        """Answers to requests under ``path`` that a sibling worker handed over to their owner."""
        return sum(
            1
            for at, value in self.values
            if at.startswith(path) and "handover" in value.rpartition("via=")[2].split("+")
        )


@asynccontextmanager
async def client_recording_served_by(url: str, served_by: ServedBy) -> AsyncIterator[Client]:
    """The official client in legacy mode, its answers' ``affinity-served-by`` going to ``served_by``."""
    async with (
        httpx2.AsyncClient(event_hooks={"response": [served_by]}, timeout=httpx2.Timeout(30, read=300)) as http,
        Client(streamable_http_client(url, http_client=http), mode="legacy") as client,
    ):
        yield client
