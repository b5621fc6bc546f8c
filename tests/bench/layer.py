"""What the affinity layer costs: the same demo server with and without ``AffinityMiddleware``.

Every overhead figure comes from rounds in which both servers take the same load one after the
other (ABBA order, so that neither always goes first); each round gives a ratio, and the figure is
the median of the rounds' ratios: ``overhead_pct = (1 - with_layer / without_layer) * 100``, the
share of ``tools/call`` throughput the layer takes away.

Each round also records the server's CPU time per call (``/proc/<pid>/task/*/schedstat``; the
process's own CPU clock in-process). On a shared machine, time other processes take shows up in
throughput but not in CPU per call, so ``overhead_pct_by_cpu`` in the details is the steadier
estimate of the same quantity (a CPU-bound server's throughput is 1 / CPU per call).
"""

from __future__ import annotations

import contextlib
import cProfile
import functools
import hashlib
import io
import logging
import os
import pstats
import statistics
import time
import timeit
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from itsdangerous import Signer

from tests.bench import mcp_load
from tests.bench.processes import start_uvicorn
from tests.conftest import APP_NAME, SECRET

MACHINE_ID = "benc0000000001"
TOOL = "whoami"


@dataclass
class Rounds:
    """A baseline and a subject, measured in alternating rounds (one ``Sample`` each per round)."""

    baseline: list[mcp_load.Sample] = field(default_factory=list)
    subject: list[mcp_load.Sample] = field(default_factory=list)

    def ratios(self) -> list[float]:
        """Per round: subject throughput / baseline throughput."""
        pairs = zip(self.baseline, self.subject, strict=True)
        return [subject.per_second / baseline.per_second for baseline, subject in pairs]

    def cpu_ratios(self) -> list[float]:
        """Per round: the throughput ratio a CPU-bound server would have, baseline CPU/call over subject's."""
        pairs = zip(self.baseline, self.subject, strict=True)
        return [baseline.cpu_per_call / subject.cpu_per_call for baseline, subject in pairs]

    def ratio(self) -> float:
        return statistics.median(self.ratios())

    def overhead_pct(self) -> float:
        return (1 - self.ratio()) * 100

    def cpu_overhead_pct(self) -> float:
        return (1 - statistics.median(self.cpu_ratios())) * 100

    def detail(self) -> dict[str, object]:
        return {
            "baseline_per_s": round(statistics.median(s.per_second for s in self.baseline), 1),
            "subject_per_s": round(statistics.median(s.per_second for s in self.subject), 1),
            "baseline_cpu_us_per_call": round(statistics.median(s.cpu_per_call for s in self.baseline) * 1e6, 1),
            "subject_cpu_us_per_call": round(statistics.median(s.cpu_per_call for s in self.subject) * 1e6, 1),
            "overhead_pct_by_cpu": round(self.cpu_overhead_pct(), 2),
            "rounds": len(self.baseline),
            "round_ratios": [round(value, 4) for value in self.ratios()],
            "round_cpu_ratios": [round(value, 4) for value in self.cpu_ratios()],
        }


Measure = Callable[[], Awaitable[mcp_load.Sample]]


async def alternate(baseline: Measure, subject: Measure, rounds: int) -> Rounds:
    """``rounds`` pairs of measurements, ABBA: B,S then S,B then B,S ..."""
    result = Rounds()
    for index in range(rounds):
        if index % 2 == 0:
            result.baseline.append(await baseline())
            result.subject.append(await subject())
        else:
            result.subject.append(await subject())
            result.baseline.append(await baseline())
    return result


@dataclass(frozen=True)
class Budget:
    """How long to measure: seconds per timed run, rounds per figure, concurrent clients."""

    seconds: float
    rounds: int
    clients: int = 8


def _set_machine_environment() -> None:
    # app.main reads its settings from the environment when it is imported (entry point rule).
    os.environ.setdefault("FLY_MACHINE_ID", MACHINE_ID)
    os.environ.setdefault("FLY_APP_NAME", APP_NAME)
    os.environ.setdefault("AFFINITY_SECRET", SECRET)


