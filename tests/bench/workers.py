"""Several worker processes per machine: the cost of a hand-over, and what a second worker buys.

- ``handover_us``: two worker processes of one machine (one machine id, one socket directory),
  each on its own port so that the benchmark picks where a call lands. Call by call, alternating:
  ``tools/call`` on worker A for a session A owns, and on worker A for a session B owns (A streams
  it to B over B's Unix socket). The figure is the median of the per-pair latency differences;
  ``details`` add both medians.
- ``handover_cpu_ratio``: the CPU of both processes together per handed-over call over the same
  per call served by its owner: blocks of ``CPU_BLOCK_CALLS`` calls each way in ABBA order, the
  median of the blocks' ratios.
- ``workers_throughput_ratio``: ``tools/call`` throughput of a CPU-bound tool
  (``tests.bench.cpu_app``, 5 ms of CPU per call) under ``uvicorn --workers 2`` over the same under
  ``--workers 1``, in alternating rounds (median of the rounds' ratios). Each server gets the same
  number of sessions; on two workers half are owned by each (sessions are opened one by one on
  new connections, as arrivals over time spread them, and kept until each worker owns its half).
  The kernel gives each client connection to either worker, so about half the calls are handed over.
  The load generator runs on the same two cores, so this raw figure cannot reach 2.
- ``workers_throughput_ratio_by_cpu``: the same rounds judged by server CPU per call, as a
  CPU-bound server's throughput is: two workers serve ``2 / cpu per call`` calls a second where
  one serves ``1 / cpu per call``, so the figure is ``2 x`` the median of the rounds' ratios of
  one worker's CPU per call to two workers' (hand-overs included).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from tests.bench import mcp_load
from tests.bench.layer import Budget, alternate, paired_calls
from tests.bench.processes import Process, _spawn, _wait_http
from tests.conftest import APP_NAME, SECRET, free_port

MACHINE_ID = "benc0000000002"
DEMO_APP = "app.main:app"
CPU_APP = "tests.bench.cpu_app:app"


def start_workers(app: str, workers: int, socket_dir: str, *, separate: bool = False) -> list[Process]:
    """``app`` as one machine of ``workers`` processes: one ``uvicorn --workers N`` (a shared port),
    or with ``separate`` N single-process uvicorns on ports of their own (the same socket directory)."""
    env = {
        **os.environ,
        "FLY_MACHINE_ID": MACHINE_ID,
        "FLY_APP_NAME": APP_NAME,
        "FLY_REGION": "lcl",
        "AFFINITY_SECRET": SECRET,
        "AFFINITY_WORKER_SOCKET_DIR": socket_dir,
    }
    started: list[Process] = []
    for index in range(1 if not separate else workers):
        port = free_port()
        command = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
        command += ["--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]
        if not separate:
            command += ["--workers", str(workers)]
        proc = _spawn(f"{MACHINE_ID}-{index}-{app}", command, env, f"http://127.0.0.1:{port}")
        started.append(proc)
        _wait_http(proc, "/healthz")
    return started


def process_tree_cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its children (the workers of ``uvicorn --workers N``)."""
    total = mcp_load.process_cpu_seconds(pid)
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as children:
                for child in children.read().split():
                    with contextlib.suppress(OSError):
                        total += mcp_load.process_cpu_seconds(int(child))
    return total


CPU_BLOCK_CALLS = 200


