"""The deployable demo: an unmodified MCP server behind the affinity layer, as a FastAPI app.

Serve it with ``uvicorn app.main:app``. Endpoints: Streamable HTTP MCP at ``/mcp``, legacy
HTTP+SSE at ``/sse`` (messages under ``/messages/``), ``GET /healthz``, ``GET /metrics``. Tools: ``whoami`` (this
machine's id), ``count`` (a per-session counter kept in this process's memory, which is exactly
what breaks without affinity) and ``measure`` (the number of characters it was sent).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from mcp.server.mcpserver import Context, MCPServer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from fly_replay_router import (
    AffinityMiddleware,
    UncompressedStreamsMiddleware,
    load_settings,
    register_metrics,
    transport_security,
)

MAX_COUNTED_SESSIONS = 100_000

# On Fly without AFFINITY_SECRET: one sentence that says what to fix, not a traceback.
settings = load_settings()
register_metrics()
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


streamable_app = mcp.streamable_http_app(streamable_http_path="/mcp", transport_security=transport_security(settings))
sse_app = mcp.sse_app(transport_security=transport_security(settings))


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    # A sub-app's own lifespan does not run when its routes live in another app: run it here.
    async with mcp.session_manager.run():
        yield


app = FastAPI(title="fly-replay-router demo", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)


@app.get("/healthz", response_class=PlainTextResponse)
async def healthz() -> str:
    """Liveness for Fly's health check and the local fleet."""
    return "ok"


@app.get("/metrics")
async def metrics() -> Response:
    """Prometheus text format: the affinity layer's routing decisions, and the process."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


app.router.routes.extend(streamable_app.routes)
app.router.routes.extend(sse_app.routes)
app.add_middleware(AffinityMiddleware, settings=settings)
app.add_middleware(UncompressedStreamsMiddleware)  # outermost: sees the final response headers
