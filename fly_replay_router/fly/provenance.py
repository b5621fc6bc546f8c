"""What the proxy tells the replay target: ``fly-replay-src`` (who replayed) and ``fly-replay-failed`` (fallback).

Reference: "Dynamic request routing with fly-replay" (https://fly.io/docs/networking/dynamic-request-routing/).
Both parsers are lenient (any field order, fields missing) and never raise.
"""

from __future__ import annotations

from dataclasses import dataclass

from fly_replay_router.fly.fields import join_present, parse_fields
from fly_replay_router.fly.names import MAX_HEADER_VALUE


@dataclass(frozen=True, slots=True)
class ReplaySource:
    """``fly-replay-src``: which machine replayed the request to this one."""

    instance: str | None = None
    region: str | None = None
    t: int | None = None
    state: str | None = None

    def to_header(self) -> str:
        return join_present(instance=self.instance, region=self.region, t=self.t, state=self.state)


def parse_replay_src(value: str) -> ReplaySource:
    """Parse ``fly-replay-src`` in any field order, with fields missing. Never raises."""
    fields = parse_fields(value[:MAX_HEADER_VALUE])
    t = fields.get("t", "")
    return ReplaySource(
        instance=fields.get("instance") or None,
        region=fields.get("region") or None,
        t=int(t) if t.isascii() and t.isdigit() and len(t) <= 20 else None,
        state=fields.get("state"),
    )


@dataclass(frozen=True, slots=True)
class ReplayFailure:
    """``fly-replay-failed``: a replay whose target could not be reached, sent back by fallback."""

    instance: str | None = None
    app: str | None = None
    region: str | None = None
    replay_source: str | None = None
    reason: str | None = None
    elapsed_ms: int | None = None

    def to_header(self) -> str:
        return join_present(
            instance=self.instance,
            app=self.app,
            region=self.region,
            replay_source=self.replay_source,
            reason=self.reason,
            elapsed_ms=self.elapsed_ms,
        )


def parse_replay_failed(value: str) -> ReplayFailure:
    """Parse ``fly-replay-failed`` leniently. Never raises."""
    fields = parse_fields(value[:MAX_HEADER_VALUE])
    elapsed = fields.get("elapsed_ms", "")
    return ReplayFailure(
        instance=fields.get("instance") or None,
        app=fields.get("app") or None,
        region=fields.get("region") or None,
        replay_source=fields.get("replay_source") or None,
        reason=fields.get("reason") or None,
        elapsed_ms=int(elapsed) if elapsed.isascii() and elapsed.isdigit() and len(elapsed) <= 12 else None,
    )
