"""The official SDK 2.x client, in legacy (handshake) mode: ``python mcp2_client.py URL SESSIONS CALLS``."""

import sys

import anyio
import httpx2
from common import report
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


async def main(url: str, sessions: int, calls: int) -> None:
    results: list[list[tuple[str, int]]] = []
    tokens: list[str] = []
    for _ in range(sessions):
        seen: list[str] = []

        async def record(response: httpx2.Response, seen: list[str] = seen) -> None:
            if "mcp-session-id" in response.headers and not seen:
                seen.append(response.headers["mcp-session-id"])

        async with (
            httpx2.AsyncClient(event_hooks={"response": [record]}) as http,
            Client(streamable_http_client(url, http_client=http), mode="legacy") as client,
        ):
            calls_seen = []
            for _ in range(calls):
                # The README's example has no whoami: the notes count, which is per machine, must
                # go up by one each call (another machine would answer "Session not found").
                counted = (await client.call_tool("add_note", {"text": "x"})).content[0].text  # type: ignore[union-attr]
                calls_seen.append(("", int(counted)))
        tokens.extend(seen)
        results.append(calls_seen)
    report("mcp", results, tokens)


anyio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