def _quiet_sdk_logs() -> None:
    # The SDK logs every request and session at info; under uvicorn (--log-level warning) it does not.
    logging.getLogger("mcp").setLevel(logging.WARNING)


def _this_process_cpu() -> float:
    return time.process_time()


@dataclass
class Paired:
    """Per-call times of a baseline and a subject, called alternately one call at a time."""

    baseline: list[float] = field(default_factory=list)
    subject: list[float] = field(default_factory=list)

    def overhead_pct(self) -> float:
        """Throughput lost, for calls made one after the other: 1 - the median of baseline/subject per pair.

        A pair's two calls are next to each other in time, so whatever slowed the machine down then
        slowed both.
        """
        ratios = [baseline / subject for baseline, subject in zip(self.baseline, self.subject, strict=True)]
        return (1 - statistics.median(ratios)) * 100

    def detail(self) -> dict[str, object]:
        return {
            "calls_each": len(self.baseline),
            "baseline_median_us": round(statistics.median(self.baseline) * 1e6, 1),
            "subject_median_us": round(statistics.median(self.subject) * 1e6, 1),
            "overhead_pct": round(self.overhead_pct(), 3),
        }


async def paired_calls(
    baseline: Callable[[int], Awaitable[object]], subject: Callable[[int], Awaitable[object]], count: int
) -> Paired:
    """``count`` calls of each, alternating call by call (and which goes first), each one timed."""
    result = Paired()
    clock = time.perf_counter
    for index in range(count):
        order = ((baseline, result.baseline), (subject, result.subject))
        for call, times in order if index % 2 == 0 else reversed(order):
            started = clock()
            await call(index + 10)
            times.append(clock() - started)
    return result


@dataclass
class InProcess:
    """The in-process figures: rounds of concurrent load, and call-by-call pairs."""

    handshake: Rounds
    modern: Rounds
    handshake_paired: Paired
    modern_paired: Paired
    profile: list[str]


async def inprocess_rounds(budget: Budget, paired_count: int, profile_seconds: float = 0) -> InProcess:
    """The demo app called as ASGI in this process, with and without the layer, in both protocol eras."""
    _set_machine_environment()
    from app import main
    from tests.bench import bare_app

    _quiet_sdk_logs()
    lifespan = mcp_load.Lifespan(bare_app.app)  # one MCP session manager serves both apps
    await lifespan.start()
    try:
        bare, layered = mcp_load.AsgiClient(bare_app.app), mcp_load.AsgiClient(main.app)
        sessions = {client: [await client.open_session() for _ in range(budget.clients)] for client in (bare, layered)}

        async def handshake_load(client: mcp_load.AsgiClient) -> mcp_load.Sample:
            calls = [functools.partial(client.call_tool, token, tool=TOOL) for token in sessions[client]]
            return await mcp_load.measure(calls, budget.seconds, _this_process_cpu)

        async def modern_load(client: mcp_load.AsgiClient) -> mcp_load.Sample:
            calls = [functools.partial(client.call_tool_modern, tool=TOOL)] * budget.clients
            return await mcp_load.measure(calls, budget.seconds, _this_process_cpu)

        assert await layered.call_tool(sessions[layered][0], 1, TOOL) == main.settings.machine_id
        await handshake_load(bare)
        await handshake_load(layered)
        handshake = await alternate(lambda: handshake_load(bare), lambda: handshake_load(layered), budget.rounds)
        modern = await alternate(lambda: modern_load(bare), lambda: modern_load(layered), budget.rounds)
        handshake_paired = await paired_calls(
            functools.partial(bare.call_tool, sessions[bare][0], tool=TOOL),
            functools.partial(layered.call_tool, sessions[layered][0], tool=TOOL),
            paired_count,
        )
        modern_paired = await paired_calls(
            functools.partial(bare.call_tool_modern, tool=TOOL),
            functools.partial(layered.call_tool_modern, tool=TOOL),
            paired_count,
        )
        rows = await _profile_layered_calls(layered, sessions[layered], profile_seconds) if profile_seconds else []
        return InProcess(handshake, modern, handshake_paired, modern_paired, rows)
    finally:
        await lifespan.stop()


