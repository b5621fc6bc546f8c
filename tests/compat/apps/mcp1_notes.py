"""A user's FastAPI project on the official SDK's 1.x line (``mcp<2``), with fly-replay-router mounted.

Streamable HTTP at ``/notes/mcp`` and legacy HTTP+SSE at ``/legacy/sse``; no ``/healthz``.
"""

import os
from collections import Counter

from fastapi import FastAPI
from mcp.server.fastmcp import Context, FastMCP

from fly_replay_router import load_settings, transport_security, wrap_mcp_app

settings = load_settings()
notes = FastMCP("notes", transport_security=transport_security(settings))
calls: Counter[str] = Counter()


@notes.tool()
def whoami() -> str:
    """The machine that served this call."""
    return os.environ["FLY_MACHINE_ID"]


@notes.tool()
def count(ctx: Context) -> int:  # type: ignore[type-arg]
    """1, 2, 3, ... within one session."""
    request = ctx.request_context.request
    assert request is not None
    session = request.headers.get("mcp-session-id") or request.query_params["session_id"]
    calls[session] += 1
    return calls[session]


streamable = wrap_mcp_app(notes.streamable_http_app(), settings=settings)
legacy = wrap_mcp_app(notes.sse_app(), settings=settings)
api = FastAPI(lifespan=streamable.lifespan)
api.mount("/notes", streamable)
api.mount("/legacy", legacy)
