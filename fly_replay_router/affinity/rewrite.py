"""What the inner server's answers say, and how they leave: every minted session id sealed, every end seen.

One ``send`` wrapper (``watching_send``) goes around every request the layer passes to the inner
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
from typing import Protocol

from fly_replay_router.affinity.capacity import LiveSessions, Refusal
from fly_replay_router.affinity.sse import EndpointEventRewriter
from fly_replay_router.asgi import Message, Scope, Send
from fly_replay_router.protocol import MCP_SESSION_ID, is_event_stream

# Every answer the layer serves for a session names who served it and how the request arrived:
# ``machine=<id>;worker=<tag>;via=<direct|replay|forward|handover>`` (hops joined by ``+``).
AFFINITY_SERVED_BY = b"affinity-served-by"
# How much of a 404's body is read to recognise the server's own "Session not found".
_NOT_FOUND_SCAN_BYTES = 1024
_SESSION_NOT_FOUND = b'"Session not found"'


class LegacyRefused(ConnectionError):
    """Raised into the inner app's ``send`` when the budget refused the legacy session its stream names.

    A ``ConnectionError``, as servers raise for a client that left: the app's stream ends and the
    server forgets the session. The middleware absorbs it.
    """


class Minting(Protocol):
    """What the watcher needs from the layer."""

    @property
    def live(self) -> LiveSessions: ...

    def issue_token(self, inner_session_id: str) -> str: ...

    def admit(self, scope: Scope, *, legacy: bool, admitted: bool) -> Refusal | None: ...

    async def refuse(self, scope: Scope, send: Send, refusal: Refusal) -> None: ...

    def record_refusal(self, scope: Scope, refusal: Refusal) -> None: ...

    async def minting(self, scope: Scope) -> None: ...


class Answer:
    """What the inner app has answered so far, for the middleware once the app returns."""

    __slots__ = ("complete", "legacy_stream", "orphans", "refused", "root_path", "status")

    def __init__(self) -> None:
        self.root_path = ""
        self.status = 0
        self.complete = False
        self.legacy_stream = False
        self.refused = False
        # Sessions the server minted that the budget refused: the middleware ends them in the server.
        self.orphans: list[bytes] = []


def watching_send(
    scope: Scope,
    send: Send,
    answer: Answer,
    layer: Minting,
    *,
    served: bytes | None,
    token: bytes | None,
    admitted: bool,
    served_by: bytes | None,
    streamable: bool = True,
) -> Send:
    """``send`` for a request the inner server handles (see the module docstring).

    ``served``/``token``: the inner id the request carried and the client's token for it (None for a
    request without a session). ``admitted``: the request already passed ``admit`` before it reached
    the server (its rate token is spent). ``served_by``: the ``affinity-served-by`` value for answers
    that belong to a session. ``streamable``: the carried id is a Streamable HTTP session (else a
    legacy message post's ``session_id``, whose session the stream counts).
    """
    rewriter: EndpointEventRewriter | None = None
    not_found_body: bytearray | None = None
    path = scope["path"]
    # As it was when the request arrived: a router inside the app may extend it in place.
    answer.root_path = scope.get("root_path", "")

    def seal_endpoint(inner_session_id: str) -> str:
        refusal = layer.admit(scope, legacy=True, admitted=admitted)
        if refusal is not None:
            layer.record_refusal(scope, refusal)
            raise LegacyRefused
        layer.live.legacy_streams += 1
        answer.legacy_stream = True
        return layer.issue_token(inner_session_id)

    async def send_watching(message: Message) -> None:
        nonlocal rewriter, not_found_body
        if answer.refused:
            return  # the client was given the refusal; what the server still sends goes nowhere
        kind = message["type"]
        if kind == "http.response.start":
            status = message["status"]
            answer.status = status
            headers = message.get("headers", ())
            rewritten: list[tuple[bytes, bytes]] | None = None
            for index, (name, value) in enumerate(headers):
                if name != MCP_SESSION_ID:
                    continue
                if rewritten is None:
                    rewritten = list(headers)
                if value == served:
                    rewritten[index] = (name, token)  # type: ignore[assignment]
                    continue
                if status < 400:
                    refusal = layer.admit(scope, legacy=False, admitted=admitted)
                    if refusal is not None:
                        answer.refused = True
                        answer.orphans.append(value)
                        await layer.refuse(scope, send, refusal)
                        return
                    layer.live.minted(value, path, time.monotonic())
                    await layer.minting(scope)
                rewritten[index] = (name, layer.issue_token(value.decode("latin-1")).encode("ascii"))
            if served is not None and streamable:
                if status == 404:
                    not_found_body = bytearray()
                elif 200 <= status < 300 and scope["method"] == "DELETE":
                    layer.live.ended(served, path)
            stream = is_event_stream(headers)
            if stream:
                rewriter = EndpointEventRewriter(seal_endpoint)
                await layer.minting(scope)
            if served_by is not None and (rewritten is not None or served is not None or stream):
                if rewritten is None:
                    rewritten = list(headers)
                rewritten.append((AFFINITY_SERVED_BY, served_by))
            if rewritten is not None:
                message = {**message, "headers": rewritten}
        elif kind == "http.response.body":
            complete = not message.get("more_body", False)
            answer.complete = complete
            if rewriter is not None and not rewriter.done:
                try:
                    body = rewriter.feed(message.get("body", b""))
                    if complete:
                        body += rewriter.flush()
                except LegacyRefused:
                    answer.refused = True
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    raise
                message = {**message, "body": body}
            elif not_found_body is not None:
                if len(not_found_body) < _NOT_FOUND_SCAN_BYTES:
                    not_found_body += message.get("body", b"")[:_NOT_FOUND_SCAN_BYTES]
                if complete and _SESSION_NOT_FOUND in not_found_body:
                    layer.live.ended(served, path)  # type: ignore[arg-type]
        await send(message)

    return send_watching
