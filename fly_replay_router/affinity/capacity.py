"""Sessions as a budget: how many this process holds, and who may open new ones.

The budget counts what the inner server holds, learnt from its answers (``rewrite`` reports them):

- ``LiveSessions`` counts the handshake-era sessions this process minted and still holds. A session
  counts from an answer under 400 that minted it (a response ``Mcp-Session-Id`` the request did not
  carry) until the server ends it: a ``DELETE`` it answered 2xx, or its own 404 "Session not found",
  both on the path the session was minted on (its MCP endpoint), or ``idle_timeout`` seconds without
  a request (the SDK's own idle reaping, given the same timeout; the count lets it go at most
  ``PLACE_STEP`` later). A request in flight (an open event stream) keeps its session live however
  long it lasts. Nothing else changes the count: a 404 from
  another route, or a request for a session this process did not mint, leaves it as it is.
- Legacy HTTP+SSE sessions live exactly as long as the stream whose ``endpoint`` event named them,
  which the layer sees pass and end: ``legacy_streams``.
- ``NewSessionLimiter`` is a token bucket per client: one client cannot open sessions faster than
  ``rate`` per second beyond a ``burst``. ``client_key`` says who the client is.

Reference: Fly "Request headers" (``Fly-Client-IP``: https://fly.io/docs/networking/request-headers/);
MCP "Transports", session management (an idle session may be ended by the server at any time,
https://modelcontextprotocol.io/specification/2025-11-25/basic/transports).
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from dataclasses import dataclass

from fly_replay_router.asgi import Scope
from fly_replay_router.fly import FLY_CLIENT_IP, ReplayInstruction, ascii_decimal

_FLY_CLIENT_IP = FLY_CLIENT_IP.encode("ascii")
# The longest textual IP address (an IPv6 address with an embedded IPv4 one) is 45 characters.
_MAX_ADDRESS_TEXT = 45
# Clients whose address Fly's proxy did not give (callers on the private network) share one bucket.
UNATTRIBUTED = b"-"


# How far a session's place in the idle order may lag its last request (seconds): a request moves its
# session to the end of the order only when this much has passed since it was last moved, so most
# requests change two fields and no dictionary. An idle session is dropped at most this much late.
PLACE_STEP = 1.0


class Live:
    """One session this process holds: its requests in flight, when it was last seen, where it lives.

    A request of the session calls ``start`` when it reaches the server and ``finish`` when the app
    returns (``LiveSessions.get`` gives the session; a session dropped meanwhile is no longer counted,
    and its record changes nothing).
    """

    __slots__ = ("_sessions", "in_flight", "inner", "last_seen", "path", "placed")

    def __init__(self, sessions: OrderedDict[bytes, Live], inner: bytes, path: str, now: float) -> None:
        self._sessions = sessions
        self.inner = inner
        self.path = path
        self.in_flight = 0
        self.last_seen = now
        # When it took its place at the end of the order: places only grow from front to end.
        self.placed = now

    def start(self) -> None:
        """A request of this session has reached the server."""
        self.in_flight += 1

    def finish(self, now: float) -> None:
        """The request ``start`` counted has ended at ``now``."""
        self.in_flight -= 1
        self.last_seen = now
        if now - self.placed > PLACE_STEP:
            self._move_to_end(now)

    def _move_to_end(self, now: float) -> None:
        if self._sessions.get(self.inner) is self:
            self._sessions.move_to_end(self.inner)
        self.placed = now


class LiveSessions:
    """The sessions this process minted and still holds, for the cap (see the module docstring).

    Sessions are kept in the order of their ``placed`` time, which lags their last request by at most
    ``PLACE_STEP`` (``Live``): ``count`` looks at the front only, so it drops idle sessions in time
    proportional to what it drops, at most ``PLACE_STEP`` seconds after their idle timeout.
    """

    __slots__ = ("_sessions", "idle_timeout", "legacy_streams")

    def __init__(self, idle_timeout: float) -> None:
        self.idle_timeout = idle_timeout
        self._sessions: OrderedDict[bytes, Live] = OrderedDict()
        self.legacy_streams = 0

    def minted(self, inner: bytes, path: str, now: float) -> None:
        """The inner server minted session ``inner`` at ``path`` (its MCP endpoint), answering under 400."""
        self._sessions.pop(inner, None)
        self._sessions[inner] = Live(self._sessions, inner, path, now)

    def get(self, inner: bytes) -> Live | None:
        """The session ``inner`` if it counts here (minted by this process, not ended or idled out)."""
        return self._sessions.get(inner)

    def ended(self, inner: bytes, path: str) -> None:
        """The server ended ``inner`` on ``path``: counted no more if that is where it was minted."""
        session = self._sessions.get(inner)
        if session is not None and session.path == path:
            del self._sessions[inner]

    def count(self, now: float) -> int:
        """Live handshake-era sessions at ``now``: idle ones are dropped first (oldest first, O(dropped))."""
        horizon = now - self.idle_timeout
        sessions = self._sessions
        while sessions:
            session = next(iter(sessions.values()))
            if session.placed + PLACE_STEP > horizon:
                break  # every later session was placed later, and seen no earlier than placed
            if session.in_flight > 0 or session.last_seen > horizon:
                # A held stream, or seen since it took its place: live, and looked at again later.
                sessions.move_to_end(session.inner)
                session.placed = now
                continue
            del sessions[session.inner]
        return len(sessions)


class NewSessionLimiter:
    """A token bucket per client key: ``burst`` sessions at once, then ``rate`` per second.

    At most ``max_clients`` buckets are kept, each keyed by at most 8 bytes (``client_key``); beyond
    that the least recently used is forgotten (a forgotten client starts again with a full bucket: the
    limit errs on the side of serving).
    """

    __slots__ = ("_buckets", "burst", "max_clients", "rate")

    def __init__(self, rate: float, burst: int, *, max_clients: int = 100_000) -> None:
        if not rate > 0 or burst < 1:
            raise ValueError("a new-session limit needs a positive rate and a burst of at least 1")
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self._buckets: OrderedDict[bytes, tuple[float, float]] = OrderedDict()

    def take(self, client: bytes, now: float) -> float:
        """Spend one token of ``client``'s bucket: 0.0 if it had one, else seconds until it will."""
        tokens, at = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            tokens -= 1.0
            wait = 0.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens, now)
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait


