"""How the layer rewrites the inner app's answers: minted session ids leave as tokens, served ones echo.

Response headers change only on ``http.response.start``; body messages pass through as they come,
except the legacy SSE ``endpoint`` event, rewritten as it streams (``sse.EndpointEventRewriter``).
The session budget (``capacity.LiveSessions``) learns here when a session opens and ends.

Reference: MCP "Streamable HTTP", session management, and "HTTP with SSE"
(https://modelcontextprotocol.io/specification/2025-11-25/basic/transports).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fly_replay_router.affinity.capacity import LiveSessions
from fly_replay_router.affinity.sse import EndpointEventRewriter
from fly_replay_router.affinity.workers import WorkerChannel
from fly_replay_router.asgi import Message, Scope, Send
from fly_replay_router.protocol import MCP_SESSION_ID, is_event_stream


class Answer:
    """What the inner app has answered so far: status, whether the body is complete, a legacy stream."""

    __slots__ = ("complete", "legacy_stream", "status")

    def __init__(self) -> None:
        self.status = 0
        self.complete = False
        self.legacy_stream = False


def minting_send(
    scope: Scope,
    send: Send,
    answer: Answer,
    *,
    issue_token: Callable[[str], str],
    live: LiveSessions,
    workers: WorkerChannel,
) -> Send:
    """``send`` for a request without a session: session ids the inner app mints leave as tokens.

    A legacy ``GET /sse`` stream also has its ``endpoint`` event rewritten as it passes, and
    counts as an open legacy session until it ends (the caller decrements ``legacy_streams`` when
    ``answer.legacy_stream``); a minted session counts from now on. The first session a worker
    mints opens its hand-over channel, if the lifespan did not and several workers are declared.
    """
    rewriter: EndpointEventRewriter | None = None
    scan_for_endpoint = scope["method"] == "GET"

    async def send_minting(message: Message) -> None:
        nonlocal rewriter
        if message["type"] == "http.response.start":
            answer.status = message["status"]
            headers = message.get("headers", ())
            minting = any(name == MCP_SESSION_ID for name, _ in headers)
            sse = scan_for_endpoint and is_event_stream(headers)
            if (minting or sse) and workers.lazy and not workers.serving:
                await workers.start(state=scope.get("state"), root=scope.get("app"))
            if minting:
                wrapped = []
                for name, value in headers:
                    if name == MCP_SESSION_ID:
                        live.seen(value, time.monotonic())
                        value = issue_token(value.decode("latin-1")).encode("ascii")
                    wrapped.append((name, value))
                message = {**message, "headers": wrapped}
            if sse:
                rewriter = EndpointEventRewriter(issue_token)
                live.legacy_streams += 1
                answer.legacy_stream = True
        elif message["type"] == "http.response.body":
            answer.complete = not message.get("more_body", False)
            if rewriter is not None and not rewriter.done:
                body = rewriter.feed(message.get("body", b""))
                if answer.complete:
                    body += rewriter.flush()
                message = {**message, "body": body}
        await send(message)

    return send_minting


def echoing_send(
    scope: Scope, send: Send, inner: bytes, token: bytes, *, issue_token: Callable[[str], str], live: LiveSessions
) -> Send:
    """``send`` for a session served here: the inner id goes back out as the client's own token.

    So a session keeps one token (which is also what Fly's replay cache keys on). A different
    id (the inner app minted a new session) gets a new token. A 404 (the inner app no longer
    holds the session) or a successful ``DELETE`` ends the session's place in the budget.
    """
    deleting = scope["method"] == "DELETE"

    async def send_echoing(message: Message) -> None:
        if message["type"] == "http.response.start":
            status = message["status"]
            if status == 404 or (deleting and 200 <= status < 300):
                live.ended(inner)
            headers = message.get("headers", ())
            for index, (name, value) in enumerate(headers):
                if name == MCP_SESSION_ID:
                    wrapped = token if value == inner else issue_token(value.decode("latin-1")).encode("ascii")
                    rewritten = list(headers)
                    rewritten[index] = (name, wrapped)
                    message = {**message, "headers": rewritten}
                    break
        await send(message)

    return send_echoing
