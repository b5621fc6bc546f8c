"""Sessions as a budget: how many this process holds, and who may open new ones.

- ``LiveSessions`` counts the handshake-era sessions this process minted and still holds: a session
  is live from the response that minted it until a ``DELETE`` ends it, the inner server answers 404
  for it, or it sees no request for ``idle_timeout`` seconds (the SDK's own idle reaping, which the
  layer cannot observe, uses the same timeout). A request in flight (an open event stream) keeps its
  session live however long it lasts. Legacy HTTP+SSE sessions live exactly as long as their
  ``GET /sse`` stream, which the layer sees open and close: ``legacy_streams``.
- ``NewSessionLimiter`` is a token bucket per client (``Fly-Client-IP``, which Fly's proxy sets and
  strips from client requests): one client cannot open sessions faster than ``rate`` per second
  beyond a ``burst``. It is consulted only for requests that carry no session.

Reference: Fly "Request headers" (``Fly-Client-IP``: https://fly.io/docs/networking/request-headers/);
MCP "Transports", session management (an idle session may be ended by the server at any time).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from fly_replay_router.asgi import Scope
from fly_replay_router.fly import FLY_CLIENT_IP, ReplayInstruction

_FLY_CLIENT_IP = FLY_CLIENT_IP.encode("ascii")


class LiveSessions:
    """The sessions this process minted and still holds, for the cap (see the module docstring)."""

    __slots__ = ("_in_flight", "_last_seen", "idle_timeout", "legacy_streams")

    def __init__(self, idle_timeout: float) -> None:
        self.idle_timeout = idle_timeout
        self._last_seen: OrderedDict[bytes, float] = OrderedDict()
        self._in_flight: dict[bytes, int] = {}
        self.legacy_streams = 0

    def seen(self, inner: bytes, now: float) -> None:
        """A request of session ``inner`` (minted or served) at ``now``."""
        self._last_seen[inner] = now
        self._last_seen.move_to_end(inner)

    def started(self, inner: bytes, now: float) -> None:
        """A request of ``inner`` arrived at ``now`` and is in flight (until ``finished``)."""
        last_seen = self._last_seen
        last_seen[inner] = now
        last_seen.move_to_end(inner)
        in_flight = self._in_flight
        in_flight[inner] = in_flight.get(inner, 0) + 1

    def finished(self, inner: bytes, now: float) -> None:
        """The request ``started`` for ``inner`` has ended; its session counts as active until now."""
        in_flight = self._in_flight
        left = in_flight.get(inner, 1) - 1
        if left:
            in_flight[inner] = left
        else:
            in_flight.pop(inner, None)
        last_seen = self._last_seen
        if inner in last_seen:
            last_seen[inner] = now
            last_seen.move_to_end(inner)

    def ended(self, inner: bytes) -> None:
        """The session is gone (``DELETE`` answered 2xx, or the inner server answered 404 for it)."""
        self._last_seen.pop(inner, None)

    def count(self, now: float) -> int:
        """Live handshake-era sessions at ``now``: idle ones are dropped first (oldest first, O(dropped))."""
        horizon = now - self.idle_timeout
        last_seen = self._last_seen
        while last_seen:
            inner, at = next(iter(last_seen.items()))
            if at > horizon:
                break
            if inner in self._in_flight:  # a held stream: still live, look again an idle timeout later
                self.seen(inner, now)
                if len(self._in_flight) >= len(last_seen):
                    break
                continue
            del last_seen[inner]
        return len(last_seen)


class NewSessionLimiter:
    """A token bucket per client key: ``burst`` sessions at once, then ``rate`` per second.

    At most ``max_clients`` buckets are kept; beyond that the least recently used is forgotten
    (a forgotten client starts again with a full bucket: the limit errs on the side of serving).
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

    def refusal(self, *, client: bytes, legacy: bool, hops: int, replayable: bool, now: float) -> Refusal | None:
        """None to let the request open a session; else how to refuse it.

        ``legacy``: a ``GET`` that may open a legacy SSE stream (else a ``POST`` that may initialize).
        ``hops``: full machines this request was already sent away from (``full_hops``).
        ``replayable``: Fly can replay the body (else a full machine cannot send it elsewhere).
        """
        if self.limiter is not None:
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
    """Who opens a session: ``Fly-Client-IP`` (set by Fly's proxy, never by the client), else the peer."""
    for name, value in scope["headers"]:
        if name == _FLY_CLIENT_IP:
            return value  # type: ignore[no-any-return]
    client = scope.get("client")
    return client[0].encode("latin-1") if client else b"-"


def full_hops(replay_state: str | None) -> int:
    """Full machines a request was sent away from, from the ``state`` of its ``fly-replay-src``."""
    if replay_state is None or not replay_state.startswith(FULL_STATE_PREFIX):
        return 0
    count = replay_state[len(FULL_STATE_PREFIX) :]
    return int(count) if count.isdigit() and len(count) < 3 else MAX_FULL_HOPS
