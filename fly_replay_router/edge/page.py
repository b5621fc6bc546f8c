"""The live edge page: ``GET /_edge/`` (HTML), ``/_edge/static/<file>`` (its JS and CSS), ``/_edge/events`` (SSE).

No build step and no CDN: three files shipped in the package (``fly_replay_router/edge/static/``). The feed is
cheap whatever the request rate: every ``FEED_INTERVAL`` seconds each open page gets one ``data:``
message holding the status document (``EdgeStatus.to_json``) with at most ``FEED_ROUTES`` of the
newest routing events since its previous message, and a count of those left out. At 1,000
requests per second that is four messages a second, not a thousand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fly_replay_router.edge.proxy import EdgeProxy

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Only these files are served: nothing else under the package can be reached by a path.
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "edge.js": "text/javascript; charset=utf-8",
    "edge.css": "text/css; charset=utf-8",
}
FEED_INTERVAL = 0.25
FEED_ROUTES = 40

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


async def send_static(name: str, method: str, send: Send) -> None:
    """One of ``STATIC_FILES``, or 404."""
    content_type = STATIC_FILES.get(name)
    if content_type is None:
        await _plain(send, 404, b"no such file\n", "text/plain; charset=utf-8")
        return
    body = (STATIC_DIR / name).read_bytes()
    await _plain(send, 200, b"" if method == "HEAD" else body, content_type, length=len(body))


async def stream_feed(edge: EdgeProxy, receive: Receive, send: Send, *, interval: float = FEED_INTERVAL) -> None:
    """Send status updates as server-sent events until the page goes away."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream"),
                (b"cache-control", b"no-cache"),
                (b"content-encoding", b"none"),  # as Fly recommends for streams: never held back to compress
            ],
        }
    )
    gone = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watcher = asyncio.ensure_future(watch())
    seen = max(0, edge.status.route_seq - FEED_ROUTES)
    config = edge.config
    try:
        while not gone.is_set() and not edge.closing:
            document = edge.status.to_json(
                edge.fleet, app_name=config.app_name, region=config.region, routes_after=seen, max_routes=FEED_ROUTES
            )
            document["config"] = {
                "auto_stop": config.auto_stop,
                "min_machines_running": config.min_machines_running,
                "soft_limit": config.soft_limit,
                "hard_limit": config.hard_limit,
                "autostop_interval": config.autostop_interval,
            }
            seen = edge.status.route_seq  # no await since to_json: the same number it used
            message = b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n"
            try:
                await send({"type": "http.response.body", "body": message, "more_body": True})
            except OSError:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gone.wait(), interval)
    finally:
        watcher.cancel()
    with contextlib.suppress(OSError, RuntimeError):
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _plain(send: Send, status: int, body: bytes, content_type: str, *, length: int | None = None) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body) if length is None else length).encode()),
                (b"cache-control", b"no-cache"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
