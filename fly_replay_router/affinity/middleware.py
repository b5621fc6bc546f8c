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

import math
import time
from typing import Any

from fly_replay_router.affinity.answers import send_forward_failure, send_not_found, send_refusal, send_replay
from fly_replay_router.affinity.arrival import (
    LARGE_BODY,
    ROUTING_HEADERS,
    SMALL_BODY,
    arrival,
    arrived_via,
    replay_state,
)
from fly_replay_router.affinity.capacity import Admission, Elsewhere, Live, LiveSessions, Refusal, client_key, full_hops
from fly_replay_router.affinity.carriers import AmbiguousCarrier, QueryCarrier, find_query_carrier
from fly_replay_router.affinity.decision import Forward, Reject, Replay, Serve, decide
from fly_replay_router.affinity.forward import OwnerForwarder, body_replayable
from fly_replay_router.affinity.frames import HANDED_OVER
from fly_replay_router.affinity.handover import Outcome
from fly_replay_router.affinity.logs import DecisionLog
from fly_replay_router.affinity.metrics import DecisionCounts
from fly_replay_router.affinity.orphans import end_orphan
from fly_replay_router.affinity.rewrite import MISDIRECTED, LegacyRefused, Watcher
from fly_replay_router.affinity.token import VERIFIED_TOKENS_KEPT, TokenCodec
from fly_replay_router.affinity.workers import WORKER_SEPARATOR, HandOver, WorkerChannel, decide_worker, handed_over
from fly_replay_router.affinity.workers import socket_dir as worker_socket_dir
from fly_replay_router.asgi import ASGIApp, Receive, Scope, Send
from fly_replay_router.protocol import (
    HANDSHAKE_PROTOCOL_VERSIONS,
    MCP_PROTOCOL_VERSION,
    MCP_SESSION_ID,
)
from fly_replay_router.settings import AffinitySettings

_HANDSHAKE_VERSIONS = frozenset(version.encode("ascii") for version in HANDSHAKE_PROTOCOL_VERSIONS)
# Headers that say the request did not come straight from a client (and so how it arrived).
_ARRIVAL_HEADERS = ROUTING_HEADERS | {HANDED_OVER}
# Every request header the routing reads.
_READ_HEADERS = (
    frozenset({MCP_SESSION_ID, MCP_PROTOCOL_VERSION, b"content-length", b"transfer-encoding"}) | _ARRIVAL_HEADERS
)


def _keep(memory: dict[bytes, Any], token: bytes, entry: Any) -> None:
    """Remember ``entry`` for a verified token, dropping the oldest once ``VERIFIED_TOKENS_KEPT`` are held."""
    if len(memory) >= VERIFIED_TOKENS_KEPT:
        del memory[next(iter(memory))]
    memory[token] = entry


