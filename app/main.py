"""The deployable demo: an unmodified MCP server behind the affinity layer, as a FastAPI app.

Serve it as the image does: ``python -m fly_replay_router.serve app.main:app --port 8080 --metrics-port 9091``
(IPv4 and IPv6, and ``/metrics`` on its own private port). Endpoints: Streamable HTTP MCP at ``/mcp``,
legacy HTTP+SSE at ``/sse`` (messages under ``/messages/``) and ``GET /healthz``. Tools: ``whoami`` (this
machine's id), ``count`` (a per-session counter kept in this process's memory, which is exactly
what breaks without affinity) and ``measure`` (the number of characters it was sent).

The affinity layer wraps the MCP routes only: Fly's health checks on ``/healthz`` are not routing
decisions and do not show in its counters.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.streamable_http_manager import DEFAULT_MAX_SESSIONS
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import BaseRoute, Mount

from fly_replay_router import (
    AffinityMiddleware,
    UncompressedStreamsMiddleware,
    load_settings,
    transport_security,
)

MAX_COUNTED_SESSIONS = 100_000

# On Fly without AFFINITY_SECRET: one sentence that says what to fix, not a traceback.
settings = load_settings()
mcp = MCPServer("fly-replay-router-demo")
_counters: OrderedDict[str, int] = OrderedDict()


@mcp.tool()
def whoami() -> str:
    """The id of the machine that served this call."""
    return settings.machine_id


@mcp.tool()
def count(ctx: Context) -> int:
    """Count calls within this session: 1, 2, 3, ... A new session starts at 1."""
    session_id = _session_id(ctx.request_context.request)
    if session_id is None:
        return 1
    value = _counters.pop(session_id, 0) + 1
    _counters[session_id] = value
    if len(_counters) > MAX_COUNTED_SESSIONS:
        _counters.popitem(last=False)
    return value


@mcp.tool()
def worker() -> int:
    """The process id of the worker process that served this call (a machine may run several)."""
    return os.getpid()


@mcp.tool()
def measure(data: str) -> int:
    """The number of characters received in ``data``."""
    return len(data)


def _session_id(request: object) -> str | None:
    # ctx.session is a new object per request; the inner id the layer restored is on the request.
    if not isinstance(request, Request):
        return None
    return request.headers.get("mcp-session-id") or request.query_params.get("session_id")


# The SDK's own idle timeout and cap are the layer's (sized to the VM's memory; docs/operate.md "Capacity and sizing").
streamable_app = mcp.streamable_http_app(
    streamable_http_path="/mcp",
    transport_security=transport_security(settings),
    session_idle_timeout=settings.session_idle_timeout,
    max_sessions=settings.max_sessions or DEFAULT_MAX_SESSIONS,
)
sse_app = mcp.sse_app(transport_security=transport_security(settings))


# The MCP transports' routes, on their own: the layer goes around these and nothing else.
mcp_routes: list[BaseRoute] = [*streamable_app.routes, *sse_app.routes]
mcp_app = Starlette(routes=mcp_routes)
layer = AffinityMiddleware(mcp_app, settings=settings)


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    # A mounted app sees no lifespan of its own: run the SDK's session manager here, and the layer's
    # hand-over socket, through which sibling workers pass this worker's sessions to it.
    async with mcp.session_manager.run(), layer.workers.running():
        yield


app = FastAPI(title="fly-replay-router demo", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)


@app.get("/healthz", response_class=PlainTextResponse)
async def healthz() -> str:
    """Liveness for Fly's health check and the local fleet."""
    return "ok"


# Mounted at the root, after /healthz: every other path (the MCP ones, and unknown ones that get
# 404) passes through the layer, with its path unchanged.
app.router.routes.append(Mount("", app=layer))
app.add_middleware(UncompressedStreamsMiddleware)  # outermost: sees the final response headers
