"""The simulated Fly edge proxy, as a pure ASGI app.

For each client request: rewrite the headers as Fly does, choose the first machine (replay cache,
``fly-force-instance-id``, ``fly-prefer-instance-id``, else the balancing policy, skipping machines
that refuse connections), then follow ``fly-replay`` answers (header or JSON form) until a machine
answers for real, and stream that answer to the client. The replay answers themselves never reach
the client. Reference: ``shared/reference/fly-proxy.md``; the routing rules live in ``routing.py``.

Paths under ``/_edge/`` are the edge's own (status, machine control, the live page) and are never
forwarded. On the way, the edge notes each request's path through the fleet and the MCP sessions
it sees open and close (``status.py``, ``sessions.py``), and runs autostop (``autostop.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp

from fly_replay_router.edge.autostop import Autostop, cancel
from fly_replay_router.edge.cache import ReplayCache
from fly_replay_router.edge.config import EdgeConfig
from fly_replay_router.edge.control import EDGE_PREFIX, handle_control
from fly_replay_router.edge.fleet import Fleet
from fly_replay_router.edge.headers import read_client_request, response_headers
from fly_replay_router.edge.machine import Machine, MachineState
from fly_replay_router.edge.routing import Router
from fly_replay_router.edge.sessions import SSE_PEEK_BYTES, endpoint_session
from fly_replay_router.edge.status import EdgeStatus
from fly_replay_router.edge.targets import EdgeError
from fly_replay_router.edge.upstream import ClientGone, RequestBody, finish_upstream

logger = logging.getLogger("fly_replay_router.edge")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


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
        self.fleet = fleet
        self.config = config or EdgeConfig()
        self.status = status or EdgeStatus()
        self.cache = cache or ReplayCache(self.config.replay_cache)
        self._session: aiohttp.ClientSession | None = None
        # The balancer's turn counter for --balance round-robin.
        self.round_robin = itertools.count()
        self.autostop = Autostop(fleet, self.config, on_stop=self._autostopped)
        self._autostop_task: asyncio.Task[None] | None = None
        # Set when the server shuts down: the page's endless feeds end.
        self.closing = False
        fleet.listeners.append(self._state_changed)

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
            await handle_control(self, scope, receive, send)
            return
        await self._proxy(scope, receive, send)

    async def aclose(self) -> None:
        """Close the upstream connection pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def session(self) -> aiohttp.ClientSession:
        """The one upstream client of this edge (created in the running loop on first use)."""
        if self._session is None:
            # No connection limit: every open SSE stream holds one connection.
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, force_close=False)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False, cookie_jar=_NoCookies())
        return self._session

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session()
                if self.config.auto_stop != "off":
                    self._autostop_task = asyncio.ensure_future(self.autostop.run())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await cancel(self._autostop_task)
                self._autostop_task = None
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.status.requests += 1
        request = read_client_request(scope, region=self.config.region, edge_port=self.config.edge_port)
        body = RequestBody(receive, request.content_length, self.config.max_body)
        try:
            await body.read_if_replayable()
        except ClientGone:
            return
        router = Router(self, request, body)
        try:
            response, machine = await router.route()
        except EdgeError as error:
            self.status.error(error.code, error.message)
            self.status.route(request.method, request.path, tuple(router.hops), error.status, False, error.code)
            logger.warning("edge error %s for %s %s: %s", error.code, request.method, request.path, error.message)
            await _send_error(send, error, request.request_id)
            return
        except ClientGone:
            return
        self.status.route(request.method, request.path, tuple(router.hops), response.status, router.cache_hit)
        self._watch_session(request.method, request.headers, response)
        # A legacy HTTP+SSE stream names its session in its first event: peek at it.
        peek = request.method == "GET" and response.headers.get("content-type", "").startswith("text/event-stream")
        await self._relay(response, machine, send, receive, body, request.request_id, peek)

    def _watch_session(self, method: str, headers: list[tuple[str, str]], response: aiohttp.ClientResponse) -> None:
        """Note sessions opened and closed by this exchange (a legacy SSE stream's token comes later)."""
        sent = next((value for name, value in headers if name == "mcp-session-id"), None)
        answered = response.headers.get("mcp-session-id")
        sessions = self.status.sessions
        if answered is not None and answered != sent:
            sessions.opened(answered, self.fleet.machines)
        if sent is not None and (response.status == 404 or (method == "DELETE" and response.status < 300)):
            sessions.closed(sent)

    def _state_changed(self, machine: Machine, state: MachineState) -> None:
        self.status.record("state", f"{machine.id} {state}")
        if state == "stopped":
            self.status.sessions.machine_gone(machine.id)

    def _autostopped(self, machine: Machine, how: str) -> None:
        self.status.autostops += 1
        self.status.record("autostop", f"{how} {machine.id}")

    async def _relay(
        self,
        response: aiohttp.ClientResponse,
        machine: Machine,
        send: Send,
        receive: Receive,
        body: RequestBody,
        request_id: str,
        peek: bool = False,
    ) -> None:
        """Stream the machine's answer to the client as it comes: no buffering, so SSE events flow.

        A body of unknown length (SSE, chunked) is copied while a watcher waits for the client to
        hang up, so that an abandoned stream is closed on the machine too; a body of known length
        ends by itself and is copied inline (two tasks fewer per request).
        """
        complete = False
        watcher: asyncio.Task[None] | None = None
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": response_headers(list(response.raw_headers), request_id=request_id),
                }
            )
            if response.content_length is not None or not body.complete:
                complete = await self._copy_body(response, send, machine)
            else:
                watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
                streaming = asyncio.ensure_future(self._copy_body(response, send, machine, peek))
                done, _ = await asyncio.wait({streaming, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if streaming in done:
                    complete = streaming.result()
                else:
                    streaming.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await streaming
                    logger.info("client went away; closing the stream from machine %s", machine.id)
        finally:
            if watcher is not None:
                watcher.cancel()
            finish_upstream(machine, response, reuse=complete)
        with contextlib.suppress(OSError, RuntimeError):
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _copy_body(
        self, response: aiohttp.ClientResponse, send: Send, machine: Machine, peek: bool = False
    ) -> bool:
        token: str | None = None
        try:
            async for chunk in response.content.iter_any():
                if peek:
                    peek = False
                    token = endpoint_session(chunk[:SSE_PEEK_BYTES])
                    if token is not None:
                        self.status.sessions.opened(token, self.fleet.machines)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except TimeoutError:
            # The response has started: all the edge can do is end the body (Fly does the same).
            self.status.error("idle_timeout", f"no data from machine {machine.id} for {self.config.idle_timeout:g}s")
            logger.info("idle timeout on a response from machine %s; ending it", machine.id)
            return False
        except aiohttp.ClientError as exc:
            self.status.error("upstream_broken", f"machine {machine.id}: {exc}")
            logger.warning("response from machine %s broke off: %s", machine.id, exc)
            return False
        finally:
            if token is not None:  # a legacy session lives as long as its stream
                self.status.sessions.closed(token)
        return True


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_error(send: Send, error: EdgeError, request_id: str) -> None:
    text = f"{error.code}: {error.message}\n".encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(text)).encode()),
                (b"fly-request-id", request_id.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": text, "more_body": False})


class _NoCookies(aiohttp.DummyCookieJar):
    """The edge passes the client's cookies through and keeps none of its own."""
