"""Talking to machines: the connection pool, the request body the edge may replay, one upstream attempt.

Fly buffers a request body so that it can replay it, up to 1 MB ("Dynamic request routing with
fly-replay", https://fly.io/docs/networking/dynamic-request-routing/); a larger body, or one of
unknown length (chunked), is streamed to the first machine and cannot be replayed (PA01).

An upload that stalls is the machine's to answer, as with Fly's proxy, which streams a request to
its machine as it comes. The upstream client sends a request's head together with its first body
chunk, so a streamed body is not sent until its first chunk arrives: otherwise a client pausing
before its body would leave a pooled connection silent until the machine's keep-alive timeout
closed it, and the client would get 502 instead of the machine's answer. How long a silent client
is waited for is unspecified by Fly; the edge applies fly.toml's ``idle_timeout`` (Fly's limit for a
connection with no traffic) to each read of the body, and answers 408 when it passes before the
request reached a machine. The
upstream client is aiohttp: measured here at about a fifth of httpx's CPU per proxied request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
from multidict import CIMultiDict

from fly_replay_router.asgi import Receive
from fly_replay_router.edge.headers import Headers
from fly_replay_router.edge.machine import Machine

# aiohttp would otherwise add headers the client did not send.
SKIP_AUTO_HEADERS = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})


class UpstreamPool:
    """The one upstream client of an edge, created in the running loop on first use."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        """The shared client (no connection limit: every open SSE stream holds one connection)."""
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, force_close=False)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False, cookie_jar=_NoCookies())
        return self._session

    async def aclose(self) -> None:
        """Close every pooled connection."""
        if self._session is not None:
            await self._session.close()
            self._session = None


class _NoCookies(aiohttp.DummyCookieJar):
    """The edge passes the client's cookies through and keeps none of its own."""


class ConnectFailed(Exception):
    """No connection to the machine could be opened: Fly retries such a request elsewhere."""


class ClientGone(Exception):
    """The client disconnected before its request body was complete."""


class ClientStalled(Exception):
    """The client sent nothing of its request body for ``idle_timeout`` seconds."""


class RequestBody:
    """A client's request body: buffered (replayable) or streamed once (not replayable)."""

    def __init__(
        self, receive: Receive, content_length: int | None, max_buffered: int, idle_timeout: float = 60.0
    ) -> None:
        self._receive = receive
        self._idle_timeout = idle_timeout
        self.replayable = content_length is not None and content_length <= max_buffered
        self.buffer = b""
        # A streamed body's first chunk, read before any machine is contacted (see the module docstring).
        self._first: bytes | None = None
        # True once the whole body was read from the client, so its receive() is free to watch
        # for a disconnect.
        self.complete = False
        self._stream_started = False

    async def read_if_replayable(self) -> None:
        """Buffer the whole body when it is small enough to be replayed, else its first chunk.

        Raises ``ClientGone`` or ``ClientStalled``.
        """
        if not self.replayable:
            self._first, more = await self._next()
            self.complete = not more
            return
        chunks: list[bytes] = []
        more = True
        while more:
            chunk, more = await self._next()
            chunks.append(chunk)
        self.buffer = b"".join(chunks)
        self.complete = True

    async def _next(self) -> tuple[bytes, bool]:
        """The next piece of the body and whether more follows."""
        try:
            async with asyncio.timeout(self._idle_timeout):
                message = await self._receive()
        except TimeoutError:
            raise ClientStalled from None
        if message["type"] == "http.disconnect":
            raise ClientGone
        return message.get("body", b""), bool(message.get("more_body", False))

    @property
    def can_send(self) -> bool:
        """False once a streamed body has been (partly) sent: it cannot be sent again."""
        return self.replayable or not self._stream_started

    def payload(self) -> bytes | AsyncIterator[bytes]:
        """What to hand aiohttp for one attempt."""
        if self.replayable:
            return self.buffer
        return self._stream()

    async def _stream(self) -> AsyncIterator[bytes]:
        self._stream_started = True
        first, self._first = self._first, None
        if first:
            yield first
        while not self.complete:
            chunk, more = await self._next()
            if chunk:
                yield chunk
            self.complete = not more


async def send_upstream(
    session: aiohttp.ClientSession,
    machine: Machine,
    *,
    method: str,
    path_qs: str,
    headers: Headers,
    body: RequestBody,
    timeouts: aiohttp.ClientTimeout,
) -> aiohttp.ClientResponse:
    """One attempt: send the request to ``machine`` and return once its response headers arrived.

    Raises ``ConnectFailed`` when no connection could be opened (the request never left the edge),
    ``asyncio.TimeoutError`` when the machine did not answer in time, ``aiohttp.ClientError`` else.
    """
    data = body.payload()
    # In flight from the moment it is sent: a slow answer counts against the concurrency limits.
    machine.in_flight += 1
    try:
        response = await session.request(
            method,
            machine.url + path_qs,
            headers=CIMultiDict(headers),
            data=data,
            allow_redirects=False,
            timeout=timeouts,
            skip_auto_headers=SKIP_AUTO_HEADERS,
        )
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
        machine.in_flight -= 1
        if not isinstance(data, bytes):
            await data.aclose()  # type: ignore[attr-defined]
        raise ConnectFailed(str(exc)) from exc
    except BaseException:
        machine.in_flight -= 1
        raise
    machine.requests += 1
    machine.unreachable = False
    machine.last_active = time.monotonic()
    return response


def finish_upstream(machine: Machine, response: aiohttp.ClientResponse, *, reuse: bool) -> None:
    """Release a response: back to the pool when fully read (``reuse``), else drop the connection."""
    machine.in_flight = max(0, machine.in_flight - 1)
    machine.last_active = time.monotonic()
    if reuse:
        response.release()
    else:
        response.close()
