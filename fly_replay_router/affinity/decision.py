"""The routing decision for one request that carries a session token: a pure function, no I/O.

The rules (``docs/how-it-is-built.md``, "Routing rules", explains them to users):

1. A token that does not verify (malformed, too long, forged, another app, retired key, expired)
   is rejected: the request gets 404, the MCP signal to start a new session.
2. The owner is this machine: serve the request here, with the inner session id restored.
3. The owner is another machine, but Fly already tried to reach it (``fly-replay-failed``,
   ``fly-preferred-instance-unavailable``), or the request was already replayed once
   (``fly-replay-src``) or forwarded once by a peer: reject. A second hop could loop; the owner is
   gone or unreachable.
4. The owner is another machine and Fly cannot replay the body (over 1 MiB, or of unknown length):
   forward it to the owner over the private network.
5. Otherwise replay to the owner. Only a verified token can name a replay or forward target.

Reject reasons are stable codes (logs, metrics): the token's own (see ``InvalidToken``), then
``owner_unreachable``, ``owner_unavailable``, ``already_replayed``, ``already_forwarded``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fly_replay_router.affinity.token import InvalidToken, TokenCodec


@dataclass(frozen=True, slots=True)
class Arrival:
    """How the request reached this machine, as Fly's proxy (or a peer) reports it in headers."""

    replayed_from: str | None = None
    """``fly-replay-src`` was present: the machine that replayed it ("" if the header names none)."""
    replay_failed: bool = False
    """``fly-replay-failed`` was present: a replay's target could not be reached (fallback)."""
    preferred_unavailable: bool = False
    """``fly-preferred-instance-unavailable`` was present: a preferred machine could not take it."""
    forwarded_from: str | None = None
    """A peer's affinity layer forwarded it here (its machine id)."""
    body_replayable: bool = True
    """Fly can replay the body: a known length of at most 1 MiB."""


DIRECT = Arrival()


@dataclass(frozen=True, slots=True)
class Serve:
    """This machine owns the session: pass the request on with the inner id restored."""

    inner_session_id: str


@dataclass(frozen=True, slots=True)
class Replay:
    """Another machine owns the session: answer with ``fly-replay`` naming it."""

    owner_machine_id: str


@dataclass(frozen=True, slots=True)
class Forward:
    """Another machine owns the session and Fly cannot replay the body: send it there ourselves."""

    owner_machine_id: str


@dataclass(frozen=True, slots=True)
class Reject:
    """The session cannot be served: answer 404. ``reason`` is a stable code."""

    reason: str
    owner_machine_id: str | None = None


Decision = Serve | Replay | Forward | Reject

# Serve decisions already made, by inner id: a frozen dataclass costs more to build than the rest of a
# decision for a token seen before, and equal decisions are interchangeable. Bounded as the codec's
# memory of verified tokens is.
_SERVE_DECISIONS_KEPT = 10_000
_serve_decisions: dict[str, Serve] = {}


def _serve(inner_session_id: str) -> Serve:
    """A new Serve decision, remembered."""
    if len(_serve_decisions) >= _SERVE_DECISIONS_KEPT:
        del _serve_decisions[next(iter(_serve_decisions))]  # the oldest entry
    decision = _serve_decisions[inner_session_id] = Serve(inner_session_id)
    return decision


def decide(
    token: str,
    *,
    machine_id: str,
    codec: TokenCodec,
    now: float,
    max_age: float | None = None,
    arrival: Arrival = DIRECT,
) -> Decision:
    """Decide what to do with a request carrying ``token`` that reached ``machine_id``."""
    try:
        session = codec.verify(token, now=now, max_age=max_age)
    except InvalidToken as exc:
        return Reject(exc.reason)
    owner = session.owner_machine_id
    if owner == machine_id:
        return _serve_decisions.get(session.inner_session_id) or _serve(session.inner_session_id)
    if arrival.replay_failed:
        return Reject("owner_unreachable", owner)
    if arrival.preferred_unavailable:
        return Reject("owner_unavailable", owner)
    if arrival.replayed_from is not None:
        return Reject("already_replayed", owner)
    if arrival.forwarded_from is not None:
        return Reject("already_forwarded", owner)
    if not arrival.body_replayable:
        return Forward(owner)
    return Replay(owner)
