"""The simulated Fly edge proxy, as a pure ASGI app: the front door of every request.

For each client request: rewrite the headers as Fly does (``headers.py``), read the body if it can
be replayed (``upstream.py``), let ``routing.py`` choose the machine that answers for real (first
hop, then every ``fly-replay``), and stream that answer back (``relay.py``). Paths under
``/_edge/`` are the edge's own (``control.py``) and are never forwarded. References: "The Fly
Proxy" (https://fly.io/docs/reference/fly-proxy/) and "Dynamic request routing with fly-replay"
(https://fly.io/docs/networking/dynamic-request-routing/).

The proxy builds one ``EdgeContext`` and hands it to each part; no part imports this module.
"""

from __future__ import annotations

import asyncio
import logging

from fly_replay_router.asgi import Receive, Scope, Send
from fly_replay_router.edge.autostop import Autostop, cancel
from fly_replay_router.edge.cache import ReplayCache
from fly_replay_router.edge.config import EdgeConfig
from fly_replay_router.edge.context import EdgeContext
from fly_replay_router.edge.control import EDGE_PREFIX, handle_control
from fly_replay_router.edge.errors import EdgeError
from fly_replay_router.edge.fleet import Fleet
from fly_replay_router.edge.headers import read_client_request
from fly_replay_router.edge.machine import Machine, MachineState
from fly_replay_router.edge.relay import relay
from fly_replay_router.edge.respond import TEXT, respond
from fly_replay_router.edge.routing import Router
from fly_replay_router.edge.status import EdgeStatus
from fly_replay_router.edge.upstream import ClientGone, ClientStalled, RequestBody
from fly_replay_router.protocol import is_event_stream

logger = logging.getLogger("fly_replay_router.edge")


class EdgeProxy:
    """The edge in front of ``fleet``: an ASGI app to run under uvicorn.

    ``EdgeProxy(Fleet.from_backends({"148e272a6d4689": "http://127.0.0.1:9001"}), EdgeConfig())``
    puts machines started elsewhere behind it; ``python -m fly_replay_router.edge`` starts a fleet first.
    """

    def __init__(
        self,
        fleet: Fleet,
        config: EdgeConfig | None = None,
        *,
        status: EdgeStatus | None = None,
        cache: ReplayCache | None = None,
    ) -> None:
        config = config or EdgeConfig()
        self.ctx = EdgeContext(
            config=config,
            fleet=fleet,
            status=status or EdgeStatus(),
            cache=cache or ReplayCache(config.fly_toml.replay_cache),
        )
        self.autostop = Autostop(fleet, config, on_stop=self._autostopped)
        self._tasks: list[asyncio.Task[None]] = []
        fleet.listeners.append(self._state_changed)

    @property
    def config(self) -> EdgeConfig:
        """The edge's configuration."""
        return self.ctx.config

    @property
    def fleet(self) -> Fleet:
        """The machines behind the edge."""
        return self.ctx.fleet

    @property
    def status(self) -> EdgeStatus:
        """Counters, recent events and open sessions (``GET /_edge/status``)."""
        return self.ctx.status

    def shut_down(self) -> None:
        """The server is stopping: the page's endless feeds end."""
        self.ctx.closing = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            # Fly proxies websockets too; MCP does not use them, so the edge declines.
            await send({"type": "websocket.close", "code": 1003})
            return
        path = str(scope["path"])
        if path == EDGE_PREFIX.rstrip("/") or path.startswith(EDGE_PREFIX):
            await handle_control(self.ctx, scope, receive, send)
            return
        await self._proxy(scope, receive, send)

    async def aclose(self) -> None:
        """Close the upstream connection pool."""
        await self.ctx.upstream.aclose()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.ctx.upstream.session()
                self._tasks.append(asyncio.ensure_future(self.fleet.watch()))
                if self.config.fly_toml.auto_stop != "off":
                    self._tasks.append(asyncio.ensure_future(self.autostop.run()))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for task in self._tasks:
                    await cancel(task)
                self._tasks.clear()
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = self.ctx
        ctx.status.requests += 1
        if not str(scope["path"]).startswith("/"):
            # The asterisk form (``OPTIONS *``, RFC 9112 section 3.2.4) names no resource of a machine,
            # and what Fly's proxy does with it is not documented: the edge answers it itself.
            status = 204 if scope["method"] == "OPTIONS" else 400
            await respond(send, status, b"" if status == 204 else b"bad request target\n", content_type=TEXT)
            return
        request = read_client_request(scope, region=ctx.config.region, edge_port=ctx.config.edge_port)
        body = RequestBody(receive, request.content_length, ctx.config.max_body, ctx.config.fly_toml.idle_timeout)
        try:
            await body.read_if_replayable()
        except ClientGone:
            return
        except ClientStalled:
            detail = f"no request body data for {ctx.config.fly_toml.idle_timeout:g}s (idle_timeout)"
            ctx.status.error("client_idle_timeout", detail)
            request_id = (b"fly-request-id", request.request_id.encode())
            headers = [request_id, (b"connection", b"close")]
            await respond(send, 408, f"client_idle_timeout: {detail}\n".encode(), content_type=TEXT, headers=headers)
            return
        router = Router(ctx, request, body)
        try:
            response, machine = await router.route()
        except EdgeError as error:
            ctx.status.error(error.code, error.message)
            ctx.status.route(request.method, request.path, tuple(router.hops), error.status, False, error.code)
            logger.warning("edge error %s for %s %s: %s", error.code, request.method, request.path, error.message)
            text = f"{error.code}: {error.message}\n".encode()
            request_id = (b"fly-request-id", request.request_id.encode())
            await respond(send, error.status, text, content_type=TEXT, headers=[request_id])
            return
        except ClientGone:
            return
        ctx.status.route(request.method, request.path, tuple(router.hops), response.status, router.cache_hit)
        sent = next((value for name, value in request.headers if name == "mcp-session-id"), None)
        answered = response.headers.get("mcp-session-id")
        ctx.status.sessions.note_exchange(request.method, sent, response.status, answered, ctx.fleet.machines)
        # A legacy HTTP+SSE stream names its session in its first event: peek at it.
        lowered = ((name.lower(), value) for name, value in response.raw_headers)
        peek = request.method == "GET" and is_event_stream(lowered)
        await relay(ctx, response, machine, send, receive, body, request.request_id, peek=peek)

    def _state_changed(self, machine: Machine, state: MachineState) -> None:
        self.status.record("state", f"{machine.id} {state}")
        if state == "stopped":
            self.status.sessions.machine_gone(machine.id)

    def _autostopped(self, machine: Machine, how: str) -> None:
        self.status.autostops += 1
        self.status.record("autostop", f"{how} {machine.id}")