@dataclass
class UnderUvicorn:
    """The uvicorn figures: rounds of concurrent load, and call-by-call latency pairs (one client)."""

    handshake: Rounds
    modern: Rounds
    handshake_paired: Paired
    modern_paired: Paired


async def _profile_layered_calls(client: mcp_load.AsgiClient, tokens: list[str], seconds: float) -> list[str]:
    """Where a handshake-era ``tools/call`` of the layered demo app spends its CPU time (cProfile)."""
    calls = [functools.partial(client.call_tool, token, tool=TOOL) for token in tokens]
    profiler = cProfile.Profile(time.thread_time)  # CPU time: waiting is not where time goes
    profiler.enable()
    count = int(await mcp_load.throughput(calls, seconds) * seconds)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    layer_rows = profile_rows(stats, max(count, 1), 12, only="fly_replay_router/affinity", by_cumulative=True)
    return [
        f"{count} tools/call in-process; per call:",
        *profile_rows(stats, max(count, 1), 12),
        "the layer's own functions, by cumulative time:",
        *layer_rows,
    ]


BARE_APP = "tests.bench.bare_app:app"


async def uvicorn_rounds(budget: Budget, paired_count: int, subject_app: str = "app.main:app") -> UnderUvicorn:
    """(handshake era, 2026-07-28): two uvicorn processes, ``tests.bench.bare_app`` and ``subject_app``.

    With ``subject_app=BARE_APP`` both sides are the same app (an A/A run): what it measures is the
    method's own noise, process against process.
    """
    with contextlib.ExitStack() as stack:
        bare = start_uvicorn(BARE_APP, MACHINE_ID)
        stack.callback(bare.stop)
        layered = start_uvicorn(subject_app, MACHINE_ID)
        stack.callback(layered.stop)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
            servers = {server.url + "/mcp": server for server in (bare, layered)}
            sessions = {url: [await mcp_load.open_session(http, url) for _ in range(budget.clients)] for url in servers}

            async def handshake_load(url: str) -> mcp_load.Sample:
                calls = [functools.partial(mcp_load.call_tool, http, url, token, tool=TOOL) for token in sessions[url]]
                pid = servers[url].process.pid
                return await mcp_load.measure(calls, budget.seconds, lambda: mcp_load.process_cpu_seconds(pid))

            async def modern_load(url: str) -> mcp_load.Sample:
                calls = [functools.partial(mcp_load.call_tool_modern, http, url, tool=TOOL)] * budget.clients
                pid = servers[url].process.pid
                return await mcp_load.measure(calls, budget.seconds, lambda: mcp_load.process_cpu_seconds(pid))

            bare_url, layered_url = bare.url + "/mcp", layered.url + "/mcp"
            token = sessions[layered_url][0]
            if subject_app != BARE_APP:
                assert token.startswith(MACHINE_ID + "."), "the layered server did not wrap its session id"
            assert await mcp_load.call_tool(http, layered_url, token, 1, TOOL) == MACHINE_ID
            # Warm both up (first-use imports, caches) before measuring.
            for url in (bare_url, layered_url):
                await handshake_load(url)
                await modern_load(url)
            handshake = await alternate(
                lambda: handshake_load(bare_url), lambda: handshake_load(layered_url), budget.rounds
            )
            modern = await alternate(lambda: modern_load(bare_url), lambda: modern_load(layered_url), budget.rounds)
            handshake_paired = await paired_calls(
                functools.partial(mcp_load.call_tool, http, bare_url, sessions[bare_url][0], tool=TOOL),
                functools.partial(mcp_load.call_tool, http, layered_url, sessions[layered_url][0], tool=TOOL),
                paired_count,
            )
            modern_paired = await paired_calls(
                functools.partial(mcp_load.call_tool_modern, http, bare_url, tool=TOOL),
                functools.partial(mcp_load.call_tool_modern, http, layered_url, tool=TOOL),
                paired_count,
            )
            return UnderUvicorn(handshake, modern, handshake_paired, modern_paired)
    raise AssertionError("unreachable")


