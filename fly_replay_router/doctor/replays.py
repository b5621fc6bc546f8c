"""Replays, read from the sessions the doctor ran: how many, what they cost, whether the replay cache is in use,
and whether the user's headers survive them.

A request that reached its owner by replay carries ``via=replay`` in ``affinity-served-by``. Fly's replay
cache sends later requests of a session straight to the owner (they arrive ``via=direct``, with no
``fly-replay-src``): a session whose first replay is followed only by direct answers is cached.
Fly documents that a replay resends "the whole request"; whether ``Authorization`` always survives is
not documented, so with ``--header`` the replayed answers are compared with the direct ones.

Reference: Fly "Dynamic request routing with fly-replay", replay caching
(https://fly.io/docs/networking/dynamic-request-routing/).
"""

from __future__ import annotations

from fly_replay_router.doctor.results import CheckResult, failed, milliseconds, passed, status_counts, unknown
from fly_replay_router.doctor.sticking import SessionRun
from fly_replay_router.doctor.wire import Exchange

# Fewer requests after a session's first replay than this tell nothing about the cache.
CACHE_EVIDENCE = 3


def _arrivals(runs: list[SessionRun]) -> dict[str, list[Exchange]]:
    by_via: dict[str, list[Exchange]] = {}
    for run in runs:
        for exchange in run.requests:
            served = exchange.served_by
            by_via.setdefault(served.via if served is not None else "unknown", []).append(exchange)
    return by_via


def replay_cache_state(runs: list[SessionRun]) -> tuple[str, int, int]:
    """``("in use" | "not in use" | "unknown", requests after a first replay, replays among them)``."""
    after = again = 0
    for run in runs:
        vias = [exchange.served_by.via if exchange.served_by else "" for exchange in run.requests]
        if "replay" not in vias:
            continue
        later = vias[vias.index("replay") + 1 :]
        after += len(later)
        again += later.count("replay")
    if after < CACHE_EVIDENCE:
        return "unknown", after, again
    return ("in use" if again == 0 else "not in use"), after, again


def judge_replays(runs: list[SessionRun]) -> CheckResult:
    """``replays``: how many requests were replayed, the median latency of replayed against direct, the cache."""
    by_via = _arrivals(runs)
    if "unknown" in by_via and len(by_via) == 1:
        return unknown("replays", "the answers carry no affinity-served-by header: replays cannot be told apart")
    replayed = by_via.get("replay", [])
    direct = by_via.get("direct", [])
    cache, after, again = replay_cache_state(runs)
    evidence = {
        "arrived": {via: len(exchanges) for via, exchanges in sorted(by_via.items())},
        "handed_over": sum(1 for run in runs for e in run.requests if e.served_by and "handover" in e.served_by.hops),
        "replayed_statuses": status_counts([exchange.describe() for exchange in replayed]),
        "median_ms_direct": milliseconds([exchange.seconds for exchange in direct if exchange.ok]),
        "median_ms_replayed": milliseconds([exchange.seconds for exchange in replayed if exchange.ok]),
        "replay_cache": cache,
        "requests_after_first_replay": after,
        "replayed_again": again,
    }
    if not replayed:
        owners = {run.owner.machine for run in runs if run.owner is not None}
        why = (
            "one machine opened every session: with one machine nothing is replayed (fly scale count 2 to check)"
            if len(owners) <= 1
            else "every request landed on its session's owner"
        )
        return unknown("replays", f"no request arrived by replay: {why}", **evidence)
    failures = [exchange for exchange in replayed if not exchange.ok]
    if failures:
        return failed(
            "replays",
            f"{len(failures)} of {len(replayed)} replayed requests were not answered 2xx",
            "the owner answered a replayed request with an error: see the owner's logs",
            **evidence,
        )
    replayed_ms = milliseconds([exchange.seconds for exchange in replayed if exchange.ok])
    direct_ms = milliseconds([exchange.seconds for exchange in direct if exchange.ok])
    cost = f" (median {replayed_ms} ms replayed, {direct_ms} ms direct)" if direct_ms is not None else ""
    return passed("replays", f"{len(replayed)} requests arrived by replay{cost}; replay cache {cache}", **evidence)


def judge_headers(runs: list[SessionRun], header_names: list[str]) -> CheckResult:
    """``headers_survive_replay``: with ``--header``, replayed requests are answered like direct ones."""
    if not header_names:
        return unknown(
            "headers_survive_replay",
            "no --header given: run with --header 'Authorization: Bearer ...' to check that credentials survive a "
            "replay",
        )
    by_via = _arrivals(runs)
    replayed = by_via.get("replay", [])
    direct = by_via.get("direct", [])
    evidence = {
        "headers": header_names,
        "direct_statuses": status_counts([exchange.describe() for exchange in direct]),
        "replayed_statuses": status_counts([exchange.describe() for exchange in replayed]),
    }
    if not replayed:
        return unknown(
            "headers_survive_replay", "no request arrived by replay, so none could lose a header", **evidence
        )
    refused = [exchange for exchange in replayed if exchange.status in (401, 403)]
    direct_refused = [exchange for exchange in direct if exchange.status in (401, 403)]
    if refused and not direct_refused:
        return failed(
            "headers_survive_replay",
            f"{len(refused)} of {len(replayed)} replayed requests got 401/403, no direct one did",
            f"Fly's proxy dropped {', '.join(header_names)} on the replay: do not use the replay JSON form's "
            "transform (it drops Authorization unless set again), and report it to Fly",
            **evidence,
        )
    if all(exchange.ok for exchange in replayed):
        return passed(
            "headers_survive_replay",
            f"{len(replayed)} replayed requests answered like the {len(direct)} direct ones",
            **evidence,
        )
    return failed(
        "headers_survive_replay",
        "replayed requests were answered differently from direct ones",
        "the owner treats a replayed request differently: compare the statuses and the owner's logs",
        **evidence,
    )
