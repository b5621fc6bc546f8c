"""What the simulated Fly edge costs, and how many replays a session needs through it.

- Replays per session: ``python -m fly_replay_router.edge --machines 4`` (random first hop, as Fly's balancing
  looks to a session), 100 sessions of ``initialize``, ``notifications/initialized`` and 10
  ``tools/call`` of ``count`` (which also proves affinity: each session must count 1..10), once with
  a fly.toml replay cache rule on ``Mcp-Session-Id`` and ``AFFINITY_FAILOVER=cached``, once without.
  The figure is the edge's own ``replays`` counter (``/_edge/status``) per session.
- Throughput and first-event delay: the edge with one ``--backend``, a machine this benchmark
  started itself, against that same machine directly, in alternating rounds; no replay happens, so
  the figures are the proxy's own cost.
- Memory: the edge process's RSS (``/proc/<pid>/status``, the edge alone, not its machines) with
  1,000 legacy SSE streams open through it to 4 machines.
"""

from __future__ import annotations

import asyncio
import cProfile
import functools
import pstats
import socket
import statistics
import threading
import time
from collections.abc import Callable

import aiohttp
import uvloop

from tests.bench import mcp_load
from tests.bench.layer import Budget, Rounds, alternate, profile_rows
from tests.bench.processes import Process, edge_status, start_edge, start_uvicorn
from tests.conftest import SECRET

BACKEND_ID = "bed9e000000001"
# The event loop's own entries: their time is mostly waiting for sockets, not work.
IDLE = ("run_forever", "run_until_complete", "_run_once", "epoll", "'poll'", "'select'")


def _client(limit: int = 0, *, force_close: bool = False) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=limit, force_close=force_close)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120))


async def replays_per_session(
    *, cached: bool, sessions: int = 100, calls: int = 10, parallel: int = 10
) -> dict[str, float]:
    """Run ``sessions`` sessions of ``calls`` counted calls through a 4-machine edge; replays per session."""
    edge = await asyncio.to_thread(start_edge, machines=4, cached=cached)
    try:
        before = edge_status(edge)
        url = edge.url + "/mcp"
        limit = asyncio.Semaphore(parallel)
        async with _client() as http:

            async def one_session() -> None:
                async with limit:
                    token = await mcp_load.open_session(http, url)
                    counted = [await mcp_load.call_tool(http, url, token, 2 + index, "count") for index in range(calls)]
                    if counted != [str(value) for value in range(1, calls + 1)]:
                        raise mcp_load.LoadError(f"a session lost its machine: counted {counted}")

            started = time.perf_counter()
            await asyncio.gather(*(one_session() for _ in range(sessions)))
            elapsed = time.perf_counter() - started
        after = edge_status(edge)
    finally:
        await asyncio.to_thread(edge.stop)
    return {
        "replays_per_session": (after["replays"] - before["replays"]) / sessions,
        "cache_hits_per_session": (after["replay_cache_hits"] - before["replay_cache_hits"]) / sessions,
        "requests_per_s": sessions * (calls + 2) / elapsed,
    }


async def _single_backend() -> tuple[Process, Process]:
    machine = await asyncio.to_thread(start_uvicorn, "app.main:app", BACKEND_ID)
    try:
        edge = await asyncio.to_thread(start_edge, machines=0, backends={BACKEND_ID: machine.url})
    except BaseException:
        machine.stop()
        raise
    return machine, edge


