"""MCP's Streamable HTTP transport spoken by hand: JSON-RPC in a POST, the answer as JSON or an event stream.

The doctor uses no MCP SDK: it must see every status code and header a client would meet, including
the ones an SDK turns into an exception. Each request is timed from sending it to the complete
JSON-RPC answer (the first ``message`` event that carries its id, when the answer is a stream).

References: MCP "Transports" (https://modelcontextprotocol.io/specification/2025-11-25/basic/transports):
``initialize``, ``notifications/initialized``, ``Mcp-Session-Id``, ``MCP-Protocol-Version``, DELETE;
the HTML "Server-sent events" event stream format (https://html.spec.whatwg.org/multipage/server-sent-events.html).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from fly_replay_router.doctor.served_by import SERVED_BY_HEADER, ServedBy
from fly_replay_router.protocol import HANDSHAKE_PROTOCOL_VERSIONS

HANDSHAKE_VERSION = HANDSHAKE_PROTOCOL_VERSIONS[-1]
MODERN_VERSION = "2026-07-28"
SESSION_HEADER = "mcp-session-id"
CLIENT_INFO = {"name": "fly-replay-doctor", "version": "1"}
# What a client that accepts both answer forms sends (the spec requires both media types).
ACCEPT_BOTH = "application/json, text/event-stream"


@dataclass
class Exchange:
    """One HTTP request of the doctor and what came back (``error`` instead of a status on a transport failure)."""

    method: str
    status: int | None = None
    seconds: float = 0.0
    headers: httpx.Headers = field(default_factory=httpx.Headers)
    message: dict[str, Any] | None = None
    error: str | None = None
    body_start: bytes = b""

    @property
    def served_by(self) -> ServedBy | None:
        """The layer's ``affinity-served-by`` answer header, parsed; None when absent or malformed."""
        return ServedBy.parse(self.headers.get(SERVED_BY_HEADER))

    @property
    def token(self) -> str | None:
        """The ``Mcp-Session-Id`` of the answer, if any."""
        token = self.headers.get(SESSION_HEADER)
        return None if token is None else str(token)

    @property
    def ok(self) -> bool:
        """A 2xx answer."""
        return self.status is not None and 200 <= self.status < 300

    def describe(self) -> str:
        """``200``, ``404``, or the transport error, for evidence."""
        return str(self.status) if self.status is not None else f"no answer ({self.error})"


class Endpoint:
    """An MCP endpoint, with the user's headers on every request and one connection pool."""

    def __init__(self, url: str, headers: list[tuple[str, str]], *, timeout: float = 30.0) -> None:
        self.url = url
        self.user_headers = headers
        self._ids = itertools.count(1)
        self.client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            follow_redirects=False,
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.client.aclose()

    def next_id(self) -> int:
        """A JSON-RPC request id not used before by this endpoint."""
        return next(self._ids)

    async def post(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        token: str | None = None,
        version: str | None = HANDSHAKE_VERSION,
        notification: bool = False,
        extra_headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> Exchange:
        """POST one JSON-RPC request (or notification) and read its answer; never raises for HTTP trouble."""
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        request_id = None if notification else self.next_id()
        if request_id is not None:
            message["id"] = request_id
        if params is not None:
            message["params"] = params
        headers = {"content-type": "application/json", "accept": ACCEPT_BOTH, **(extra_headers or {})}
        if token is not None:
            headers[SESSION_HEADER] = token
        if version is not None:
            headers["mcp-protocol-version"] = version
        content = body if body is not None else json.dumps(message, separators=(",", ":")).encode()
        request = self.client.build_request("POST", self.url, headers=headers, content=content)
        return await self._exchange(method, request, request_id)

    async def initialize(self, extra_headers: dict[str, str] | None = None) -> Exchange:
        """The handshake's ``initialize`` request, as a client of the latest handshake-era revision sends it."""
        params = {"protocolVersion": HANDSHAKE_VERSION, "capabilities": {}, "clientInfo": CLIENT_INFO}
        return await self.post("initialize", params, version=None, extra_headers=extra_headers)

    async def delete(self, token: str) -> Exchange:
        """End a session (``DELETE`` with its id), as a client does when it closes."""
        headers = {SESSION_HEADER: token, "mcp-protocol-version": HANDSHAKE_VERSION}
        request = self.client.build_request("DELETE", self.url, headers=headers)
        return await self._exchange("DELETE", request, None)

    async def get(self, url: str) -> Exchange:
        """A plain GET of another path of the same origin (``/metrics``); the start of the body is kept."""
        request = self.client.build_request("GET", url)
        return await self._exchange("GET", request, None, keep_body=True)

    async def _exchange(
        self, method: str, request: httpx.Request, request_id: int | None, *, keep_body: bool = False
    ) -> Exchange:
        started = time.perf_counter()
        exchange = Exchange(method)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            exchange.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            exchange.seconds = time.perf_counter() - started
            return exchange
        try:
            exchange.status = response.status_code
            exchange.headers = response.headers
            content_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if content_type == "text/event-stream" and request_id is not None:
                exchange.message = await _answer_from_stream(response, request_id)
            else:
                raw = await _read_limited(response, 64 * 1024)
                exchange.body_start = raw if keep_body else b""
                if content_type == "application/json":
                    exchange.message = _json_object(raw)
        except httpx.HTTPError as exc:
            exchange.error = f"{type(exc).__name__} while reading the answer"
        finally:
            exchange.seconds = time.perf_counter() - started
            await response.aclose()
        return exchange


async def _read_limited(response: httpx.Response, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)


async def _answer_from_stream(response: httpx.Response, request_id: int) -> dict[str, Any] | None:
    """The JSON-RPC answer carrying ``request_id`` from an event stream (the stream is left once it came)."""
    async for event in iter_events(response):
        if event.data:
            message = _json_object(event.data.encode())
            if message is not None and message.get("id") == request_id:
                return message
    return None


@dataclass
class Event:
    """One event of an event stream; ``comment`` for a line starting with ``:`` (a keep-alive)."""

    data: str = ""
    event: str = ""
    comment: bool = False


async def iter_events(response: httpx.Response) -> AsyncIterator[Event]:
    """Events and comments of an event stream as they arrive (``aiter_lines`` decodes the content coding)."""
    data: list[str] = []
    name = ""
    async for line in response.aiter_lines():
        if line.startswith(":"):
            yield Event(comment=True)
            continue
        if not line:
            if data:
                yield Event(data="\n".join(data), event=name)
            data, name = [], ""
            continue
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "data":
            data.append(value)
        elif key == "event":
            name = value


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        parsed = json.loads(raw)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None
