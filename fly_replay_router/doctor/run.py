"""The doctor's run: every check against one MCP endpoint, in the order their answers depend on.

The first ``initialize`` decides reachable, Host and handshake; without a sealed session the
session checks are unknown. The event-stream check waits for a keep-alive (up to ``stream_wait``
seconds), so it runs beside the others. Only the doctor's own sessions are touched, and each ends
with ``DELETE``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from fly_replay_router.doctor.bodies import check_large_bodies
from fly_replay_router.doctor.handshake import judge_first_contact
from fly_replay_router.doctor.metrics import check_metrics_private
from fly_replay_router.doctor.refusals import check_refusals
from fly_replay_router.doctor.replays import judge_headers, judge_replays
from fly_replay_router.doctor.results import CheckResult, unknown
from fly_replay_router.doctor.sticking import judge_sticking, run_sessions
from fly_replay_router.doctor.streams import KEEPALIVE_LIMIT, judge_event_streams, watch_event_stream
from fly_replay_router.doctor.wire import Endpoint

Progress = Callable[[str], None]
SESSION_CHECKS = ("sessions_stick", "replays", "headers_survive_replay", "large_bodies", "event_streams", "refusals")


@dataclass(frozen=True, slots=True)
class DoctorOptions:
    """What to check and how hard: ``sessions`` x ``requests``, up to ``large_attempts`` large bodies."""

    url: str
    headers: tuple[tuple[str, str], ...] = ()
    sessions: int = 4
    requests: int = 6
    large_attempts: int = 8
    stream_wait: float = KEEPALIVE_LIMIT + 5
    timeout: float = 30.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"{self.url!r} is not an http(s) URL of an MCP endpoint, such as https://<app>.fly.dev/mcp"
            )
        if not 1 <= self.sessions <= 100 or not 1 <= self.requests <= 1000:
            raise ValueError("--sessions must be 1 to 100 and --requests 1 to 1000")

    @property
    def host(self) -> str:
        """The ``Host`` the doctor sends: the user's ``Host`` header, else the URL's."""
        for name, value in self.headers:
            if name.lower() == "host":
                return value
        return urlsplit(self.url).netloc


async def diagnose(options: DoctorOptions, progress: Progress = lambda _text: None) -> list[CheckResult]:
    """Run every check against ``options.url``; the results in a fixed order, one per check."""
    endpoint = Endpoint(options.url, list(options.headers), timeout=options.timeout)
    try:
        return await _diagnose(endpoint, options, progress)
    finally:
        await endpoint.aclose()


async def _diagnose(endpoint: Endpoint, options: DoctorOptions, progress: Progress) -> list[CheckResult]:
    progress("reachable, Host, handshake: initialize")
    first = await endpoint.initialize()
    contact = judge_first_contact(first, options.host)
    if contact.token is not None:
        await endpoint.delete(contact.token)
    results = list(contact.results)
    if not contact.usable:
        results += [unknown(name, "not checked: no sealed session could be opened") for name in SESSION_CHECKS]
        if first.status is not None:
            progress("metrics private: GET /metrics")
            results.append(await check_metrics_private(endpoint))
        else:
            results.append(unknown("metrics_private", "not checked: the endpoint is not reachable"))
        return results

    answered = [first]
    streams = asyncio.create_task(watch_event_stream(endpoint, options.stream_wait))
    try:
        progress(f"sessions stick: {options.sessions} sessions x {options.requests} requests")
        runs = await run_sessions(endpoint, options.sessions, options.requests)
        answered += [run.opening for run in runs] + [exchange for run in runs for exchange in run.requests]
        results.append(judge_sticking(runs))
        results.append(judge_replays(runs))
        results.append(judge_headers(runs, [name for name, _ in options.headers if name.lower() != "host"]))
        progress("large bodies: requests over 1 MiB")
        results.append(await check_large_bodies(endpoint, options.large_attempts))
        progress(f"event streams: waiting up to {options.stream_wait:g} s for a keep-alive")
        stream_opening, stream = await streams
    finally:
        streams.cancel()
    if stream_opening is not None:
        answered.append(stream_opening)
    results.append(judge_event_streams(answered, stream, options.stream_wait))
    progress("refusals: forged, foreign, ended tokens; a 2026-07-28 request")
    results.append(await check_refusals(endpoint))
    progress("metrics private: GET /metrics")
    results.append(await check_metrics_private(endpoint))
    return results
