"""One MCP client held open for the failover bench: ``python failover_clients_driver.py mcp1|mcp2|fastmcp URL``.

Run by ``tests/bench/failover_clients.py`` with the interpreter of the environment that has that SDK
(it imports nothing of this project). It opens one session as the SDK's own client does, prints
``{"ready": true}``, then reads commands on stdin, one per line: ``call`` calls the demo's ``whoami``
tool and prints ``{"ok": ..., "seconds": ..., "result" | "error": ...}``; ``quit`` (or end of input)
closes the client. An exception that ends the client itself is printed as ``{"fatal": ...}``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio

CALL_TIMEOUT = 30.0
Call = Callable[[], Awaitable[str]]


def emit(document: dict[str, Any]) -> None:
    print(json.dumps(document), flush=True)


@asynccontextmanager
async def connect(sdk: str, url: str) -> AsyncIterator[Call]:
    if sdk == "mcp1":
        from mcp import ClientSession
        from mcp.client.streamable_http import streamablehttp_client

        async with streamablehttp_client(url) as streams, ClientSession(streams[0], streams[1]) as session:
            await session.initialize()

            async def call_mcp1() -> str:
                result = await session.call_tool("whoami", {})
                text = str(result.content[0].text)  # type: ignore[union-attr]
                if result.isError:
                    raise RuntimeError(f"tool error: {text}")
                return text

            yield call_mcp1
    elif sdk == "mcp2":
        from mcp import Client

        async with Client(url, mode="legacy") as client:

            async def call_mcp2() -> str:
                result = await client.call_tool("whoami", {})
                text = str(result.content[0].text)  # type: ignore[union-attr]
                if result.is_error:
                    raise RuntimeError(f"tool error: {text}")
                return text

            yield call_mcp2
    elif sdk == "fastmcp":
        from fastmcp import Client as FastClient
        from fastmcp.client.transports import StreamableHttpTransport

        async with FastClient(StreamableHttpTransport(url), mode="legacy") as fast:

            async def call_fastmcp() -> str:
                return str((await fast.call_tool("whoami", {})).content[0].text)  # type: ignore[union-attr]

            yield call_fastmcp
    else:
        raise SystemExit(f"unknown SDK {sdk!r}: mcp1, mcp2 or fastmcp")


async def serve(sdk: str, url: str) -> None:
    async with connect(sdk, url) as call:
        emit({"ready": True})
        while True:
            line = (await anyio.to_thread.run_sync(sys.stdin.readline)).strip()
            if line in ("", "quit"):
                return
            started = time.perf_counter()
            try:
                with anyio.fail_after(CALL_TIMEOUT):
                    result = await call()
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"[:300]
                emit({"ok": False, "error": error, "seconds": round(time.perf_counter() - started, 3)})
            else:
                emit({"ok": True, "result": result, "seconds": round(time.perf_counter() - started, 3)})


def main() -> None:
    try:
        anyio.run(serve, sys.argv[1], sys.argv[2])
    except BaseException as exc:
        if isinstance(exc, SystemExit | KeyboardInterrupt):
            raise
        emit({"fatal": f"{type(exc).__name__}: {exc}"[:300]})
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
