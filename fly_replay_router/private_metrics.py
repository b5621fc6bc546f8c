"""``/metrics`` on a port of its own, which no public service exposes: ``PrivateMetrics``.

On Fly, every port an ``[http_service]`` serves is public: ``https://<app>.fly.dev/metrics`` would
hand anyone the machine id, the process's memory and the per-reason rejection counts (which tell a
prober why its forged token failed, the very thing a uniform 404 hides). Fly's managed Prometheus
scrapes over the private network instead, at fly.toml's ``[metrics] port`` and ``path``; Fly's own
examples use a port no service exposes (9091).

``PrivateMetrics`` wraps the app that one uvicorn server runs on all its sockets: a request that
arrived on the metrics port is answered from ``prometheus_client``'s registry and never reaches the
app (so a scrape is not a routing decision); every other request, and the lifespan, goes to the app.
On a machine of several workers (``register_metrics(workers_dir=...)``), the lifespan also keeps
this worker's figures published for its siblings (``fly_replay_router.affinity.worker_metrics``).

References: Fly "Metrics on Fly.io" (https://fly.io/docs/monitoring/metrics/), the ``[metrics]``
section of Fly's app configuration (https://fly.io/docs/reference/configuration/#the-metrics-section),
the ASGI HTTP connection scope (``server``: https://asgi.readthedocs.io/en/latest/specs/www.html).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from fly_replay_router.asgi import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

DEFAULT_METRICS_PATH = "/metrics"


class PrivateMetrics:
    """Serve ``path`` from ``registry`` to requests on ``metrics_port``; pass everything else to ``app``.

    The port is read from the connection (the ASGI scope's ``server``), never from a header, so no
    request to the public port can reach the metrics. On the metrics port: ``GET``/``HEAD path``
    answers 200 in the format the scraper asks for (Prometheus text or OpenMetrics), another path
    404, another method 405; WebSocket connections are refused.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics_port: int,
        path: str = DEFAULT_METRICS_PATH,
        registry: CollectorRegistry | None = None,
    ) -> None:
        from prometheus_client.core import REGISTRY

        if not path.startswith("/"):
            raise ValueError(f"metrics path {path!r} must start with /")
        self.app = app
        self.metrics_port = metrics_port
        self.path = path
        self.registry = REGISTRY if registry is None else registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] in ("http", "websocket") and _local_port(scope) == self.metrics_port:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await self._serve_metrics(scope, send)
            return
        await self.app(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        from fly_replay_router.affinity.worker_metrics import active

        figures = active()
        if figures is None:
            await self.app(scope, receive, send)
            return
        async with contextlib.AsyncExitStack() as stack:

            async def send_started(message: Message) -> None:
                if message["type"] == "lifespan.startup.complete":
                    await stack.enter_async_context(figures.publishing())
                await send(message)

            async def receive_stopping() -> Message:
                message = await receive()
                if message["type"] == "lifespan.shutdown":
                    await stack.aclose()  # the last figures published before the app shuts down
                return message

            await self.app(scope, receive_stopping, send_started)

    async def _serve_metrics(self, scope: Scope, send: Send) -> None:
        from prometheus_client.exposition import choose_encoder

        if scope["path"] != self.path:
            await _plain(send, 404, b"Not Found")
            return
        if scope["method"] not in ("GET", "HEAD"):
            await _plain(send, 405, b"Method Not Allowed", [(b"allow", b"GET, HEAD")])
            return
        accept = b",".join(value for name, value in scope["headers"] if name == b"accept").decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        body = encoder(self.registry)
        headers = [(b"content-type", content_type.encode("latin-1")), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


def _local_port(scope: Scope) -> int | None:
    server = scope.get("server")
    return int(server[1]) if server and len(server) > 1 and server[1] is not None else None


async def _plain(send: Send, status: int, text: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(text)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": text})
