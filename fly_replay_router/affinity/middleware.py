"""AffinityMiddleware: pure ASGI, in front of an unmodified MCP server, on every machine.

What it trusts: the ``fly-replay-src``, ``fly-replay-failed`` and ``fly-preferred-instance-unavailable``
request headers, which Fly's proxy sets and strips from client requests, and ``affinity-forwarded-from``
from peers. A client that forges any of them can only turn its own request into a 404: a replay or
forward target always comes from a verified token.

Carriers of a session id (``fly_replay_router.affinity.carriers`` reads them exactly as the
server behind the layer does): the ``Mcp-Session-Id`` request header (Streamable HTTP, every method)
and the ``session_id`` query parameter (legacy HTTP+SSE message posts). A request that carries one
reaches the server only with a token verified for this machine, and then with the inner id in that
carrier; two carriers, or one that could be read two ways, get 404. The ``MCP-Protocol-Version``
header does not change that: only a request with no carrier at all passes through untouched.

References: MCP "Streamable HTTP" and "HTTP with SSE" transports (session management, 404 to
restart, https://modelcontextprotocol.io/specification/2025-11-25/basic/transports); Fly "Dynamic
request routing" (https://fly.io/docs/networking/dynamic-request-routing/).
"""

from __future__ import annotations

import time

from fly_replay_router.affinity.answers import send_forward_failure, send_not_found
from fly_replay_router.affinity.carriers import AmbiguousCarrier, QueryCarrier, find_query_carrier
from fly_replay_router.affinity.decision import Arrival, Forward, Reject, Replay, decide
from fly_replay_router.affinity.forward import FORWARDED_FROM, OwnerForwarder, body_replayable
from fly_replay_router.affinity.logs import DecisionLog
from fly_replay_router.affinity.metrics import DecisionCounts
from fly_replay_router.affinity.sse import EndpointEventRewriter
from fly_replay_router.affinity.token import TokenCodec
from fly_replay_router.asgi import ASGIApp, Message, Receive, Scope, Send
from fly_replay_router.fly import (
    FLY_PREFERRED_INSTANCE_UNAVAILABLE,
    FLY_REPLAY,
    FLY_REPLAY_FAILED,
    FLY_REPLAY_SRC,
    parse_replay_src,
)
from fly_replay_router.protocol import (
    HANDSHAKE_PROTOCOL_VERSIONS,
    MCP_PROTOCOL_VERSION,
    MCP_SESSION_ID,
    is_event_stream,
)
from fly_replay_router.settings import AffinitySettings

_HANDSHAKE_VERSIONS = frozenset(version.encode("ascii") for version in HANDSHAKE_PROTOCOL_VERSIONS)
_FLY_REPLAY_SRC = FLY_REPLAY_SRC.encode("ascii")
_FLY_REPLAY_FAILED = FLY_REPLAY_FAILED.encode("ascii")
_FLY_PREFERRED_UNAVAILABLE = FLY_PREFERRED_INSTANCE_UNAVAILABLE.encode("ascii")
_ROUTING_HEADERS = frozenset({_FLY_REPLAY_SRC, _FLY_REPLAY_FAILED, _FLY_PREFERRED_UNAVAILABLE, FORWARDED_FROM})
# The SDK's DNS-rebinding check answers 421 (Misdirected Request) to a disallowed Host.
_MISDIRECTED = 421