async def handover_cost(pairs: int, cpu_blocks: int) -> dict[str, Any]:
    """Latency and CPU a hand-over adds to one ``tools/call`` (``whoami`` of the demo app)."""
    with contextlib.ExitStack() as stack:
        socket_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-workers-")) + "/sockets"
        a, b = start_workers(DEMO_APP, 2, socket_dir, separate=True)
        stack.callback(b.stop)
        stack.callback(a.stop)
        url = a.url + "/mcp"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            own = await mcp_load.open_session(http, url)
            sibling = await mcp_load.open_session(http, b.url + "/mcp")
            served = functools.partial(mcp_load.call_tool, http, url, own, tool="whoami")
            handed = functools.partial(mcp_load.call_tool, http, url, sibling, tool="whoami")
            for _ in range(200):  # warm up both paths
                await served(1)
                await handed(1)
            paired = await paired_calls(served, handed, pairs)

            def both_cpu() -> float:
                return mcp_load.process_cpu_seconds(a.process.pid) + mcp_load.process_cpu_seconds(b.process.pid)

            async def cpu_per_call(call: Callable[[int], Awaitable[str]]) -> float:
                before = both_cpu()
                for index in range(CPU_BLOCK_CALLS):
                    await call(index)
                return (both_cpu() - before) / CPU_BLOCK_CALLS

            cpu_served: list[float] = []
            cpu_handed: list[float] = []
            for block in range(cpu_blocks):
                order = [(served, cpu_served), (handed, cpu_handed)]
                for call, figures in order if block % 2 == 0 else reversed(order):
                    figures.append(await cpu_per_call(call))
    differences = [handed - served for served, handed in zip(paired.baseline, paired.subject, strict=True)]
    ratios = [handed / served for served, handed in zip(cpu_served, cpu_handed, strict=True)]
    return {
        "handover_us": statistics.median(differences) * 1e6,
        "handover_cpu_ratio": statistics.median(ratios),
        "served_by_owner_median_us": round(statistics.median(paired.baseline) * 1e6, 1),
        "handed_over_median_us": round(statistics.median(paired.subject) * 1e6, 1),
        "pairs": pairs,
        "cpu_us_per_call_served": round(statistics.median(cpu_served) * 1e6, 1),
        "cpu_us_per_call_handed_over": round(statistics.median(cpu_handed) * 1e6, 1),
        "cpu_block_ratios": [round(ratio, 4) for ratio in ratios],
        "cpu_blocks_each": cpu_blocks,
        "cpu_calls_per_block": CPU_BLOCK_CALLS,
    }


async def _balanced_sessions(url: str, count: int, workers: int) -> list[str]:
    """``count`` sessions, ``count / workers`` owned by each worker (opened one by one on new connections)."""
    owned: dict[str, list[str]] = {}
    for _ in range(count * 20):
        async with aiohttp.ClientSession() as fresh:
            token = await mcp_load.open_session(fresh, url)
            owner = await mcp_load.call_tool(fresh, url, token, 2, "worker")
        owned.setdefault(owner, []).append(token)
        if len(owned) == workers and all(len(tokens) >= count // workers for tokens in owned.values()):
            return [token for tokens in owned.values() for token in tokens[: count // workers]]
        await asyncio.sleep(0.01)
    raise RuntimeError(f"sessions did not spread over {workers} workers: {owned}")


async def workers_throughput(budget: Budget) -> dict[str, Any]:
    """Throughput of the CPU-bound tool with 2 workers over 1, and the rounds behind it."""
    with contextlib.ExitStack() as stack:
        socket_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-workers-"))
        (one,) = start_workers(CPU_APP, 1, socket_dir + "/one")
        stack.callback(one.stop)
        (two,) = start_workers(CPU_APP, 2, socket_dir + "/two")
        stack.callback(two.stop)
        clients = budget.clients
        sessions = {
            one.url: await _balanced_sessions(one.url + "/mcp", clients, 1),
            two.url: await _balanced_sessions(two.url + "/mcp", clients, 2),
        }
        https = [aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) for _ in range(clients)]
        try:

            async def load(server: Process) -> mcp_load.Sample:
                url = server.url + "/mcp"
                calls = [
                    functools.partial(mcp_load.call_tool, http, url, token, tool="burn")
                    for http, token in zip(https, sessions[server.url], strict=True)
                ]
                pid = server.process.pid
                return await mcp_load.measure(calls, budget.seconds, lambda: process_tree_cpu_seconds(pid))

            await load(one)
            await load(two)
            rounds = await alternate(lambda: load(one), lambda: load(two), budget.rounds)
        finally:
            for http in https:
                await http.close()
    return {
        "workers_throughput_ratio": rounds.ratio(),
        "workers_throughput_ratio_by_cpu": 2 * statistics.median(rounds.cpu_ratios()),
        **rounds.detail(),
        "clients": clients,
    }
