"""The demo MCP server of ``app.main`` without ``AffinityMiddleware``: the baseline of the overhead figures.

The same ``MCPServer`` (tools, transports, host checks), the same routes in the same shape, the same
lifespan and the same ``UncompressedStreamsMiddleware``; only the affinity layer is missing. Serve it with
``python -m fly_replay_router.serve tests.bench.bare_app:app`` (or plain uvicorn).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from starlette.routing import Mount

from app import main
from fly_replay_router.streaming import UncompressedStreamsMiddleware

app = FastAPI(
    title="demo without the affinity layer", lifespan=main.lifespan, docs_url=None, redoc_url=None, openapi_url=None
)
# The demo's shape: /healthz first, then the MCP routes (/mcp, /sse, /messages/) in a sub-app mounted
# at the root, so that route matching costs the same on both sides; here the sub-app is not wrapped.
app.get("/healthz", response_class=PlainTextResponse)(main.healthz)
app.router.routes.append(Mount("", app=main.mcp_app))
app.add_middleware(UncompressedStreamsMiddleware)