class AffinityMiddleware:
    """Keeps every request of an MCP session on the machine that holds the session in memory.

    Wraps the inner server's session ids in sealed tokens naming this machine, and routes each
    request that carries one: served here, replayed to its owner with ``fly-replay``, forwarded
    to the owner when Fly cannot replay its body, or answered 404. Other traffic (no session,
    2026-07-28 requests, lifespan, websockets) passes through untouched.
    """

    def __init__(self, app: ASGIApp, *, settings: AffinitySettings) -> None:
        self.app = app
        self.settings = settings
        self._codec = TokenCodec(settings.secret_keys, app_name=settings.app_name)
        self._forwarder = OwnerForwarder(settings)
        self._counts = DecisionCounts(settings.machine_id)
        self._log = DecisionLog(settings.machine_id)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        token: bytes | None = None
        version: bytes | None = None
        length: bytes | None = None
        token_index = carriers = 0
        chunked = routing = False
        # One pass over the headers.
        for index, (name, value) in enumerate(headers):
            if name == MCP_SESSION_ID:
                carriers += 1
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
        query_carrier: QueryCarrier | None = None
        if scope["query_string"]:
            try:
                query_carrier = find_query_carrier(scope["query_string"])
            except AmbiguousCarrier:
                carriers = 2
            else:
                carriers += query_carrier is not None

        if not carriers:
            self._counts.passed += 1
            if version is not None and version not in _HANDSHAKE_VERSIONS and scope["method"] == "POST":
                # 2026-07-28 and later: sessionless, any machine serves it, nothing to mint.
                await self.app(scope, receive, send)
                return
            answer = _Answer()
            try:
                await self.app(scope, receive, self._minting_send(scope, send, answer))
            except ValueError:
                # The official SDK's legacy GET /sse answers a disallowed Host with 421, then raises
                # ValueError("Request validation failed"): a traceback per request, for a refusal
                # by design. Only that shape is absorbed (a complete 421, then ValueError).
                if not (answer.complete and answer.status == _MISDIRECTED):
                    raise
                self._reject(scope, "host_not_allowed", None, count=False)
            return
        if carriers > 1:
            self._reject(scope, "ambiguous_carrier", None)
            await send_not_found(send)
            return

        token_text = query_carrier.value if query_carrier is not None else (token or b"").decode("latin-1")
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
            self._reject(scope, decision.reason, decision.owner_machine_id)
            await send_not_found(send)
            return
        if isinstance(decision, Replay):
            self._record(scope, "replayed", "", decision.owner_machine_id)
            await self._send_replay(send, decision.owner_machine_id)
            return
        if isinstance(decision, Forward):
            await self._forward(scope, receive, send, decision.owner_machine_id)
            return

        self._counts.served += 1
        inner = decision.inner_session_id.encode("ascii")
        scope = dict(scope)
        if query_carrier is None:
            scope["headers"] = rewritten = list(headers)
            rewritten[token_index] = (MCP_SESSION_ID, inner)
        else:
            scope["query_string"] = query_carrier.replaced(scope["query_string"], inner)
        # A token that verified is ASCII, whichever carrier it came in.
        await self.app(scope, receive, self._echoing_send(send, inner, token_text.encode("ascii")))

    async def aclose(self) -> None:
        """Close the connections kept open to other machines for forwarding."""
        await self._forwarder.aclose()

    def issue_token(self, inner_session_id: str) -> str:
        """A token for a session id the inner app minted on this machine."""
        return self._codec.issue(self.settings.machine_id, inner_session_id, now=time.time())

    def _minting_send(self, scope: Scope, send: Send, answer: _Answer) -> Send:
        """``send`` for a request without a session: session ids the inner app mints leave as tokens.

        A legacy ``GET /sse`` stream also has its ``endpoint`` event rewritten as it passes.
        """
        rewriter: EndpointEventRewriter | None = None
        scan_for_endpoint = scope["method"] == "GET"

        async def send_minting(message: Message) -> None:
            nonlocal rewriter
            if message["type"] == "http.response.start":
                answer.status = message["status"]
                headers = message.get("headers", ())
                if any(name == MCP_SESSION_ID for name, _ in headers):
                    wrapped = [
                        (name, self.issue_token(value.decode("latin-1")).encode("ascii"))
                        if name == MCP_SESSION_ID
                        else (name, value)
                        for name, value in headers
                    ]
                    message = {**message, "headers": wrapped}
                if scan_for_endpoint and is_event_stream(headers):
                    rewriter = EndpointEventRewriter(self.issue_token)
            elif message["type"] == "http.response.body":
                answer.complete = not message.get("more_body", False)
                if rewriter is not None and not rewriter.done:
                    body = rewriter.feed(message.get("body", b""))
                    if answer.complete:
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
        outcome = await self._forwarder.forward(scope, receive, send, owner_machine_id=owner)
        if outcome.answered:
            self._record(scope, "forwarded", outcome.reason, owner)
            return
        self._reject(scope, outcome.reason, owner)
        if outcome.status == 404:
            await send_not_found(send)
        elif outcome.status:
            await send_forward_failure(send, outcome.status)

    def _record(self, scope: Scope, outcome: str, reason: str, owner: str | None) -> None:
        """Count a decision that is not "served here" and log it as one line."""
        self._counts.add(outcome, reason)
        self._log.decision(scope, outcome, reason, owner)

    def _reject(self, scope: Scope, reason: str, owner: str | None, *, count: bool = True) -> None:
        if count:
            self._counts.add("rejected", reason)
        self._log.decision(scope, "rejected", reason, owner)


class _Answer:
    """What the inner app has answered so far: status, and whether the body is complete."""

    __slots__ = ("complete", "status")

    def __init__(self) -> None:
        self.status = 0
        self.complete = False


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
