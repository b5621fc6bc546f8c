"""PrefectHQ FastMCP's own client, in legacy (handshake) mode: ``python fastmcp_client.py URL SESSIONS CALLS``."""

import sys

import anyio
from common import report
from fastmcp import Client
from fastmcp.client.transports import StreamableHttpTransport


async def main(url: str, sessions: int, calls: int) -> None:
    results: list[list[tuple[str, int]]] = []
    tokens: list[str] = []
    for _ in range(sessions):
        transport = StreamableHttpTransport(url)
        async with Client(transport, mode="legacy") as client:
            seen = []
            for _ in range(calls):
                machine = (await client.call_tool("whoami", {})).data
                counted = (await client.call_tool("count", {})).data
                seen.append((str(machine), int(counted)))
            tokens.append(transport.get_session_id() or "")
        results.append(seen)
    report("fastmcp", results, tokens)


anyio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