async def edge_vs_direct(budget: Budget, sse_samples: int) -> tuple[Rounds, list[float], list[float]]:
    """(throughput rounds direct/edge, first SSE event ms direct, through the edge)."""
    machine, edge = await _single_backend()
    try:
        async with _client() as http:
            direct_url, edge_url = machine.url + "/mcp", edge.url + "/mcp"
            sessions = {
                url: [await mcp_load.open_session(http, url) for _ in range(budget.clients)]
                for url in (direct_url, edge_url)
            }
            # CPU per call: the machine's alone direct, the machine's and the edge's through the edge.
            pids = {direct_url: [machine.process.pid], edge_url: [machine.process.pid, edge.process.pid]}

            async def load(url: str) -> mcp_load.Sample:
                calls = [
                    functools.partial(mcp_load.call_tool, http, url, token, tool="whoami") for token in sessions[url]
                ]
                return await mcp_load.measure(
                    calls, budget.seconds, lambda: sum(mcp_load.process_cpu_seconds(pid) for pid in pids[url])
                )

            assert await mcp_load.call_tool(http, edge_url, sessions[edge_url][0], 1, "whoami") == BACKEND_ID
            await load(direct_url)
            await load(edge_url)
            rounds = await alternate(lambda: load(direct_url), lambda: load(edge_url), budget.rounds)

        direct_ms: list[float] = []
        edge_ms: list[float] = []
        async with _client(force_close=True) as http:  # a new connection per stream, both ways
            for index in range(sse_samples + 4):
                order = [(direct_ms, machine.url), (edge_ms, edge.url)]
                for samples, base in order if index % 2 == 0 else reversed(order):
                    elapsed = await mcp_load.first_event_ms(http, base + "/sse")
                    if index >= 4:  # the first few warm both paths up
                        samples.append(elapsed)
        return rounds, direct_ms, edge_ms
    finally:
        await asyncio.to_thread(edge.stop)
        await asyncio.to_thread(machine.stop)


async def edge_rss_with_streams(streams: int = 1000, batch: int = 50) -> dict[str, float]:
    """The edge's RSS idle, and with ``streams`` legacy SSE streams open through it to 4 machines."""
    edge = await asyncio.to_thread(start_edge, machines=4)
    responses: list[aiohttp.ClientResponse] = []
    try:
        async with _client() as http:
            # One request through every path first, so that idle means "warm", not "never used".
            for _ in range(8):
                await mcp_load.first_event_ms(http, edge.url + "/sse")
            await asyncio.sleep(0.5)
            idle = edge.rss_mb()

            async def open_stream() -> aiohttp.ClientResponse:
                response = await http.get(edge.url + "/sse", headers={"accept": "text/event-stream"})
                if response.status != 200:
                    raise mcp_load.LoadError(f"GET /sse through the edge: {response.status}")
                buffer = b""
                while b"endpoint" not in buffer:
                    chunk = await response.content.readany()
                    if not chunk:
                        raise mcp_load.LoadError("an SSE stream through the edge ended before its endpoint event")
                    buffer += chunk
                return response

            for start in range(0, streams, batch):
                responses += await asyncio.gather(*(open_stream() for _ in range(min(batch, streams - start))))
            await asyncio.sleep(1.0)
            loaded = edge.rss_mb()
            open_count = sum(1 for response in responses if not response.closed)
            for response in responses:
                response.close()
        return {
            "rss_mb": loaded,
            "idle_rss_mb": idle,
            "kb_per_stream": (loaded - idle) * 1024 / streams,
            "open_streams": float(open_count),
        }
    finally:
        for response in responses:
            response.close()
        await asyncio.to_thread(edge.stop)


class _EdgeThread:
    """An ``EdgeProxy`` under uvicorn in a thread of this process, so that cProfile sees only its requests."""

    def __init__(self, backend_url: str) -> None:
        from fly_replay_router.edge.config import EdgeConfig
        from fly_replay_router.edge.fleet import Fleet, FleetSpec
        from fly_replay_router.edge.proxy import EdgeProxy
        from fly_replay_router.edge.serve import edge_server

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        fleet = Fleet(FleetSpec(secret=SECRET))
        fleet.add_backend(BACKEND_ID, backend_url)
        self.server = edge_server(EdgeProxy(fleet, EdgeConfig(edge_port=port)))
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the in-thread edge did not start")
            time.sleep(0.02)

    def _run(self) -> None:
        self.loop.run_until_complete(self.server.serve(sockets=[self.sock]))

    def in_edge_thread(self, function: Callable[[], object]) -> None:
        """Run ``function`` on the edge's own thread (cProfile profiles the thread that enables it)."""
        done = threading.Event()

        def call() -> None:
            function()
            done.set()

        self.loop.call_soon_threadsafe(call)
        if not done.wait(10):
            raise RuntimeError("the edge thread did not answer")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


