"""Sessions stick: N sessions of M requests each, every request answered by the process that opened its session.

Each session is what a client does: ``initialize``, ``notifications/initialized``, ``ping`` M times,
``DELETE``. The owner is the machine and worker that answered ``initialize`` (its
``affinity-served-by``); every later answer (the notification's and the pings') must come from the
same one.

Reference: MCP "Transports", session management
(https://modelcontextprotocol.io/specification/2025-11-25/basic/transports).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fly_replay_router.doctor.handshake import is_sealed
from fly_replay_router.doctor.results import CheckResult, failed, passed, status_counts, unknown
from fly_replay_router.doctor.served_by import ServedBy
from fly_replay_router.doctor.wire import Endpoint, Exchange


@dataclass
class SessionRun:
    """One session the doctor opened: its opening answer, its requests in order, and its end."""

    opening: Exchange
    requests: list[Exchange] = field(default_factory=list)
    closing: Exchange | None = None

    @property
    def token(self) -> str | None:
        token = self.opening.token
        return token if self.opening.ok and token is not None and is_sealed(token) else None

    @property
    def owner(self) -> ServedBy | None:
        return self.opening.served_by


async def open_session(endpoint: Endpoint) -> SessionRun:
    """``initialize`` then ``notifications/initialized``, as every client starts.

    The notification is the session's first request (the first one Fly may replay, and so the one a
    replay cache first learns the session from): it is ``requests[0]``.
    """
    run = SessionRun(await endpoint.initialize())
    if run.token is not None:
        run.requests.append(await endpoint.post("notifications/initialized", token=run.token, notification=True))
    return run


async def close_session(endpoint: Endpoint, run: SessionRun) -> None:
    """``DELETE`` the session, as a client does when it closes."""
    if run.token is not None:
        run.closing = await endpoint.delete(run.token)


async def run_sessions(endpoint: Endpoint, sessions: int, requests: int) -> list[SessionRun]:
    """``sessions`` sessions side by side, each sending ``requests`` pings one after another, then DELETE.

    Each session's ``requests`` are its ``notifications/initialized`` and then the pings.
    """

    async def one() -> SessionRun:
        run = await open_session(endpoint)
        if run.token is None:
            return run
        for _ in range(requests):
            run.requests.append(await endpoint.post("ping", token=run.token))
        await close_session(endpoint, run)
        return run

    return list(await asyncio.gather(*(one() for _ in range(sessions))))


def judge_sticking(runs: list[SessionRun]) -> CheckResult:
    """``sessions_stick``: every request of every session answered 2xx by its owner."""
    opened = [run for run in runs if run.token is not None]
    if not opened:
        statuses = status_counts([run.opening.describe() for run in runs])
        return failed(
            "sessions_stick",
            "no session could be opened",
            "initialize stopped answering with a sealed token after the first one",
            initialize_statuses=statuses,
        )
    if any(run.owner is None for run in opened):
        return unknown(
            "sessions_stick",
            "the answers carry no affinity-served-by header: the layer is older than the header, so who served "
            "each request cannot be seen",
            sessions=len(opened),
        )
    total = by_owner = 0
    elsewhere: list[str] = []
    answered: list[str] = []
    for run in opened:
        assert run.owner is not None
        for exchange in run.requests:
            total += 1
            answered.append(exchange.describe())
            served = exchange.served_by
            if exchange.ok and served is not None and served.owner == run.owner.owner:
                by_owner += 1
            elif exchange.ok:
                who = "a process that does not name itself" if served is None else f"{served.machine}/{served.worker}"
                elsewhere.append(f"{who} for {run.owner.machine}/{run.owner.worker}")
    owners = sorted({run.owner.machine for run in opened if run.owner is not None})
    evidence = {
        "sessions": len(opened),
        "requests": total,
        "answered_by_owner": by_owner,
        "statuses": status_counts(answered),
        "owner_machines": owners,
    }
    if by_owner == total:
        return passed(
            "sessions_stick",
            f"{total} of {total} requests in {len(opened)} sessions answered by their session's owner "
            f"({len(owners)} machine{'s' if len(owners) != 1 else ''} opened sessions)",
            **evidence,
        )
    not_found = sum(1 for exchange in _requests(opened) if exchange.status == 404)
    if not_found:
        return failed(
            "sessions_stick",
            f"{not_found} of {total} requests got 404 Session not found",
            "a machine could not open another machine's token: every machine must share one AFFINITY_SECRET "
            "(fly secrets set, once for the app, not per machine) and one FLY_APP_NAME",
            **evidence,
        )
    if elsewhere:
        return failed(
            "sessions_stick",
            f"{len(elsewhere)} of {total} requests answered by another process than the session's owner",
            "something routes around the layer: a proxy or balancer in front of Fly's, or a route the layer "
            "does not wrap",
            served_elsewhere=elsewhere[:5],
            **evidence,
        )
    return failed(
        "sessions_stick",
        f"{total - by_owner} of {total} requests were not answered 2xx",
        "the replay to the owner failed: the owner is stopped and cannot start, or Fly's proxy refused the replay "
        "(5xx; see fly logs for PA errors)",
        **evidence,
    )


def _requests(runs: list[SessionRun]) -> list[Exchange]:
    return [exchange for run in runs for exchange in run.requests]
