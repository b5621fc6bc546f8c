"""AffinityMiddleware: pure ASGI, in front of an unmodified MCP server, on every machine.

What it trusts: the ``fly-replay-src``, ``fly-replay-failed`` and ``fly-preferred-instance-unavailable``
request headers, which Fly's proxy sets and strips from client requests, and ``affinity-forwarded-from``
from peers. A client that forges any of them can only turn its own request into a 404: a replay or
forward target always comes from a verified token.

Carriers of a session id, in the order they are looked for:

- the ``Mcp-Session-Id`` request header (Streamable HTTP, every method);
- the ``session_id`` query parameter (legacy HTTP+SSE message posts).

References: MCP "Streamable HTTP" and "HTTP with SSE" transports (session management, 404 to
restart); Fly "Dynamic request routing" (``fly-replay``); ``shared/reference/*.md``.
"""

from __future__ import annotations

import logging
import re
import time
from urllib.parse import unquote

from fly_replay_router.affinity.decision import Arrival, Forward, Reject, Replay, Serve, decide
from fly_replay_router.affinity.forward import FORWARDED_FROM, OwnerForwarder, body_replayable
from fly_replay_router.affinity.metrics import DecisionCounts
from fly_replay_router.affinity.sse import EndpointEventRewriter
from fly_replay_router.affinity.token import TokenCodec
from fly_replay_router.affinity.workers import WORKER_SEPARATOR, HandOver, WorkerChannel, decide_worker, handed_over
from fly_replay_router.affinity.workers import socket_dir as worker_socket_dir
from fly_replay_router.asgi import ASGIApp, Message, Receive, Scope, Send
from fly_replay_router.fly import (
    FLY_PREFERRED_INSTANCE_UNAVAILABLE,
    FLY_REPLAY,
    FLY_REPLAY_FAILED,
    FLY_REPLAY_SRC,
    FLY_REQUEST_ID,
    parse_replay_src,
)
from fly_replay_router.protocol import (
    HANDSHAKE_PROTOCOL_VERSIONS,
    MCP_PROTOCOL_VERSION,
    MCP_SESSION_ID,
    SESSION_NOT_FOUND_BODY,
    is_event_stream,
)
from fly_replay_router.settings import AffinitySettings

logger = logging.getLogger("fly_replay_router.affinity")

_HANDSHAKE_VERSIONS = frozenset(version.encode("ascii") for version in HANDSHAKE_PROTOCOL_VERSIONS)
_FLY_REPLAY_SRC = FLY_REPLAY_SRC.encode("ascii")
_FLY_REPLAY_FAILED = FLY_REPLAY_FAILED.encode("ascii")
_FLY_PREFERRED_UNAVAILABLE = FLY_PREFERRED_INSTANCE_UNAVAILABLE.encode("ascii")
_FLY_REQUEST_ID = FLY_REQUEST_ID.encode("ascii")
_ROUTING_HEADERS = frozenset({_FLY_REPLAY_SRC, _FLY_REPLAY_FAILED, _FLY_PREFERRED_UNAVAILABLE, FORWARDED_FROM})
_LEGACY_SESSION_PARAM = re.compile(rb"(?:^|&)session_id=([^&]*)")

_NOT_FOUND_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(SESSION_NOT_FOUND_BODY)).encode("ascii")),
]


