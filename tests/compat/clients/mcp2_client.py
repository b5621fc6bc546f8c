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
        served_by: list[str] = []

        async def record(response: httpx2.Response, seen: list[str] = seen, served_by: list[str] = served_by) -> None:
            if "mcp-session-id" in response.headers and not seen:
                seen.append(response.headers["mcp-session-id"])
            if response.request.method == "POST":
                # The machine that answered, as the test's wrapper around the README's app names it.
                served_by.append(response.headers.get("x-served-by", ""))

        async with (
            httpx2.AsyncClient(event_hooks={"response": [record]}) as http,
            Client(streamable_http_client(url, http_client=http), mode="legacy") as client,
        ):
            calls_seen = []
            for _ in range(calls):
                # The README's example has no whoami: the machine comes from the response's x-served-by,
                # and the notes count, which is per machine, must go up by one each call.
                counted = (await client.call_tool("add_note", {"text": "x"})).content[0].text  # type: ignore[union-attr]
                calls_seen.append((served_by[-1], int(counted)))
        tokens.extend(seen)
        results.append(calls_seen)
    report("mcp", results, tokens)


anyio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
