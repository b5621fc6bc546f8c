"""The edge's counters and recent events, served as ``GET /_edge/status``.

One small object, so that a live view (a later page fed by SSE) can read the same numbers.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

from app.edge.fleet import Fleet


@dataclass(frozen=True, slots=True)
class EdgeEvent:
    """One thing worth showing: a replay, a fallback, an error, a machine state change."""

    at: float
    kind: str
    detail: str


@dataclass
class EdgeStatus:
    """Counters of one edge since it started."""

    requests: int = 0
    replays: int = 0
    replay_cache_hits: int = 0
    fallbacks: int = 0
    retries: int = 0
    autostarts: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    events: deque[EdgeEvent] = field(default_factory=lambda: deque(maxlen=200))

    def record(self, kind: str, detail: str) -> None:
        """Keep an event for the live view (the last 200)."""
        self.events.append(EdgeEvent(time.time(), kind, detail))

    def error(self, code: str, detail: str) -> None:
        """Count an error under its code (``PA01``, ``upstream_timeout`` ...)."""
        self.errors[code] += 1
        self.record("error", f"{code}: {detail}")

    def to_json(self, fleet: Fleet, *, app_name: str, region: str) -> dict[str, object]:
        """The document ``GET /_edge/status`` returns."""
        fleet.refresh()
        return {
            "app": app_name,
            "region": region,
            "machines": [machine.to_json() for machine in fleet.machines.values()],
            "requests": self.requests,
            "replays": self.replays,
            "replay_cache_hits": self.replay_cache_hits,
            "fallbacks": self.fallbacks,
            "retries": self.retries,
            "autostarts": self.autostarts,
            "errors": dict(self.errors),
            "recent_events": [
                {"at": event.at, "kind": event.kind, "detail": event.detail} for event in list(self.events)[-20:]
            ],
        }
