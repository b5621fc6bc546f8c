"""The demo MCP server of ``app.main`` without ``AffinityMiddleware``: the baseline of the overhead figures.

The same ``MCPServer`` (tools, transports, host checks), the same routes in the same order, the same
lifespan and the same ``UncompressedStreamsMiddleware``; only the affinity layer is missing. Serve it with
``uvicorn tests.bench.bare_app:app``.
"""

from __future__ import annotations

from fastapi import FastAPI

from app import main
from fly_replay_router.streaming import UncompressedStreamsMiddleware

app = FastAPI(
    title="demo without the affinity layer", lifespan=main.lifespan, docs_url=None, redoc_url=None, openapi_url=None
)
# Every route of the demo, in the same order (/healthz, /metrics, /mcp, /sse, /messages/): route
# matching costs the same on both sides.
app.router.routes.extend(main.app.router.routes)
app.add_middleware(UncompressedStreamsMiddleware)
