"""Forwarding a request Fly cannot replay (body over 1 MiB, or of unknown length) to its owner.

Fly's proxy buffers at most 1 MiB of a request body for a replay; a larger body would fail with
error PA01. The layer instead streams such a request itself to the owner over the private network
(``http://<owner>.vm.<app>.internal:<port>`` on Fly), and streams the answer back. The forwarded
request keeps the client's token and headers (``Authorization`` included, unchanged), so the owner
verifies it like any other; it carries ``affinity-forwarded-from`` so that a machine that is not
the owner refuses it instead of forwarding again.

Only the owner is ever contacted: the target URL is built from parts (scheme, host and port of the
owner's peer URL; the request's path, which must be an origin-form path starting with ``/``, and
its query), never by joining strings, so no request target can name another host or add userinfo.

One connection pool per owner (``forward_connections_per_owner``), so slow uploads to one machine
never hold the connections that forwards to another need; timeouts to connect, between body
pieces (from the client and into the owner) and between answer pieces. A body that ends early
(the client went away, or went quiet past the write timeout) is never completed: the connection to
the owner is dropped mid-body, so the owner sees the request fail and never runs a cut call.

References: Fly "Dynamic request routing" and "Private networking"
(https://fly.io/docs/networking/private-networking/); RFC 9112 section 3.2 (request target forms)
and 6.3 (an incomplete message); httpx streaming (``client.send(request, stream=True)``,
``aiter_raw()``, ``aclose()``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import anyio
import httpx

from fly_replay_router import fly
from fly_replay_router.asgi import Receive, Scope, Send
from fly_replay_router.settings import AffinitySettings

FORWARDED_FROM = b"affinity-forwarded-from"
HOP_BY_HOP = frozenset(name.encode("ascii") for name in fly.HOP_BY_HOP)
# Pools kept for owners with no forward under way; machine ids come and go with deploys.
IDLE_OWNER_POOLS_KEPT = 64
# An origin-form target (RFC 9112 3.2.1): "/" then visible ASCII; the query likewise.
_PATH_BYTES = frozenset(range(0x21, 0x7F))


def body_replayable(content_length: bytes | None, chunked: bool) -> bool:
    """Fly can replay a request with these headers: no body, or a declared length within its buffer."""
    if chunked:
        return False
    if content_length is None:
        return True
    return content_length.isdigit() and int(content_length) <= fly.REPLAY_BODY_LIMIT


@dataclass(frozen=True, slots=True)
class ForwardOutcome:
    """How a forward ended.

    ``answered``: the owner's answer (at least its start) went to the client. Otherwise ``reason``
    is a stable code and ``status`` the answer the layer owes the client (0: none, it has left).
    """

    answered: bool
    reason: str = ""
    status: int = 0


ANSWERED = ForwardOutcome(True)
ANSWER_CUT = ForwardOutcome(True, "answer_cut_short")
BAD_TARGET = ForwardOutcome(False, "bad_request_target", 404)
UNREACHABLE = ForwardOutcome(False, "owner_unreachable", 404)
BUSY = ForwardOutcome(False, "owner_busy", 503)
TIMED_OUT = ForwardOutcome(False, "owner_timeout", 504)
FAILED = ForwardOutcome(False, "owner_failed", 502)
CLIENT_LEFT = ForwardOutcome(False, "client_left", 0)
CLIENT_STALLED = ForwardOutcome(False, "body_timeout", 408)


class _ClientLeft(Exception):
    """The client disconnected before its body was complete."""


class _ClientStalled(Exception):
    """The client sent nothing for longer than the write timeout."""


@dataclass(slots=True)
class _OwnerPool:
    client: httpx.AsyncClient
    in_use: int = 0


class OwnerForwarder:
    """Streams requests to other machines of the app and their answers back, one pool per owner."""

    def __init__(self, settings: AffinitySettings) -> None:
        self._settings = settings
        self._timeout = httpx.Timeout(
            connect=settings.forward_connect_timeout,
            read=settings.forward_read_timeout,
            write=settings.forward_write_timeout,
            pool=settings.forward_connect_timeout,
        )
        self._limits = httpx.Limits(
            max_connections=settings.forward_connections_per_owner,
            max_keepalive_connections=settings.forward_connections_per_owner,
        )
        self._pools: dict[str, _OwnerPool] = {}

    async def forward(self, scope: Scope, receive: Receive, send: Send, *, owner_machine_id: str) -> ForwardOutcome:
        """Send the request to its owner and stream the answer back."""
        url = self._target(scope, owner_machine_id)
        if url is None:
            return BAD_TARGET
        headers = [(name, value) for name, value in scope["headers"] if name not in HOP_BY_HOP]
        headers.append((FORWARDED_FROM, self._settings.machine_id.encode("ascii")))
        pool = await self._pool(owner_machine_id)
        try:
            content = _body(receive, self._settings.forward_write_timeout)
            request = pool.client.build_request(scope["method"], url, headers=headers, content=content)
            try:
                response = await pool.client.send(request, stream=True)
            except _ClientLeft:
                return CLIENT_LEFT
            except _ClientStalled:
                return CLIENT_STALLED
            except httpx.PoolTimeout:
                return BUSY
            except (httpx.ConnectError, httpx.ConnectTimeout):
                return UNREACHABLE
            except httpx.TimeoutException:
                return TIMED_OUT
            except httpx.HTTPError:
                return FAILED
            try:
                return await _relay(response, send)
            finally:
                await response.aclose()
        finally:
            pool.in_use -= 1

    def _target(self, scope: Scope, owner_machine_id: str) -> httpx.URL | None:
        """The owner's URL for this request, from parts; ``None`` for a target that is not a plain path."""
        raw_path: bytes | None = scope.get("raw_path")
        if raw_path is None:
            raw_path = quote(scope["root_path"] + scope["path"], safe="/:@!$&'()*+,;=-._~").encode("ascii")
        query: bytes = scope["query_string"]
        if not raw_path.startswith(b"/") or not _PATH_BYTES.issuperset(raw_path) or not _PATH_BYTES.issuperset(query):
            return None
        base = urlsplit(self._settings.peer_url(owner_machine_id))
        if not base.hostname:
            return None
        return httpx.URL(
            scheme=base.scheme,
            host=base.hostname,
            port=base.port,
            raw_path=raw_path + b"?" + query if query else raw_path,
        )

    async def _pool(self, owner_machine_id: str) -> _OwnerPool:
        pool = self._pools.pop(owner_machine_id, None)
        created = pool is None
        if pool is None:
            pool = _OwnerPool(
                httpx.AsyncClient(
                    timeout=self._timeout,
                    limits=self._limits,
                    follow_redirects=False,
                    # Never a proxy, .netrc credentials or certificates from the environment: peers only.
                    trust_env=False,
                )
            )
        self._pools[owner_machine_id] = pool  # most recently used last
        pool.in_use += 1
        if created:
            idle = [owner for owner, kept in self._pools.items() if kept.in_use == 0]
            for owner in idle[: max(0, len(idle) - IDLE_OWNER_POOLS_KEPT)]:
                # The least recently used idle pools; checked again, as a close lets others run.
                kept = self._pools.get(owner)
                if kept is not None and kept.in_use == 0:
                    del self._pools[owner]
                    await kept.client.aclose()
        return pool

    async def aclose(self) -> None:
        """Close every owner's connections."""
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            await pool.client.aclose()


async def _relay(response: httpx.Response, send: Send) -> ForwardOutcome:
    """Stream the owner's answer to the client."""
    headers = [(name, value) for name, value in response.headers.raw if name.lower() not in HOP_BY_HOP]
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    outcome = ANSWERED
    try:
        async for chunk in response.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except httpx.HTTPError:
        # The answer has started: all that is left is to end it.
        outcome = ANSWER_CUT
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return outcome


async def _body(receive: Receive, idle_timeout: float) -> AsyncIterator[bytes]:
    """The client's body, piece by piece; raises instead of ending if the client leaves or stalls."""
    while True:
        try:
            with anyio.fail_after(idle_timeout):
                message = await receive()
        except TimeoutError:
            raise _ClientStalled from None
        if message["type"] == "http.disconnect":
            raise _ClientLeft
        body = message.get("body", b"")
        if body:
            yield body
        if not message.get("more_body", False):
            return