# --- the routing decision and the middleware alone ----------------------------------------------------------


def decision_timing(number: int = 10_000, repeat: int = 7) -> dict[str, float]:
    """µs per call (best of ``repeat``) of ``decide`` for a local-owner token, and of its parts.

    ``decision_us`` is a session's usual request (its token verified before: the codec remembers
    it); ``decision_first_sight_us`` is the first request with a token (its seal is opened).
    """
    from fly_replay_router.affinity.decision import decide
    from fly_replay_router.affinity.token import TokenCodec

    codec = TokenCodec((SECRET,), app_name=APP_NAME)
    now = time.time()
    token = codec.issue(MACHINE_ID, uuid.uuid4().hex, now=now)

    def best(statement: Callable[[], object]) -> float:
        return min(timeit.repeat(statement, number=number, repeat=repeat)) / number * 1e6

    # The reference the performance notes quote: itsdangerous's own Signer.unsign of the same token.
    reference = Signer(SECRET, salt="reference", digest_method=hashlib.sha256)
    signed = reference.sign(token.rsplit(".", 1)[0])

    def first_sight() -> float:
        # A fresh codec and tokens it has never seen: every decision pays for opening the seal.
        fresh = TokenCodec((SECRET,), app_name=APP_NAME)
        tokens = [codec.issue(MACHINE_ID, uuid.uuid4().hex, now=now) for _ in range(2000)]
        started = time.perf_counter()
        for unseen in tokens:
            decide(unseen, machine_id=MACHINE_ID, codec=fresh, now=now)
        return (time.perf_counter() - started) / len(tokens) * 1e6

    return {
        "decision_us": best(lambda: decide(token, machine_id=MACHINE_ID, codec=codec, now=now)),
        "decision_first_sight_us": min(first_sight() for _ in range(repeat)),
        "verify_us": best(lambda: codec.verify(token, now=now)),
        "itsdangerous_unsign_us": best(lambda: reference.unsign(signed)),
        "issue_us": best(lambda: codec.issue(MACHINE_ID, "0123456789abcdef0123456789abcdef", now=now)),
    }