# A machine at its cap sends a new session elsewhere, counting hops in the replay's ``state``
# (echoed back in ``fly-replay-src``): after this many full machines, one clear 503.
MAX_FULL_HOPS = 3
FULL_STATE_PREFIX = "full-"
# How long a client is asked to wait when every machine it reached is full: sessions free up as
# their clients end them or go idle.
FULL_RETRY_AFTER_SECONDS = 30


@dataclass(frozen=True, slots=True)
class RateLimited:
    """This client opens sessions too fast: 429 with ``Retry-After``."""

    retry_after: int
    status = 429
    reason = "rate_limited"
    message = "Too many new sessions from this client; retry later"


@dataclass(frozen=True, slots=True)
class Elsewhere:
    """This process is at its cap: replay the new session to another machine (``elsewhere=true``)."""

    hops: int

    def instruction(self) -> ReplayInstruction:
        """``elsewhere=true;state=full-<hops>``: any other machine, and how many were full so far."""
        return ReplayInstruction(elsewhere=True, state=f"{FULL_STATE_PREFIX}{self.hops}")


@dataclass(frozen=True, slots=True)
class Full:
    """This process and the machines tried before it are at their caps: 503 with ``Retry-After``."""

    retry_after: int = FULL_RETRY_AFTER_SECONDS
    status = 503
    reason = "at_capacity"
    message = "Every machine tried holds all the sessions it can; retry later"


Refusal = RateLimited | Elsewhere | Full


class Admission:
    """Whether a request that would open a session may: the client's rate, then this process's caps."""

    __slots__ = ("limiter", "live", "max_legacy_sessions", "max_sessions")

    def __init__(
        self,
        *,
        max_sessions: int | None,
        max_legacy_sessions: int | None,
        idle_timeout: float,
        rate: float | None,
        burst: int,
    ) -> None:
        self.live = LiveSessions(idle_timeout)
        self.limiter = NewSessionLimiter(rate, burst) if rate is not None else None
        self.max_sessions = max_sessions
        self.max_legacy_sessions = max_legacy_sessions

    def refusal(
        self, *, client: bytes, legacy: bool, hops: int, replayable: bool, now: float, rate: bool = True
    ) -> Refusal | None:
        """None to let the request open a session; else how to refuse it.

        ``legacy``: a legacy SSE session (else a handshake-era Streamable HTTP one).
        ``hops``: full machines this request was already sent away from (``full_hops``).
        ``replayable``: Fly can replay the body (else a full machine cannot send it elsewhere).
        ``rate``: spend one of the client's tokens (False when this request already spent one).
        """
        if rate and self.limiter is not None:
            wait = self.limiter.take(client, now)
            if wait > 0:
                return RateLimited(max(1, math.ceil(wait)))
        if legacy:
            full = self.max_legacy_sessions is not None and self.live.legacy_streams >= self.max_legacy_sessions
        else:
            full = self.max_sessions is not None and self.live.count(now) >= self.max_sessions
        if not full:
            return None
        if hops + 1 >= MAX_FULL_HOPS or not replayable:
            return Full()
        return Elsewhere(hops + 1)


def client_key(scope: Scope) -> bytes:
    """Who opens a session, as Fly's proxy sees clients: the ``Fly-Client-IP`` it sets, as packed bytes.

    An IPv6 client is its /64 (one subscriber's network, RFC 6177), an IPv4 client its address. The
    key is at most 8 bytes, whatever the header holds. ``X-Forwarded-For`` and the connection's peer
    are never used: a client may send the first, and behind Fly's proxy the second is the proxy.
    Without a valid ``Fly-Client-IP`` (a caller on the private network) the key is ``UNATTRIBUTED``,
    one bucket shared by all such callers.
    """
    for name, value in scope["headers"]:
        if name == _FLY_CLIENT_IP:
            return _address_key(value)
    return UNATTRIBUTED


def _address_key(value: bytes) -> bytes:
    if len(value) > _MAX_ADDRESS_TEXT or not value.isascii():
        return UNATTRIBUTED
    try:
        address = ipaddress.ip_address(value.decode("ascii").strip())
    except ValueError:
        return UNATTRIBUTED
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        return mapped.packed if mapped is not None else address.packed[:8]
    return address.packed


def full_hops(replay_state: str | None) -> int:
    """Full machines a request was sent away from, from the ``state`` of its ``fly-replay-src``."""
    if replay_state is None or not replay_state.startswith(FULL_STATE_PREFIX):
        return 0
    count = ascii_decimal(replay_state[len(FULL_STATE_PREFIX) :], max_digits=2)
    return MAX_FULL_HOPS if count is None else count
