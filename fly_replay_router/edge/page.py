"""The live edge page: ``GET /_edge/`` (HTML), ``/_edge/static/<file>`` (its JS and CSS), ``/_edge/events`` (SSE).

No build step and no CDN: four files shipped in the package (``fly_replay_router/edge/static/``); the
charts of the last minutes are inline SVG the page draws from the feed (``charts.js``). The feed is
cheap whatever the request rate: every ``FEED_INTERVAL`` seconds each open page gets one ``data:``
message holding the status document (``EdgeStatus.to_json``) with at most ``FEED_ROUTES`` of the
newest routing events since its previous message, and a count of those left out. At 1,000
requests per second that is four messages a second, not a thousand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

from fly_replay_router.asgi import Receive, Send
from fly_replay_router.edge.context import EdgeContext
from fly_replay_router.edge.respond import TEXT, respond, start_response

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Only these files are served: nothing else under the package can be reached by a path.
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "edge.js": "text/javascript; charset=utf-8",
    "charts.js": "text/javascript; charset=utf-8",
    "edge.css": "text/css; charset=utf-8",
}
FEED_INTERVAL = 0.25
FEED_ROUTES = 40
_NO_CACHE = (b"cache-control", b"no-cache")


async def send_static(name: str, method: str, send: Send) -> None:
    """One of ``STATIC_FILES``, or 404."""
    content_type = STATIC_FILES.get(name)
    if content_type is None:
        await respond(send, 404, b"no such file\n", content_type=TEXT, headers=[_NO_CACHE])
        return
    body = (STATIC_DIR / name).read_bytes()
    shown = b"" if method == "HEAD" else body
    await respond(send, 200, shown, content_type=content_type, headers=[_NO_CACHE], length=len(body))


async def stream_feed(ctx: EdgeContext, receive: Receive, send: Send, *, interval: float = FEED_INTERVAL) -> None:
    """Send status updates as server-sent events until the page goes away."""
    headers = [
        (b"content-type", b"text/event-stream"),
        _NO_CACHE,
        (b"content-encoding", b"none"),  # as Fly recommends for streams: never held back to compress
    ]
    await start_response(send, 200, headers)
    gone = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watcher = asyncio.ensure_future(watch())
    seen = max(0, ctx.status.route_seq - FEED_ROUTES)
    config = ctx.config
    try:
        while not gone.is_set() and not ctx.closing:
            document = ctx.status.to_json(
                ctx.fleet,
                app_name=config.app_name,
                region=config.region,
                routes_after=seen,
                max_routes=FEED_ROUTES,
                limits=(config.fly_toml.soft_limit, config.fly_toml.hard_limit),
            )
            document["config"] = {
                "auto_stop": config.fly_toml.auto_stop,
                "min_machines_running": config.fly_toml.min_machines_running,
                "soft_limit": config.fly_toml.soft_limit,
                "hard_limit": config.fly_toml.hard_limit,
                "autostop_interval": config.autostop_interval,
            }
            seen = ctx.status.route_seq  # no await since to_json: the same number it used
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
