"""The edge's counters, recent events and routing trail: ``GET /_edge/status`` and the live page's feed.

Everything here is cheap on the proxy's hot path (a counter, a tuple appended to a bounded deque)
and does its work when a document is built, a few times a second at most: requests per second per
machine (and replays each machine answered per second) come from counter samples taken then, not
from per-request bookkeeping.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

from fly_replay_router.edge.fleet import Fleet
from fly_replay_router.edge.sessions import SessionBook

# The page shows the last routing events; 500 kept covers several refreshes at 1,000 requests/s
# even though only the newest are sent.
ROUTE_TRAIL = 500
# Requests per second are measured over about this many seconds.
RATE_WINDOW = 2.0


@dataclass(frozen=True, slots=True)
class EdgeEvent:
    """One thing worth showing: a replay, a fallback, an error, a machine state change."""

    at: float
    kind: str
    detail: str


# (seq, at, method, path, hops, status, cache_hit, error): hops[0] is the machine the request
# landed on, hops[1:] the replay targets in order, hops[-1] the one that served it unless the edge
# answered itself (``error`` then holds its code). A plain tuple: one allocation per request.
RouteEvent = tuple[int, float, str, str, tuple[str, ...], int, bool, str | None]


@dataclass
class EdgeStatus:
    """Counters of one edge since it started."""

    requests: int = 0
    replays: int = 0
    replay_cache_hits: int = 0
    fallbacks: int = 0
    retries: int = 0
    autostarts: int = 0
    autostops: int = 0
    queued: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    events: deque[EdgeEvent] = field(default_factory=lambda: deque(maxlen=200))
    routes: deque[RouteEvent] = field(default_factory=lambda: deque(maxlen=ROUTE_TRAIL))
    route_seq: int = 0
    sessions: SessionBook = field(default_factory=SessionBook)
    _samples: deque[tuple[float, dict[str, tuple[int, int]]]] = field(default_factory=lambda: deque(maxlen=32))

    def record(self, kind: str, detail: str) -> None:
        """Keep an event for the live view (the last 200)."""
        self.events.append(EdgeEvent(time.time(), kind, detail))

    def error(self, code: str, detail: str) -> None:
        """Count an error under its code (``PA01``, ``upstream_timeout`` ...)."""
        self.errors[code] += 1
        self.record("error", f"{code}: {detail}")

    def route(
        self, method: str, path: str, hops: tuple[str, ...], status: int, cache_hit: bool, error: str | None = None
    ) -> None:
        """Keep one request's path through the fleet for the page (hot path: one tuple, one append)."""
        self.route_seq += 1
        self.routes.append((self.route_seq, time.time(), method, path, hops, status, cache_hit, error))

    def to_json(
        self,
        fleet: Fleet,
        *,
        app_name: str,
        region: str,
        routes_after: int | None = None,
        max_routes: int = 20,
        limits: tuple[int, int | None] | None = None,
    ) -> dict[str, object]:
        """The document ``GET /_edge/status`` returns, and each update of the live page.

        ``routes`` holds at most ``max_routes`` of the newest routing events, only those after
        ``routes_after`` when given; ``routes_skipped`` says how many newer-than-that were left out.
        ``limits`` (fly.toml's soft and hard concurrency limits) add each machine's ``load``.
        Reading only: machine state changes through the fleet's own loop and control requests.
        """
        rates = self._rates(fleet)
        machines = []
        for machine in fleet.machines.values():
            entry = machine.to_json(limits)
            entry["sessions"] = self.sessions.count(machine.id)
            entry["requests_per_second"], entry["replays_per_second"] = rates.get(machine.id, (0.0, 0.0))
            machines.append(entry)
        fresh = [r for r in self.routes if routes_after is None or r[0] > routes_after]
        return {
            "app": app_name,
            "region": region,
            "machines": machines,
            "requests": self.requests,
            "replays": self.replays,
            "replay_cache_hits": self.replay_cache_hits,
            "fallbacks": self.fallbacks,
            "retries": self.retries,
            "autostarts": self.autostarts,
            "autostops": self.autostops,
            "queued": self.queued,
            "errors": dict(self.errors),
            "recent_events": [
                {"at": event.at, "kind": event.kind, "detail": event.detail} for event in list(self.events)[-20:]
            ],
            "route_seq": self.route_seq,
            "routes": [_route_json(route) for route in fresh[-max_routes:]],
            "routes_skipped": max(0, len(fresh) - max_routes),
        }

    def _rates(self, fleet: Fleet) -> dict[str, tuple[float, float]]:
        """(requests, replays answered) per second per machine over the last ``RATE_WINDOW`` seconds."""
        now = time.monotonic()
        counts = {machine.id: (machine.requests, machine.replays_answered) for machine in fleet.machines.values()}
        if not self._samples or now - self._samples[-1][0] >= 0.2:
            self._samples.append((now, counts))
        base_time, base = self._samples[0]
        for sample_time, sample in self._samples:
            if now - sample_time < RATE_WINDOW:
                break
            base_time, base = sample_time, sample
        elapsed = now - base_time
        if elapsed < 0.2:
            return {}
        rates = {}
        for mid, (requests, replays) in counts.items():
            requests_before, replays_before = base.get(mid, (requests, replays))
            per_second = (requests - requests_before) / elapsed, (replays - replays_before) / elapsed
            rates[mid] = (round(per_second[0], 1), round(per_second[1], 1))
        return rates


def _route_json(route: RouteEvent) -> dict[str, object]:
    seq, at, method, path, hops, status, cache_hit, error = route
    return {
        "seq": seq,
        "at": at,
        "method": method,
        "path": path[:80],
        "landed": hops[0] if hops else None,
        "replayed_to": list(hops[1:]),
        "served_by": hops[-1] if hops and error is None else None,
        "status": status,
        "cache_hit": cache_hit,
        "error": error,
    }
