"""What a session costs a machine: resident memory per open session, by kind, on one demo machine.

Three kinds, each measured on a fresh machine (RSS after N sessions minus RSS before, over N):
- ``handshake``: initialize + initialized, then abandoned (what an idle or vanished client leaves);
- ``handshake_stream``: the same with the session's standalone ``GET`` event stream held open
  (what a connected streaming client holds);
- ``legacy_sse``: a held ``GET /sse`` stream (2024-11-05 HTTP+SSE; the session lives while it does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import httpx

from tests.bench.processes import running, start_uvicorn
from tests.mcp_http import INITIALIZE, JSON_AND_SSE, session_headers

KINDS = ("handshake", "handshake_stream", "legacy_sse")


async def _open_sessions(url: str, count: int, *, with_stream: bool, held: contextlib.AsyncExitStack) -> None:
    limits = httpx.Limits(max_connections=count + 50, max_keepalive_connections=count + 50)
    client = await held.enter_async_context(httpx.AsyncClient(timeout=60, limits=limits))
    gate = asyncio.Semaphore(64)

    async def one() -> None:
        async with gate:
            answer = await client.post(f"{url}/mcp", headers=JSON_AND_SSE, json=INITIALIZE)
            token = answer.headers["mcp-session-id"]
            initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
            done = await client.post(f"{url}/mcp", headers=session_headers(token), json=initialized)
            assert done.status_code == 202, done.text
        if with_stream:
            headers = {**session_headers(token), "accept": "text/event-stream"}
            stream = await held.enter_async_context(client.stream("GET", f"{url}/mcp", headers=headers))
            assert stream.status_code == 200

    await asyncio.gather(*(one() for _ in range(count)))


async def _open_legacy_streams(url: str, count: int, held: contextlib.AsyncExitStack) -> None:
    limits = httpx.Limits(max_connections=count + 50, max_keepalive_connections=count + 50)
    client = await held.enter_async_context(httpx.AsyncClient(timeout=60, limits=limits))

    async def one() -> None:
        stream = await held.enter_async_context(client.stream("GET", f"{url}/sse"))
        assert stream.status_code == 200
        async for chunk in stream.aiter_bytes():
            if b"endpoint" in chunk:
                return

    for start in range(0, count, 100):
        await asyncio.gather(*(one() for _ in range(start, min(count, start + 100))))


async def session_cost_kb(kind: str, count: int) -> dict[str, Any]:
    """RSS per session of ``kind`` on a fresh demo machine, in KB, with the before/after figures."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request of thousands
    machine = start_uvicorn("app.main:app", "5e5510c0575000")
    with running(machine):
        await asyncio.sleep(0.5)
        before = machine.rss_mb()
        async with contextlib.AsyncExitStack() as held:
            if kind == "legacy_sse":
                await _open_legacy_streams(machine.url, count, held)
            else:
                await _open_sessions(machine.url, count, with_stream=kind == "handshake_stream", held=held)
            await asyncio.sleep(0.5)
            after = machine.rss_mb()
    return {
        "kind": kind,
        "sessions": count,
        "rss_mb_before": round(before, 1),
        "rss_mb_after": round(after, 1),
        "kb_per_session": round((after - before) * 1024 / count, 1),
    }