class AffinityMiddleware:
    """Keeps every request of an MCP session on the machine that holds the session in memory.

    Wraps the inner server's session ids in signed tokens naming this machine, and routes each
    request that carries a token: served here, replayed to its owner with ``fly-replay``, forwarded
    to the owner when Fly cannot replay its body, or answered 404. Other traffic (no session,
    2026-07-28 requests, lifespan, websockets) passes through untouched.
    """

    def __init__(self, app: ASGIApp, *, settings: AffinitySettings) -> None:
        self.app = app
        self.settings = settings
        self._codec = TokenCodec(settings.secret_keys, app_name=settings.app_name)
        self._forwarder = OwnerForwarder()
        self._counts = DecisionCounts(settings.machine_id)
        # Several worker processes per machine: which one owns a session (fly_replay_router.affinity.workers).
        self.workers = WorkerChannel(worker_socket_dir(settings), serve=self)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.workers.lifespan(self.app, scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        token: bytes | None = None
        version: bytes | None = None
        length: bytes | None = None
        token_index = 0
        chunked = routing = False
        # One pass. The first Mcp-Session-Id and MCP-Protocol-Version count, as for the SDK.
        for index, (name, value) in enumerate(headers):
            if name == MCP_SESSION_ID:
                if token is None:
                    token, token_index = value, index
            elif name == MCP_PROTOCOL_VERSION:
                if version is None:
                    version = value
            elif name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = True
            elif name in _ROUTING_HEADERS:
                routing = True
        if version is not None and version not in _HANDSHAKE_VERSIONS:
            # 2026-07-28 and later: sessionless, any machine serves it.
            self._counts.passed += 1
            await self.app(scope, receive, send)
            return

        legacy_match = None
        if token is not None:
            token_text = token.decode("latin-1")
        else:
            legacy_match = _LEGACY_SESSION_PARAM.search(scope["query_string"])
            if legacy_match is None:
                self._counts.passed += 1
                await self.app(scope, receive, self._minting_send(scope, send))
                return
            token_text = unquote(legacy_match.group(1).decode("latin-1"))

        replayable = body_replayable(length, chunked)
        decision = decide(
            token_text,
            machine_id=self.settings.machine_id,
            codec=self._codec,
            now=time.time(),
            max_age=self.settings.max_token_age,
            arrival=_arrival(headers, replayable) if routing else (_SMALL_BODY if replayable else _LARGE_BODY),
        )
        if isinstance(decision, Reject):
            self._record(scope, "rejected", decision.reason, decision.owner_machine_id)
            await _send_not_found(send)
            return
        if isinstance(decision, Replay):
            self._record(scope, "replayed", "", decision.owner_machine_id)
            await self._send_replay(send, decision.owner_machine_id)
            return
        if isinstance(decision, Forward):
            await self._forward(scope, receive, send, decision.owner_machine_id)
            return

        worker, _, inner_id = decision.inner_session_id.partition(WORKER_SEPARATOR)
        if worker != self.workers.tag:
            # Another worker of this machine, or a token minted before workers were named.
            served_id = await self._other_worker(scope, receive, send, decision.inner_session_id)
            if served_id is None:
                return
            inner_id = served_id
        self._counts.served += 1
        inner = inner_id.encode("ascii")
        scope = dict(scope)
        if legacy_match is None:
            scope["headers"] = rewritten = list(headers)
            rewritten[token_index] = (MCP_SESSION_ID, inner)
        else:
            query: bytes = scope["query_string"]
            start, end = legacy_match.span(1)
            scope["query_string"] = query[:start] + inner + query[end:]
        # A token that verified is ASCII, whichever carrier it came in.
        await self.app(scope, receive, self._echoing_send(send, inner, token_text.encode("ascii")))

    def issue_token(self, inner_session_id: str) -> str:
        """A token for a session id the inner app minted on this machine."""
        inner = f"{self.workers.tag}{WORKER_SEPARATOR}{inner_session_id}"
        return self._codec.issue(self.settings.machine_id, inner, now=time.time())

    def _minting_send(self, scope: Scope, send: Send) -> Send:
        """``send`` for a request without a session: session ids the inner app mints leave as tokens.

        A legacy ``GET /sse`` stream also has its ``endpoint`` event rewritten as it passes.
        """
        rewriter: EndpointEventRewriter | None = None
        scan_for_endpoint = scope["method"] == "GET"

        async def send_minting(message: Message) -> None:
            nonlocal rewriter
            if message["type"] == "http.response.start":
                headers = message.get("headers", ())
                minting = any(name == MCP_SESSION_ID for name, _ in headers)
                sse = scan_for_endpoint and is_event_stream(headers)
                if (minting or sse) and not self.workers.serving:
                    await self.workers.start(state=scope.get("state"), root=scope.get("app"))
                if minting:
                    wrapped = [
                        (name, self.issue_token(value.decode("latin-1")).encode("ascii"))
                        if name == MCP_SESSION_ID
                        else (name, value)
                        for name, value in headers
                    ]
                    message = {**message, "headers": wrapped}
                if sse:
                    rewriter = EndpointEventRewriter(self.issue_token)
            elif message["type"] == "http.response.body" and rewriter is not None and not rewriter.done:
                body = rewriter.feed(message.get("body", b""))
                if not message.get("more_body", False):
                    body += rewriter.flush()
                message = {**message, "body": body}
            await send(message)

        return send_minting

    def _echoing_send(self, send: Send, inner: bytes, token: bytes) -> Send:
        """``send`` for a session served here: the inner id goes back out as the client's own token.

        So a session keeps one token (which is also what Fly's replay cache keys on). A different
        id (the inner app minted a new session) gets a new token.
        """

        async def send_echoing(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers", ())
                for index, (name, value) in enumerate(headers):
                    if name == MCP_SESSION_ID:
                        wrapped = token if value == inner else self.issue_token(value.decode("latin-1")).encode("ascii")
                        rewritten = list(headers)
                        rewritten[index] = (name, wrapped)
                        message = {**message, "headers": rewritten}
                        break
            await send(message)

        return send_echoing

    async def _send_replay(self, send: Send, owner: str) -> None:
        instruction = self.settings.replay_instruction(owner).to_header().encode("ascii")
        body = f"Session owned by machine {owner}: Fly's proxy replays this request there.\n".encode("ascii")
        headers = [
            (FLY_REPLAY.encode("ascii"), instruction),
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode("ascii")),
        ]
        # 307, not 2xx: without Fly in front, this answer must not look like a success.
        await send({"type": "http.response.start", "status": 307, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _forward(self, scope: Scope, receive: Receive, send: Send, owner: str) -> None:
        owner_url = self.settings.peer_url(owner)
        reached = await self._forwarder.forward(
            scope, receive, send, owner_url=owner_url, this_machine=self.settings.machine_id
        )
        if reached:
            self._record(scope, "forwarded", "", owner)
        else:
            self._record(scope, "rejected", "owner_unreachable", owner)
            await _send_not_found(send)

    async def _other_worker(self, scope: Scope, receive: Receive, send: Send, inner: str) -> str | None:
        """The inner id to serve here, or None once the request was handed over or answered 404."""
        decision = decide_worker(inner, this_worker=self.workers.tag, handed_over=handed_over(scope))
        if isinstance(decision, Serve):
            return decision.inner_session_id
        owner = f"{self.settings.machine_id}/{decision.owner_worker if isinstance(decision, HandOver) else '-'}"
        if isinstance(decision, HandOver) and await self.workers.hand_over(scope, receive, send, decision.owner_worker):
            self._record(scope, "handed_over", "", owner)
            return None
        self._record(scope, "rejected", decision.reason if isinstance(decision, Reject) else "worker_gone", owner)
        await _send_not_found(send)
        return None

    def _record(self, scope: Scope, outcome: str, reason: str, owner: str | None) -> None:
        """Count a decision that is not "served here" and log it as one structured line."""
        self._counts.add(outcome, reason)
        request_id = next((value for name, value in scope["headers"] if name == _FLY_REQUEST_ID), b"-")
        fields = {
            "outcome": outcome,
            "reason": reason or "-",
            "owner": owner or "-",
            "machine": self.settings.machine_id,
            "request_id": request_id.decode("latin-1"),
            "method": scope["method"],
            "path": scope["path"],
        }
        logger.info("affinity %s", " ".join(f"{key}={value}" for key, value in fields.items()), extra=fields)


def _arrival(headers: list[tuple[bytes, bytes]], body_replayable: bool) -> Arrival:
    replayed_from: str | None = None
    forwarded_from: str | None = None
    replay_failed = preferred_unavailable = False
    for name, value in headers:
        if name == _FLY_REPLAY_SRC:
            replayed_from = parse_replay_src(value.decode("latin-1")).instance or ""
        elif name == _FLY_REPLAY_FAILED:
            replay_failed = True
        elif name == _FLY_PREFERRED_UNAVAILABLE:
            preferred_unavailable = True
        elif name == FORWARDED_FROM:
            forwarded_from = value.decode("latin-1")
    return Arrival(
        replayed_from=replayed_from,
        replay_failed=replay_failed,
        preferred_unavailable=preferred_unavailable,
        forwarded_from=forwarded_from,
        body_replayable=body_replayable,
    )


_SMALL_BODY = Arrival()
_LARGE_BODY = Arrival(body_replayable=False)


async def _send_not_found(send: Send) -> None:
    await send({"type": "http.response.start", "status": 404, "headers": _NOT_FOUND_HEADERS})
    await send({"type": "http.response.body", "body": SESSION_NOT_FOUND_BODY})
