"""An MCP server whose tool is CPU-bound, behind the affinity layer: what more worker processes buy.

``burn`` spends ``BURN_CPU_SECONDS`` of this process's CPU time (not wall time: a call that waits for
a core still does the whole work); ``worker`` names the process. Serve it with
``uvicorn tests.bench.cpu_app:app --workers N``.
"""

from __future__ import annotations

import os
import time

from mcp.server.mcpserver import MCPServer
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from fly_replay_router import load_settings, transport_security, wrap_mcp_app

BURN_CPU_SECONDS = 0.005

settings = load_settings()
mcp = MCPServer("bench-cpu")


@mcp.tool()
def burn() -> int:
    """Spend ``BURN_CPU_SECONDS`` of CPU; the number of loop turns it took."""
    turns = 0
    deadline = time.thread_time() + BURN_CPU_SECONDS
    while time.thread_time() < deadline:
        turns += sum(range(200)) and 1
    return turns


@mcp.tool()
def worker() -> int:
    """The process id of the worker that served this call."""
    return os.getpid()


async def healthz(_request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


inner = mcp.streamable_http_app(streamable_http_path="/mcp", transport_security=transport_security(settings))
inner.router.routes.append(Route("/healthz", healthz))
app = wrap_mcp_app(inner, settings=settings)
