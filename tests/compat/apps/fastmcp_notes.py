"""A user's FastAPI project on PrefectHQ FastMCP, with fly-replay-router mounted at ``/notes/mcp``."""

import os
from collections import Counter

from fastapi import FastAPI
from fastmcp import FastMCP
from fastmcp.server.dependencies import get_http_request

from fly_replay_router import load_settings, wrap_mcp_app
from fly_replay_router.hosts import allowed_hosts

settings = load_settings()
notes = FastMCP("notes")
calls: Counter[str] = Counter()


@notes.tool()
def whoami() -> str:
    """The machine that served this call."""
    return os.environ["FLY_MACHINE_ID"]


@notes.tool()
def count() -> int:
    """1, 2, 3, ... within one session."""
    calls[get_http_request().headers["mcp-session-id"]] += 1
    return calls[get_http_request().headers["mcp-session-id"]]


streamable = wrap_mcp_app(notes.http_app(path="/mcp", allowed_hosts=allowed_hosts(settings)), settings=settings)
api = FastAPI(lifespan=streamable.lifespan)
api.mount("/notes", streamable)
