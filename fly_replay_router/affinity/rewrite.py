"""What the inner server's answers say, and how they leave: every minted session id sealed, every end seen.

One ``send`` wrapper (``Watcher.send``) goes around every request the layer passes to the inner
server, whatever the request carried, because the server's answer, not the request, tells what
happened:

- a response ``Mcp-Session-Id`` that the request did not carry is a session the server minted: it
  leaves as a new token, and under 400 it counts in the budget (``capacity.LiveSessions``), once
  the budget admits it (``Minting.admit``); the one the request carried goes back as the client's
  own token;
- an event stream's ``endpoint`` event (the 2024-11-05 transport) names a legacy session: its id
  leaves as a token, and the stream counts as a legacy session until it ends;
- a ``DELETE`` answered 2xx, or the server's own 404 "Session not found", on the path a session was
  minted on, ends that session in the budget.

A mint the budget refuses never reaches the client: a Streamable HTTP opening gets the refusal
instead (and the caller ends the orphan in the server), a legacy stream ends before its endpoint
event and its server side is told the client left. Response headers change only on
``http.response.start``; body messages pass through as they come, except the endpoint event,
rewritten as it streams (``sse.EndpointEventRewriter``).

Reference: MCP "Streamable HTTP", session management, and "HTTP with SSE"
(https://modelcontextprotocol.io/specification/2025-11-25/basic/transports).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Protocol

from fly_replay_router.affinity.capacity import LiveSessions, Refusal
from fly_replay_router.affinity.sse import ENDPOINT, SDK_MESSAGE_START, EndpointEventRewriter, passes_untouched
from fly_replay_router.asgi import Message, Scope, Send
from fly_replay_router.protocol import MCP_SESSION_ID, SDK_EVENT_STREAM_TYPE, SDK_JSON_TYPE, is_event_stream_type

# Every answer the layer serves for a session names who served it and how the request arrived:
# ``machine=<id>;worker=<tag>;via=<direct|replay|forward|handover>`` (hops joined by ``+``).
AFFINITY_SERVED_BY = b"affinity-served-by"
# How much of a 404's body is read to recognise the server's own "Session not found".
_NOT_FOUND_SCAN_BYTES = 1024
_SESSION_NOT_FOUND = b'"Session not found"'
# The SDK's DNS-rebinding check answers 421 (Misdirected Request) to a disallowed Host.
MISDIRECTED = 421
_SDK_MESSAGE_START_LENGTH = len(SDK_MESSAGE_START)


class LegacyRefused(ConnectionError):
    """Raised into the inner app's ``send`` when the budget refused the legacy session its stream names.

    A ``ConnectionError``, as servers raise for a client that left: the app's stream ends and the
    server forgets the session. The middleware absorbs it.
    """


class Minting(Protocol):
    """What the watcher needs from the layer."""

    @property
    def live(self) -> LiveSessions: ...

    # Whether a session minted here must first open the worker hand-over channel (``minting``).
    lazy_channel: bool

    def issue_token(self, inner_session_id: str) -> str: ...

    def served_by(self, headers: list[tuple[bytes, bytes]]) -> bytes: ...

    def admit(self, scope: Scope, *, legacy: bool, admitted: bool) -> Refusal | None: ...

    async def refuse(self, scope: Scope, send: Send, refusal: Refusal) -> None: ...

    def record_refusal(self, scope: Scope, refusal: Refusal) -> None: ...

    async def minting(self, scope: Scope) -> None: ...


# What a body message gets (``Watcher._body_mode``): sent on as it is, the first chunk of an event
# stream looked at, or everything looked at (``_body``).
_PASS, _FIRST_CHUNK, _WATCH = 0, 1, 2


class Watcher:
    """The ``send`` for one request the inner server handles (``Watcher.send``; see the module docstring),
    and what the answer has said so far, for the middleware once the app returns.

    ``served``/``token``: the inner id the request carried and the client's token for it (None for a
    request without a session). ``admitted``: the request already passed ``admit`` before it reached
    the server (its rate token is spent). ``served_by``: the ``affinity-served-by`` value for answers
    that belong to a session (None: asked of the layer if one does). ``streamable``: the carried id
    is a Streamable HTTP session (else a legacy message post's ``session_id``, whose session the
    stream counts).

    ``send`` is a plain function that returns what the app awaits (the server's own ``send`` for the
    message, most of the time): no coroutine of the layer's per message. Body messages are looked at
    only while something is left to see (an event stream's first events, a 404's body, a 421's end,
    a refusal); every other message goes on as it came.

    After the app returns, ``settle`` says whether ``legacy_stream`` (a legacy session the stream
    counted) or ``orphans`` (sessions the server minted that the budget refused) need the layer.
    """

    __slots__ = (
        "_admitted",
        "_body_mode",
        "_downstream",
        "_layer",
        "_not_found_body",
        "_path",
        "_rewriter",
        "_scope",
        "_served",
        "_served_by",
        "_stream_start",
        "_streamable",
        "_token",
        "complete",
        "legacy_stream",
        "orphans",
        "refused",
        "root_path",
        "settle",
        "status",
    )

    # Set when first needed (see ``__init__``).
    status: int
    complete: bool
    legacy_stream: bool
    orphans: list[bytes]
    _stream_start: bool
    _rewriter: EndpointEventRewriter | None
    _not_found_body: bytearray | None

    def __init__(
        self,
        scope: Scope,
        send: Send,
        layer: Minting,
        served: bytes | None,
        token: bytes | None,
        admitted: bool,
        served_by: bytes | None,
        streamable: bool = True,
    ) -> None:
        self._scope = scope
        self._downstream = send
        self._layer = layer
        self._served = served
        self._token = token
        self._admitted = admitted
        self._served_by = served_by
        self._streamable = streamable
        self._path: str = scope["path"]
        # As it was when the request arrived: a router inside the app may extend it in place.
        self.root_path: str = scope.get("root_path", "")
        self._body_mode = _PASS
        self.refused = False
        self.settle = False
        # Set when first needed (the common answer never needs them): status, complete (``_start``,
        # ``_body``), legacy_stream, orphans (with ``settle``), and the body's watchers (``_start``).

    def send(self, message: Message) -> Awaitable[None]:
        """The inner app's ``send``."""
        if message["type"] == "http.response.body":
            mode = self._body_mode
            if mode == _PASS:
                return self._downstream(message)
            if mode == _FIRST_CHUNK:
                return self._first_chunk(message)
            return self._body(message)
        if message["type"] == "http.response.start":
            return self._start(message)
        return self._downstream(message)

    def _start(self, message: Message) -> Awaitable[None]:
        """``http.response.start``: seal minted ids, echo the token, see ends and streams."""
        if self.refused:
            return _nothing()
        layer = self._layer
        served = self._served
        status = message["status"]
        self.status = status
        headers = message.get("headers", ())
        if type(headers) is not list and type(headers) is not tuple:  # cheaper than isinstance
            # Any iterable of pairs, says ASGI: read once here, so the server below gets them all.
            headers = list(headers)
            message = {**message, "headers": headers}
        rewritten: list[tuple[bytes, bytes]] | None = None
        content_type: bytes | None = None
        opens_channel = False
        index = -1
        for name, value in headers:
            index += 1
            if name == MCP_SESSION_ID:
                if rewritten is None:
                    rewritten = list(headers)
                if value == served:
                    rewritten[index] = (name, self._token)  # type: ignore[assignment]
                    continue
                if status < 400:
                    refusal = layer.admit(self._scope, legacy=False, admitted=self._admitted)
                    if refusal is not None:
                        self.refused = self.settle = True
                        self._body_mode = _WATCH
                        self.orphans = [value]
                        return layer.refuse(self._scope, self._downstream, refusal)
                    layer.live.minted(value, self._path, time.monotonic())
                    opens_channel = layer.lazy_channel
                rewritten[index] = (name, layer.issue_token(value.decode("latin-1")).encode("ascii"))
            elif name == b"content-type" and content_type is None:
                content_type = value
        inspect = False
        not_found_body: bytearray | None = None
        if status >= 300:
            if status == 404 and served is not None and self._streamable:
                not_found_body = bytearray()
                inspect = True
            elif status == MISDIRECTED:
                inspect = True  # the middleware asks whether the 421 was complete
        elif served is not None and self._streamable and status >= 200 and self._scope["method"] == "DELETE":
            layer.live.ended(served, self._path)
        # The SDKs' own two values are compared, which costs less than a call; others are parsed.
        stream = content_type is not None and (
            content_type == SDK_EVENT_STREAM_TYPE
            or (content_type != SDK_JSON_TYPE and is_event_stream_type(content_type))
        )
        if inspect:
            self._watch_body(stream, not_found_body)
        elif stream:
            self._body_mode = _FIRST_CHUNK
        if stream:
            opens_channel = opens_channel or layer.lazy_channel
        # Answers that belong to a session name who served them: a session's request, a mint, and a
        # GET stream (a legacy stream opens its session in its endpoint event).
        if rewritten is not None or served is not None or (stream and self._scope["method"] == "GET"):
            if rewritten is None:
                rewritten = list(headers)
            rewritten.append((AFFINITY_SERVED_BY, self._served_by or layer.served_by(self._scope["headers"])))
            message = dict(message)  # never in place: an app may send one dict twice
            message["headers"] = rewritten
        if opens_channel:
            return self._open_channel_then(message)
        return self._downstream(message)

    def _body(self, message: Message) -> Awaitable[None]:
        """A body message while something is left to see in the body."""
        if self.refused:
            return _nothing()  # the client was given the refusal; what the server still sends goes nowhere
        complete = not message.get("more_body", False)
        self.complete = complete
        chunk = message.get("body", b"")
        if self._stream_start:
            # Most streams decide on their first chunk; the others get a rewriter.
            self._stream_start = False
            if not passes_untouched(chunk):
                self._rewriter = EndpointEventRewriter(self._seal_endpoint)
        rewriter = self._rewriter
        if rewriter is not None:
            try:
                body = rewriter.feed(chunk)
                if complete:
                    body += rewriter.flush()
            except LegacyRefused:
                self.refused = True
                return self._end_refused_stream()
            if rewriter.done:
                self._rewriter = None
            if body is not chunk:
                message = dict(message)
                message["body"] = body
        elif self._not_found_body is not None:
            not_found_body = self._not_found_body
            if len(not_found_body) < _NOT_FOUND_SCAN_BYTES:
                not_found_body += chunk[:_NOT_FOUND_SCAN_BYTES]
            if complete and not_found_body.find(_SESSION_NOT_FOUND) >= 0:
                self._layer.live.ended(self._served, self._path)  # type: ignore[arg-type]
        if self._rewriter is None and self._not_found_body is None and self.status != MISDIRECTED:
            self._body_mode = _PASS
        return self._downstream(message)

    def _first_chunk(self, message: Message) -> Awaitable[None]:
        """The first body message of an event stream, when nothing else is watched: most decide at once."""
        chunk = message.get("body", b"")
        # The SDKs' own first chunk is decided here without a call: it opens with a message event's
        # type and data lines, so it dispatches a message event once complete (passes_untouched's
        # other two tests follow). Every other chunk takes passes_untouched.
        if (
            chunk[:_SDK_MESSAGE_START_LENGTH] == SDK_MESSAGE_START
            and chunk[-3:] == b"\n\r\n"
            and not chunk.partition(ENDPOINT)[1]
        ) or passes_untouched(chunk):
            self._body_mode = _PASS
            return self._downstream(message)
        self._watch_body(False, None)
        self._rewriter = EndpointEventRewriter(self._seal_endpoint)
        return self._body(message)

    def _watch_body(self, stream_start: bool, not_found_body: bytearray | None) -> None:
        """From now on every body message goes through ``_body`` (these are what it reads)."""
        self._body_mode = _WATCH
        self.complete = False
        self._stream_start = stream_start
        self._rewriter = None
        self._not_found_body = not_found_body

    async def _open_channel_then(self, message: Message) -> None:
        await self._layer.minting(self._scope)
        await self._downstream(message)

    async def _end_refused_stream(self) -> None:
        """The budget refused the legacy session this stream names: it ends before its endpoint event."""
        await self._downstream({"type": "http.response.body", "body": b"", "more_body": False})
        raise LegacyRefused

    def _seal_endpoint(self, inner_session_id: str) -> str:
        """The token for the legacy session an ``endpoint`` event names, once the budget admits it."""
        layer = self._layer
        refusal = layer.admit(self._scope, legacy=True, admitted=self._admitted)
        if refusal is not None:
            layer.record_refusal(self._scope, refusal)
            raise LegacyRefused
        layer.live.legacy_streams += 1
        self.legacy_stream = self.settle = True
        return layer.issue_token(inner_session_id)


async def _nothing() -> None:
    """What the app awaits for a message that goes nowhere."""