def _run_to_completion(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine that never suspends (a stub app behind the layer), without an event loop."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    coroutine.close()
    raise RuntimeError("the coroutine suspended; it needs an event loop")


# What the official SDK sends for a handshake-era ``tools/call`` (``mcp.server.streamable_http``): an
# event stream with the session's id, one ``message`` event, then the end of the body.
SDK_ANSWER_EVENT = (
    b'event: message\r\ndata: {"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text",'
    b'"text":"benc0000000001"}],"isError":false}}\r\n\r\n'
)


def sdk_like_answer(session: bytes | None) -> list[dict[str, Any]]:
    """The messages the SDK sends for one ``tools/call`` of session ``session`` (a new list each time)."""
    headers = [
        (b"cache-control", b"no-cache, no-transform"),
        (b"connection", b"keep-alive"),
        (b"content-type", b"text/event-stream; charset=utf-8"),
    ]
    if session is not None:
        headers.append((b"mcp-session-id", session))
    return [
        {"type": "http.response.start", "status": 200, "headers": headers},
        {"type": "http.response.body", "body": SDK_ANSWER_EVENT, "more_body": True},
        {"type": "http.response.body", "body": b"", "more_body": False},
    ]


def _middleware_request() -> tuple[Callable[[], None], Callable[[], None]]:
    """(through the layer, straight to the stub): one handshake-era request for a local session, the
    stub answering as the SDK does (``sdk_like_answer``)."""
    from fly_replay_router.affinity.middleware import AffinityMiddleware
    from fly_replay_router.settings import AffinitySettings

    async def stub(scope: Any, receive: Any, send: Any) -> None:
        session = None
        for name, value in scope["headers"]:
            if name == b"mcp-session-id":
                session = value
        for message in sdk_like_answer(session):
            await send(message)

    settings = AffinitySettings(machine_id=MACHINE_ID, secret_keys=(SECRET,), app_name=APP_NAME)
    layer = AffinityMiddleware(stub, settings=settings)
    inner = uuid.uuid4().hex.encode()
    token = layer.issue_token(inner.decode()).encode()
    layer.live.minted(inner, "/mcp", time.monotonic())

    fields = [
        ("host", "127.0.0.1:8000"),
        ("accept", "application/json, text/event-stream"),
        ("content-type", "application/json"),
        ("content-length", "80"),
        ("mcp-session-id", token.decode()),
        ("mcp-protocol-version", "2025-11-25"),
    ]

    def scope() -> dict[str, Any]:
        # New header objects per request, as a server gives them (their hashes not yet computed).
        headers = [(name.encode(), value.encode()) for name, value in fields]
        return {"type": "http", "method": "POST", "path": "/mcp", "query_string": b"", "headers": headers}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        return None

    return (lambda: _run_to_completion(layer(scope(), receive, send))), (
        lambda: _run_to_completion(stub(scope(), receive, send))
    )


def middleware_timing(number: int = 10_000, repeat: int = 7) -> float:
    """µs the layer adds to one handshake-era request for a local session (layer + stub - stub)."""
    through, direct = _middleware_request()
    with_layer = min(timeit.repeat(through, number=number, repeat=repeat)) / number
    without = min(timeit.repeat(direct, number=number, repeat=repeat)) / number
    return (with_layer - without) * 1e6


def profile(function: Callable[[], object], calls: int, top: int = 10) -> list[str]:
    """cProfile ``calls`` calls of ``function``: the top entries by own time, as table rows."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        function()
    profiler.disable()
    return profile_rows(pstats.Stats(profiler), calls, top)


def profile_rows(
    stats: pstats.Stats,
    calls: int,
    top: int,
    *,
    skip: tuple[str, ...] = (),
    only: str | None = None,
    by_cumulative: bool = False,
) -> list[str]:
    """``own µs/call  cumulative µs/call  share  function`` for the ``top`` functions by own time.

    Entries whose name contains one of ``skip`` (an event loop waiting for sockets) are left out of
    the rows and of the total the shares are of.
    """
    every: dict[tuple[str, int, str], tuple[int, int, float, float, object]] = stats.stats  # type: ignore[attr-defined]
    raw = {key: entry for key, entry in every.items() if not any(word in key[2] for word in skip)}
    total = sum(entry[2] for entry in raw.values()) or 1.0
    if only is not None:
        raw = {key: entry for key, entry in raw.items() if only in key[0]}
    column = 3 if by_cumulative else 2
    rows = []
    ranked = sorted(raw.items(), key=lambda item: -float(item[1][column]))[:top]  # type: ignore[arg-type]
    for (filename, line, name), (_, _, own, cumulative, _) in ranked:
        where = f"{_short(filename)}:{line}({name})" if line else name
        share = (cumulative if by_cumulative else own) / total * 100
        rows.append(f"{own / calls * 1e6:8.2f} µs {cumulative / calls * 1e6:8.2f} µs cum {share:5.1f} %  {where}")
    return rows


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/work/main/", "python3.11/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def decision_profiles(calls: int) -> dict[str, list[str]]:
    """Where the time of ``decide`` and of the middleware goes (cProfile, own time per call)."""
    from fly_replay_router.affinity.decision import decide
    from fly_replay_router.affinity.token import TokenCodec

    codec = TokenCodec((SECRET,), app_name=APP_NAME)
    now = time.time()
    token = codec.issue(MACHINE_ID, uuid.uuid4().hex, now=now)
    through, _ = _middleware_request()
    return {
        "decide": profile(lambda: decide(token, machine_id=MACHINE_ID, codec=codec, now=now), calls),
        "middleware": profile(through, calls),
    }
