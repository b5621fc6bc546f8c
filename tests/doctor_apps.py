"""The demo app deployed wrong, for the doctor's broken fleets: ``leaky_app`` (``tests.doctor_apps:leaky_app``).

Two mistakes, each caught by its own check:

- the stream marker (``UncompressedStreamsMiddleware``) left out, behind a proxy that compresses every
  response without ``Content-Encoding`` for a client that accepts gzip, as Fly's proxy does ("Content
  encoding", https://fly.io/docs/networking/content-encoding/);
- ``prometheus_client``'s ASGI app mounted at ``/metrics`` on the public app, where on Fly anyone can
  read it (https://fly.io/docs/monitoring/metrics/).
"""

from __future__ import annotations

import zlib

from prometheus_client import make_asgi_app

from app.main import app as demo
from fly_replay_router import UncompressedStreamsMiddleware
from fly_replay_router.asgi import ASGIApp, Message, Receive, Scope, Send

# The stack is built on the first request: until then the middleware list can still change.
demo.user_middleware = [entry for entry in demo.user_middleware if entry.cls is not UncompressedStreamsMiddleware]


class ProxyCompression:
    """gzip for every response that has no ``Content-Encoding``, each body message flushed as it comes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        accepts = b"gzip" in b",".join(value for name, value in scope.get("headers", ()) if name == b"accept-encoding")
        if scope["type"] != "http" or not accepts:
            await self.app(scope, receive, send)
            return
        compressor: zlib._Compress | None = None

        async def send_compressed(message: Message) -> None:
            nonlocal compressor
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(name == b"content-encoding" for name, _ in headers):
                    compressor = zlib.compressobj(wbits=zlib.MAX_WBITS | 16)
                    headers = [(name, value) for name, value in headers if name != b"content-length"]
                    message = {**message, "headers": [*headers, (b"content-encoding", b"gzip")]}
            elif message["type"] == "http.response.body" and compressor is not None:
                more = message.get("more_body", False)
                body = compressor.compress(message.get("body", b""))
                body += compressor.flush(zlib.Z_SYNC_FLUSH if more else zlib.Z_FINISH)
                message = {**message, "body": body}
            await send(message)

        await self.app(scope, receive, send_compressed)


class PublicMetrics:
    """``/metrics`` answered from the process's Prometheus registry on the app's own (public) port."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.metrics = make_asgi_app()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/metrics":
            await self.metrics(scope, receive, send)
            return
        await self.app(scope, receive, send)


leaky_app = ProxyCompression(PublicMetrics(demo))