async def profile_edge(seconds: float, clients: int = 8) -> list[str]:
    """Where the edge's time goes: cProfile of the edge's thread only, while it relays tools/call to one machine."""
    machine = await asyncio.to_thread(start_uvicorn, "app.main:app", BACKEND_ID)
    try:
        edge = await asyncio.to_thread(_EdgeThread, machine.url)
        try:
            async with _client() as http:
                url = edge.url + "/mcp"
                tokens = [await mcp_load.open_session(http, url) for _ in range(clients)]
                calls = [functools.partial(mcp_load.call_tool, http, url, token, tool="whoami") for token in tokens]
                await mcp_load.throughput(calls, 0.5)  # warm: connections to the machine, first-use paths
                # Thread CPU time, not wall time: the client in this process holds the GIL at times.
                profiler = cProfile.Profile(time.thread_time)
                edge.in_edge_thread(profiler.enable)
                count = int(await mcp_load.throughput(calls, seconds) * seconds)
                edge.in_edge_thread(profiler.disable)
        finally:
            await asyncio.to_thread(edge.stop)
    finally:
        await asyncio.to_thread(machine.stop)
    stats = pstats.Stats(profiler)
    calls_done = max(count, 1)
    return [
        f"{count} tools/call relayed by the edge (CPU time of its thread only); per call:",
        *profile_rows(stats, calls_done, 14, skip=IDLE),
        "the edge's own functions, by cumulative time:",
        *profile_rows(stats, calls_done, 10, skip=IDLE, only="fly_replay_router/edge", by_cumulative=True),
    ]


def median_difference(subject: list[float], baseline: list[float]) -> float:
    return statistics.median(subject) - statistics.median(baseline)


def replay_cache_us(entries: int, requests: int = 20_000) -> dict[str, float]:
    """µs of replay-cache work per request with ``entries`` sessions cached: one lookup that hits, one remember.

    Every request a fly.toml session rule covers looks itself up; a replay remembers its target.
    Half the requests look up a session that is cached, half one that is not (then remembered), so
    the cache stays at ``entries`` plus the new ones, and expired entries are swept as they go.
    """
    from fly_replay_router.edge.cache import CacheKey, ReplayCache
    from fly_replay_router.edge.config import SessionCacheRule

    now = [0.0]
    cache = ReplayCache((SessionCacheRule("/", 300, "header", "Mcp-Session-Id"),), clock=lambda: now[0])
    cached = [f"{index:032x}" for index in range(entries)]
    for value in cached:
        cache.remember_session(CacheKey("session", "/", value), BACKEND_ID)
    fresh = [f"new{index:029x}" for index in range(requests)]
    started = time.perf_counter()
    for index in range(requests):
        now[0] += 0.0001
        if index % 2:
            lookup = cache.lookup("/mcp", {"mcp-session-id": cached[index % entries]})
            assert lookup.target == BACKEND_ID
        else:
            lookup = cache.lookup("/mcp", {"mcp-session-id": fresh[index]})
            assert lookup.target is None
            assert lookup.session_key is not None
            cache.remember_session(lookup.session_key, BACKEND_ID)
    elapsed = time.perf_counter() - started
    return {"us_per_request": elapsed / requests * 1e6, "entries": float(len(cache))}


if __name__ == "__main__":
    for size in (10_000, 100_000):
        figures = replay_cache_us(size, requests=2_000 if size > 10_000 else 10_000)
        print(f"replay cache, {size:>7,} entries: {figures['us_per_request']:8.2f} µs per request")
