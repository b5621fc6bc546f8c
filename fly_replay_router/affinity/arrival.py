"""How a request reached this machine, from the headers Fly's proxy (or a peer) set: ``Arrival``.

Reference: Fly "Dynamic request routing" (``fly-replay-src``, ``fly-replay-failed``,
``fly-preferred-instance-unavailable``: https://fly.io/docs/networking/dynamic-request-routing/).
"""

from __future__ import annotations

from fly_replay_router.affinity.decision import Arrival
from fly_replay_router.affinity.forward import FORWARDED_FROM
from fly_replay_router.affinity.frames import HANDED_OVER
from fly_replay_router.fly import (
    FLY_PREFERRED_INSTANCE_UNAVAILABLE,
    FLY_REPLAY_FAILED,
    FLY_REPLAY_SRC,
    parse_replay_src,
)

FLY_REPLAY_SRC_HEADER = FLY_REPLAY_SRC.encode("ascii")
_FLY_REPLAY_FAILED = FLY_REPLAY_FAILED.encode("ascii")
_FLY_PREFERRED_UNAVAILABLE = FLY_PREFERRED_INSTANCE_UNAVAILABLE.encode("ascii")
# Any of these on a request means it did not come straight from a client.
ROUTING_HEADERS = frozenset({FLY_REPLAY_SRC_HEADER, _FLY_REPLAY_FAILED, _FLY_PREFERRED_UNAVAILABLE, FORWARDED_FROM})
SMALL_BODY = Arrival()
LARGE_BODY = Arrival(body_replayable=False)


def arrival(headers: list[tuple[bytes, bytes]], body_replayable: bool) -> Arrival:
    """The ``Arrival`` that a request with these routing headers describes."""
    replayed_from: str | None = None
    forwarded_from: str | None = None
    replay_failed = preferred_unavailable = False
    for name, value in headers:
        if name == FLY_REPLAY_SRC_HEADER:
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


def replay_state(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The ``state`` a replay carried back in ``fly-replay-src``, if any."""
    for name, value in headers:
        if name == FLY_REPLAY_SRC_HEADER:
            return parse_replay_src(value.decode("latin-1")).state
    return None


def arrived_via(headers: list[tuple[bytes, bytes]]) -> str:
    """The hops that brought a request here, for ``affinity-served-by``: ``replay``, ``forward``,
    ``handover`` in the order they happen, joined by ``+``; ``direct`` when none (a request Fly's
    replay cache sent straight to its owner included: it carries no ``fly-replay-src``)."""
    replayed = forwarded = handed = False
    for name, _ in headers:
        if name == FLY_REPLAY_SRC_HEADER:
            replayed = True
        elif name == FORWARDED_FROM:
            forwarded = True
        elif name == HANDED_OVER:
            handed = True
    hops = [hop for hop, present in (("replay", replayed), ("forward", forwarded), ("handover", handed)) if present]
    return "+".join(hops) or "direct"