def _only(exc: BaseException, kind: type[BaseException]) -> bool:
    """``exc`` is ``kind``, or a group (anyio's task groups) of nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only(inner, kind) for inner in exc.exceptions)
    return isinstance(exc, kind)


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
        self._admission = Admission(
            max_sessions=settings.max_sessions,
            max_legacy_sessions=settings.max_legacy_sessions,
            idle_timeout=settings.session_idle_timeout,
            rate=settings.new_session_rate,
            burst=settings.new_session_burst,
        )
        self._counts.watch(self._admission)
        self._live = self._admission.live
        # Several worker processes per machine: which one owns a session (fly_replay_router.affinity.workers).
        self.workers = WorkerChannel(worker_socket_dir(settings), serve=self, lazy=settings.workers > 1)
        # Whether the first session minted here opens the hand-over channel (``minting``).
        self.lazy_channel = self.workers.lazy
        self._served_by_values: dict[tuple[str, str], bytes] = {}
        # Tokens verified for this worker: token -> (inner id, expiry on the monotonic clock, worker
        # tag, affinity-served-by for a direct request, its session in the budget or None). Bounded as
        # the codec's own memory of verified tokens.
        self._served_here: dict[bytes, tuple[bytes, float, str, bytes, Live | None]] = {}
        # Tokens verified on this worker for a sibling worker's session: token -> (expiry on the
        # monotonic clock, the owner worker's tag). Bounded the same way.
        self._elsewhere: dict[bytes, tuple[float, str]] = {}

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
        carriers = 0
        chunked = routing = False
        # Where the Mcp-Session-Id header is, to put the inner id in its place: counted here, since a
        # search of the list afterwards costs more than the count.
        position = header_at = -1
        # One pass over the headers; most names are none of these, and one set lookup says so.
        for name, value in headers:
            position += 1
            if name not in _READ_HEADERS:
                continue
            if name == MCP_SESSION_ID:
                carriers += 1
                token = value
                header_at = position
            elif name == MCP_PROTOCOL_VERSION:
                if version is None:
                    version = value
            elif name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = True
            else:
                routing = True
        query_carrier: QueryCarrier | None = None
        if scope["query_string"]:
            try:
                query_carrier = find_query_carrier(scope["query_string"])
            except AmbiguousCarrier:
                carriers = 2
            else:
                carriers += query_carrier is not None

        served: bytes | None = None  # the inner id of a session served here
        counted: Live | None = None  # ... and its session in the budget, which this request keeps live
        if not carriers:
            method = scope["method"]
            admitted = False
            if (method == "POST" or method == "GET") and (
                version is None or version in _HANDSHAKE_VERSIONS or method == "GET"
            ):
                # A request that may open a session: admitted before the server sees it (the cheap
                # refusal), and again when the server's answer shows it did (``rewrite``).
                refusal = self._admission.refusal(
                    client=client_key(scope),
                    legacy=method == "GET",
                    hops=full_hops(replay_state(headers)) if routing else 0,
                    replayable=body_replayable(length, chunked),
                    now=time.monotonic(),
                )
                if refusal is not None:
                    await self.refuse(scope, send, refusal)
                    return
                admitted = True
            # Sessionless (2026-07-28 and later) and everything else: passed on, and watched all the
            # same, since only the server's answer tells whether it minted a session after all.
            self._counts.passed += 1
            # affinity-served-by only if the answer turns out to belong to a session (Watcher asks).
            watcher = Watcher(scope, send, self, None, None, admitted, None)
        elif carriers > 1:
            self._reject(scope, "ambiguous_carrier", None)
            await send_not_found(send)
            return
        else:
            # A token this worker served before and not yet expired: its inner id at once; one it
            # handed to a sibling worker: handed over again at once, unless the request did not come
            # straight from Fly's proxy. Anything else (a first sight, another owner, an expiry
            # passed, a hop) takes the whole decision (``_decide``).
            now = time.monotonic()
            here = self._served_here.get(token) if query_carrier is None else None  # type: ignore[arg-type]
            if here is not None and here[1] > now and here[2] is self.workers.tag:
                served = here[0]
                served_by = here[3] if not routing else self._served_by(headers, routing)
                counted = here[4]
            elif here is None and not routing and (there := self._elsewhere.get(token)) and there[0] > now:  # type: ignore[arg-type]
                # A sibling worker's session, in a request straight from Fly's proxy: handed over at once.
                await self._hand_over(scope, receive, send, there[1])
                return
            else:
                served = await self._decide(scope, receive, send, token, query_carrier, length, chunked, routing, now)
                if served is None:
                    return
                served_by = self._served_by(headers, routing)
                # A legacy message post names its session in the query; the session counts by its stream.
                counted = self._live.get(served) if query_carrier is None else None
            self._counts.served += 1
            scope = dict(scope)
            if query_carrier is None:
                scope["headers"] = rewritten = list(headers)
                rewritten[header_at] = (MCP_SESSION_ID, served)
                carried: bytes = token  # type: ignore[assignment]
                if counted is not None:
                    counted.start()
            else:
                scope["query_string"] = query_carrier.replaced(scope["query_string"], served)
                carried = query_carrier.value.encode("ascii")  # a token that verified is ASCII
            watcher = Watcher(scope, send, self, served, carried, False, served_by, query_carrier is None)
        try:
            await self.app(scope, receive, watcher.send)
        except Exception as exc:
            if not self._absorbed(scope, watcher, exc):
                raise
        finally:
            if counted is not None:
                counted.finish(time.monotonic())
            if watcher.settle:
                await self._settle(scope, watcher)

    async def _settle(self, scope: Scope, watcher: Watcher) -> None:
        """What an answer left to do once the app has returned: its legacy stream no longer counts, and
        the sessions the budget refused are ended in the server."""
        if getattr(watcher, "legacy_stream", False):
            self._live.legacy_streams -= 1
        for orphan in getattr(watcher, "orphans", None) or ():
            await end_orphan(self.app, scope, watcher.root_path, orphan)

    async def _decide(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        token: bytes | None,
        query_carrier: QueryCarrier | None,
        length: bytes | None,
        chunked: bool,
        routing: bool,
        monotonic_now: float,
    ) -> bytes | None:
        """The whole decision for a request that carries a session: the inner id to serve here, or None
        once the request was answered (404, replay, forward, hand-over)."""
        now = time.time()
        token_text = query_carrier.value if query_carrier is not None else (token or b"").decode("latin-1")
        replayable = body_replayable(length, chunked)
        decision = decide(
            token_text,
            machine_id=self.settings.machine_id,
            codec=self._codec,
            now=now,
            max_age=self.settings.max_token_age,
            arrival=arrival(scope["headers"], replayable) if routing else (SMALL_BODY if replayable else LARGE_BODY),
        )
        if isinstance(decision, Reject):
            self._reject(scope, decision.reason, decision.owner_machine_id)
            await send_not_found(send)
            return None
        if isinstance(decision, Replay):
            self._record(scope, "replayed", "", decision.owner_machine_id)
            await self._send_replay(send, decision.owner_machine_id)
            return None
        if isinstance(decision, Forward):
            await self._forward(scope, receive, send, decision.owner_machine_id)
            return None
        tag = self.workers.tag
        worker, _, inner_id = decision.inner_session_id.partition(WORKER_SEPARATOR)
        if worker != tag:
            # Another worker of this machine, or a token minted before workers were named.
            decided = decide_worker(decision.inner_session_id, this_worker=tag, handed_over=handed_over(scope))
            if isinstance(decided, HandOver) and query_carrier is None:
                # Remembered too: the next request of this session straight from Fly's proxy goes to
                # the owner without the decision (no inner id is kept: this worker serves none).
                entry = (self._expires(now, monotonic_now, token_text), decided.owner_worker)
                _keep(self._elsewhere, token, entry)  # type: ignore[arg-type]
            served_id = await self._other_worker(scope, receive, send, decided)
            if served_id is None:
                return None
            return served_id.encode("ascii")
        inner = inner_id.encode("ascii")
        if query_carrier is None:
            expires = self._expires(now, monotonic_now, token_text)
            here = (inner, expires, tag, self._served_by([], False), self._live.get(inner))
            _keep(self._served_here, token, here)  # type: ignore[arg-type]
        return inner

    def _expires(self, now: float, monotonic_now: float, token_text: str) -> float:
        """When a verified token stops being remembered, on this process's monotonic clock (a token
        only grows older)."""
        max_age = self.settings.max_token_age
        if max_age is None:
            return math.inf
        return monotonic_now + max_age - (now - self._codec.verify(token_text, now=now).issued_at)

    def _absorbed(self, scope: Scope, watcher: Watcher, exc: Exception) -> bool:
        """Whether the inner app's exception ends a refusal by design (else it propagates)."""
        if watcher.refused and _only(exc, LegacyRefused):
            return True  # the legacy stream the budget refused has ended, as for a client that left
        if (
            isinstance(exc, ValueError)
            and getattr(watcher, "complete", False)
            and getattr(watcher, "status", 0) == MISDIRECTED
        ):
            # The official SDK's legacy GET /sse answers a disallowed Host with 421, then raises
            # ValueError("Request validation failed"): a traceback per request, for a refusal
            # by design. Only that shape is absorbed (a complete 421, then ValueError).
            self._reject(scope, "host_not_allowed", None, count=False)
            return True
        return False

    @property
    def live(self) -> LiveSessions:
        """The sessions this process holds (the budget's count)."""
        return self._admission.live

    def admit(self, scope: Scope, *, legacy: bool, admitted: bool) -> Refusal | None:
        """Whether the session the server just minted may stay (``rewrite.Minting``)."""
        length: bytes | None = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = True
        return self._admission.refusal(
            client=client_key(scope),
            legacy=legacy,
            hops=full_hops(replay_state(scope["headers"])),
            replayable=body_replayable(length, chunked),
            now=time.monotonic(),
            rate=not admitted,
        )

    async def minting(self, scope: Scope) -> None:
        """The first session a worker mints opens its hand-over channel, if the lifespan did not and
        several workers are declared."""
        workers = self.workers
        if workers.lazy and not workers.serving:
            await workers.start(state=scope.get("state"), root=scope.get("app"))

    def served_by(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        """The ``affinity-served-by`` value for a request with these headers (``rewrite.Minting``)."""
        return self._served_by(headers, not _ARRIVAL_HEADERS.isdisjoint(name for name, _ in headers))

    def _served_by(self, headers: list[tuple[bytes, bytes]], routing: bool) -> bytes:
        """The ``affinity-served-by`` value: this machine and worker, and the hops that brought the request
        (``routing``: the headers say it did not come straight from Fly's proxy)."""
        tag = self.workers.tag
        via = arrived_via(headers) if routing else "direct"
        key = (tag, via)
        value = self._served_by_values.get(key)
        if value is None:
            value = f"machine={self.settings.machine_id};worker={tag};via={via}".encode("ascii")
            if len(self._served_by_values) < 64:
                self._served_by_values[key] = value
        return value

    async def aclose(self) -> None:
        """Close the connections kept open to other machines for forwarding."""
        await self._forwarder.aclose()

    def issue_token(self, inner_session_id: str) -> str:
        """A token for a session id the inner app minted on this machine."""
        inner = f"{self.workers.tag}{WORKER_SEPARATOR}{inner_session_id}"
        return self._codec.issue(self.settings.machine_id, inner, now=time.time())

    async def _send_replay(self, send: Send, owner: str) -> None:
        body = f"Session owned by machine {owner}: Fly's proxy replays this request there.\n"
        await send_replay(send, self.settings.replay_instruction(owner), body)

    def record_refusal(self, scope: Scope, refusal: Refusal) -> None:
        """Count and log a refused session that could not be answered (its legacy stream had started)."""
        self._reject(scope, "at_capacity" if isinstance(refusal, Elsewhere) else refusal.reason, None)

    async def refuse(self, scope: Scope, send: Send, refusal: Refusal) -> None:
        """Answer a request that may not open a session here now (see ``capacity.Admission``)."""
        if isinstance(refusal, Elsewhere):
            self._record(scope, "replayed", "at_capacity", None)
            body = "This machine holds all the sessions it can: Fly's proxy replays this request to another.\n"
            await send_replay(send, refusal.instruction(), body)
            return
        self._reject(scope, refusal.reason, None)
        await send_refusal(send, refusal)

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

    async def _other_worker(
        self, scope: Scope, receive: Receive, send: Send, decision: Serve | HandOver | Reject
    ) -> str | None:
        """The inner id to serve here, or None once the request was handed over or answered (503, 404)."""
        if isinstance(decision, Serve):
            return decision.inner_session_id
        if isinstance(decision, HandOver):
            await self._hand_over(scope, receive, send, decision.owner_worker)
            return None
        owner = f"{self.settings.machine_id}/-"
        self._reject(scope, decision.reason, owner)
        await send_not_found(send)
        return None

    async def _hand_over(self, scope: Scope, receive: Receive, send: Send, worker: str) -> None:
        """Hand the request to the sibling ``worker`` and its answer back; or answer 503 (it is busy) or
        404 (it is gone)."""
        owner = f"{self.settings.machine_id}/{worker}"
        started = time.perf_counter()
        outcome = await self.workers.hand_over(
            scope, receive, send, worker, busy_timeout=self.settings.worker_busy_timeout
        )
        if outcome is Outcome.ANSWERED:
            self._counts.handover(time.perf_counter() - started)
            self._record(scope, "handed_over", "", owner)
            return
        if outcome is Outcome.BUSY:
            # The owner is alive and holds the session: the client keeps it and tries again.
            self._reject(scope, "worker_busy", owner)
            await send_forward_failure(send, 503)
            return
        self._reject(scope, "worker_gone", owner)
        await send_not_found(send)

    def _record(self, scope: Scope, outcome: str, reason: str, owner: str | None) -> None:
        """Count a decision that is not "served here" and log it as one line."""
        self._counts.add(outcome, reason)
        self._log.decision(scope, outcome, reason, owner)

    def _reject(self, scope: Scope, reason: str, owner: str | None, *, count: bool = True) -> None:
        if count:
            self._counts.add("rejected", reason)
        self._log.decision(scope, "rejected", reason, owner)
