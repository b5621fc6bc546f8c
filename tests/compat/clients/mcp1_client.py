"""The official SDK 1.x client: ``python mcp1_client.py URL streamable|sse SESSIONS CALLS``."""

import sys

import anyio
from common import report
from mcp import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamablehttp_client


async def one_session(url: str, transport: str, calls: int, tokens: list[str]) -> list[tuple[str, int]]:
    connection = sse_client(url, on_session_created=tokens.append) if transport == "sse" else streamablehttp_client(url)
    async with connection as streams, ClientSession(streams[0], streams[1]) as session:
        await session.initialize()
        if transport != "sse":
            tokens.append(streams[2]() or "")
        seen = []
        for _ in range(calls):
            machine = (await session.call_tool("whoami", {})).content[0].text  # type: ignore[union-attr]
            counted = (await session.call_tool("count", {})).content[0].text  # type: ignore[union-attr]
            seen.append((machine, int(counted)))
        return seen


async def main(url: str, transport: str, sessions: int, calls: int) -> None:
    results: list[list[tuple[str, int]]] = []
    tokens: list[str] = []
    for _ in range(sessions):
        results.append(await one_session(url, transport, calls, tokens))
    report("mcp", results, tokens)


anyio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
