"""Event streams through Fly's proxy: no compression, so no buffering.

Fly's proxy compresses any response that has no ``Content-Encoding``, and compressing means holding
events back until a block fills. ``Content-Encoding: none`` is Fly's documented way to turn that off
for one response; HTTP clients (httpx, browsers) ignore an encoding they do not know.

Reference: Fly "Content Encoding with the Fly Proxy"; ``shared/reference/fly-proxy.md``.
"""

from __future__ import annotations

from fly_replay_router.asgi import ASGIApp, Message, Receive, Scope, Send
from fly_replay_router.protocol import is_event_stream


class UncompressedStreamsMiddleware:
    """Marks every ``text/event-stream`` response ``Content-Encoding: none`` unless it has one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers", ())
                if not isinstance(headers, (list, tuple)):  # any iterable of pairs: read it once
                    headers = list(headers)
                    message = {**message, "headers": headers}
                if is_event_stream(headers) and not any(name == b"content-encoding" for name, _ in headers):
                    message = {**message, "headers": [*headers, (b"content-encoding", b"none")]}
            await send(message)

        await self.app(scope, receive, send_marked)
