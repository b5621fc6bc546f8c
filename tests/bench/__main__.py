"""Benchmarks of the affinity layer and the local Fly edge, as ratios measured side by side.

Command (from the repository root)::

    .venv/bin/python -m tests.bench [--quick] [--out bench-results.json] [--only KEY ...]

``--quick`` takes about two minutes, the full run about ten (2 shared cores). ``--only`` runs the
benchmarks behind the named keys (e.g. ``--only decision_us layer_overhead_pct``). It prints a table
(key, measured value, target, met) and writes a JSON file::

    {
      "machine": {"cpu_count": ..., "cpu_model": ..., "python": ..., "platform": ..., "load_average": ...},
      "command": "...", "quick": true, "started_at": "...", "seconds": ...,
      "results": {
        "layer_overhead_pct": ...,              # = layer_overhead_pct_uvicorn
        "layer_overhead_pct_inprocess": ...,    # the demo app called as ASGI, no server
        "layer_overhead_pct_uvicorn": ...,      # two uvicorn processes, aiohttp client
        "decision_us": ..., "decision_first_sight_us": ...,
        "sessionless_overhead_pct": ...,        # = sessionless_overhead_pct_uvicorn
        "sessionless_overhead_pct_inprocess": ..., "sessionless_overhead_pct_uvicorn": ...,
        "replays_per_session_cached": ..., "replays_per_session_uncached": ...,
        "edge_vs_direct_throughput": ..., "sse_first_event_delay_ms": ..., "edge_rss_mb_1000_streams": ...,
        "handover_us": ..., "handover_cpu_ratio": ...,        # several workers per machine (workers.py)
        "workers_throughput_ratio": ..., "workers_throughput_ratio_by_cpu": ...,
        "layer_instructions_pct": ..., "sessionless_instructions_pct": ...   # callgrind (instructions.py)
      },
      "failed": {group: "<exception>: <message>", ...},   # groups that crashed; their keys are left out
      "targets": {key: "<= 2 %", ...}, "met": {key: true, ...},
      "details": {...},      # per benchmark: medians, every round's ratio, extra figures
      "profiles": {...}      # cProfile rows: decide, the middleware, the in-process server, the edge
    }

How each figure is made (every ratio or difference from runs interleaved in the same process tree,
ABBA order, median of the per-round or per-pair ratios; see ``layer.py`` and ``edge.py``):

- ``layer_overhead_pct_uvicorn`` / ``sessionless_overhead_pct_uvicorn`` (and the unsuffixed keys,
  equal to them): ``(1 - with layer / without layer) * 100`` of ``tools/call`` throughput of the
  demo server (``app.main``) and the same server without the layer (``tests.bench.bare_app``), two
  uvicorn processes, 8 concurrent aiohttp clients, alternating rounds. Handshake era (``2025-11-25``,
  one session per client) and ``2026-07-28`` (sessionless). ``details.uvicorn`` adds the same from
  server CPU per call (``overhead_pct_by_cpu``) and from call-by-call latency pairs.
- ``*_overhead_pct_uvicorn_aa``: the uvicorn rounds again with ``tests.bench.bare_app`` on both
  sides, an A/A control: how far two processes of the *same* app differ under this method. An
  overhead figure within it is noise.
- ``*_overhead_pct_inprocess``: the same two apps called as ASGI in this process (no server, no
  socket), call by call, alternating; ``1 - median(bare/layered)`` over the pairs. This is the
  steadiest figure on a shared machine; ``details.inprocess`` has the concurrent-rounds version too.
- ``decision_us``: ``decide()`` for a token this machine owns, best of 7 ``timeit`` repeats (a
  session's usual request: the codec remembers tokens it verified); ``decision_first_sight_us``: the
  same for tokens never seen before (the seal is opened). The details put ``verify``, ``issue``,
  itsdangerous's own ``unsign`` and the whole middleware next to them.
- ``replays_per_session_*``: the edge's replay counter per session, 100 sessions x 10 calls, 4 machines.
- ``edge_vs_direct_throughput``: ``tools/call`` throughput through the edge / straight to the machine.
- ``sse_first_event_delay_ms``: median time to the first SSE event of ``GET /sse`` through the edge
  minus the same straight to the machine (a new connection for each stream, both ways).
- ``edge_rss_mb_1000_streams``: the edge process's RSS with 1,000 SSE streams open through it.
- ``replay_cache_us_*``: the edge's replay-cache work per request (one lookup, half of them
  remembered) with 10,000 and 100,000 sessions cached (``edge.replay_cache_us``); it must not grow
  with the number of entries.
- ``session_cost_kb_*``: RSS per open session of one demo machine, by kind (``sessions.py``): an
  abandoned handshake-era session, one holding its ``GET`` event stream, a legacy ``/sse`` stream.
- ``handover_us``, ``handover_cpu_ratio``, ``workers_throughput_ratio``, ``workers_throughput_ratio_by_cpu``:
  several worker processes per machine; see ``workers.py``.
- ``crossing_us``, ``handover_cpu_floor_ratio``: taken in the same group, the floor under those two: one
  bare round trip between two processes pinned to two CPUs, over a socket pair (``crossing.py``),
  and the CPU ratio a hand-over would reach if it cost its served call nothing but that round trip's CPU.
- ``layer_instructions_pct``, ``sessionless_instructions_pct``: the layer's share of a ``tools/call``'s
  CPU instructions, counted by callgrind in-process (``instructions.py``; needs ``valgrind``).

A group that raises (a server that did not start, valgrind missing) does not stop the run: its
keys are left out, the others are measured and written, and the JSON's ``failed`` (and the end of
the printed table) names each failed group with its exception; the exit status is then 1.

``profiles`` (printed too): cProfile of ``decide`` and of the middleware around a stub app (own
time per call), of the in-process layered server (CPU time) and of the edge's thread
relaying ``tools/call`` (CPU time). Profiled times are inflated by the profiler; read the shares.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvloop

from tests.bench import crossing, edge, instructions, layer, scale, sessions, workers
from tests.bench.layer import Budget


@dataclass(frozen=True)
class Target:
    """A key's target: ``value <op> limit``."""

    op: str
    limit: float | None
    unit: str

    def met(self, value: float) -> bool | None:
        """Whether ``value`` meets the target; ``None`` for a figure reported without one."""
        if self.limit is None:
            return None
        return {"<=": value <= self.limit, "<": value < self.limit, ">=": value >= self.limit}[self.op]

    def __str__(self) -> str:
        return "-" if self.limit is None else f"{self.op} {self.limit:g}{self.unit}"


TARGETS = {
    "layer_overhead_pct": Target("<=", 2, " %"),
    "layer_overhead_pct_inprocess": Target("<=", 2, " %"),
    "layer_overhead_pct_uvicorn": Target("<=", 2, " %"),
    "decision_us": Target("<=", 10, " µs"),
    "decision_first_sight_us": Target("<=", 10, " µs"),
    "sessionless_overhead_pct": Target("<=", 1, " %"),
    "sessionless_overhead_pct_inprocess": Target("<=", 1, " %"),
    "sessionless_overhead_pct_uvicorn": Target("<=", 1, " %"),
    "layer_overhead_pct_uvicorn_aa": Target("", None, " %"),  # both sides without the layer: the noise
    "sessionless_overhead_pct_uvicorn_aa": Target("", None, " %"),
    "replays_per_session_cached": Target("<=", 1.0, ""),
    "replays_per_session_uncached": Target("", None, ""),  # the comparison for the cached figure
    "edge_vs_direct_throughput": Target(">=", 0.7, ""),
    "sse_first_event_delay_ms": Target("<=", 2, " ms"),
    "edge_rss_mb_1000_streams": Target("<", 150, " MB"),
    # What one session costs a demo machine (RSS): the sizing rule in settings.py rests on these.
    "session_cost_kb_handshake": Target("", None, " KB"),
    "session_cost_kb_handshake_stream": Target("", None, " KB"),
    "session_cost_kb_legacy_sse": Target("", None, " KB"),
    "replay_cache_us_10k": Target("<=", 20, " µs"),
    "replay_cache_us_100k": Target("<=", 20, " µs"),
    # The scale run (--scale only): 10,000 sessions over 8 machines through the edge.
    "scale_misrouted_calls": Target("<=", 0, ""),
    "scale_errors": Target("<=", 0, ""),
    "scale_kb_per_session": Target("", None, " KB"),
    "scale_max_machine_rss_mb": Target("", None, " MB"),
    "handover_us": Target("<=", 100, " µs"),  # median latency one hand-over between workers adds
    "handover_cpu_ratio": Target("<=", 1.15, ""),  # CPU of a handed-over call (both workers) / served directly
    # The floor under both (crossing.py): one bare round trip between two processes on two CPUs, and
    # the CPU ratio a hand-over would have if it cost nothing but that round trip.
    "crossing_us": Target("", None, " µs"),
    "handover_cpu_floor_ratio": Target("", None, ""),
    "workers_throughput_ratio": Target(">=", 1.6, ""),  # raw: the load generator shares the 2 cores
    "workers_throughput_ratio_by_cpu": Target(">=", 1.8, ""),
    # callgrind, in-process: the layer's share of a call's instructions (instructions.py)
    "layer_instructions_pct": Target("<=", 1.0, " %"),
    "sessionless_instructions_pct": Target("<=", 1.0, " %"),
    "handover_instructions_ratio": Target("<=", 1.15, ""),  # the hand-over's own code, without the kernel's share
}
# Which benchmark produces which keys (``--only`` takes any of the keys).
GROUPS = {
    "decision": ("decision_us", "decision_first_sight_us"),
    "inprocess": ("layer_overhead_pct_inprocess", "sessionless_overhead_pct_inprocess"),
    "uvicorn": (
        "layer_overhead_pct",
        "layer_overhead_pct_uvicorn",
        "sessionless_overhead_pct",
        "sessionless_overhead_pct_uvicorn",
    ),
    "uvicorn_aa": ("layer_overhead_pct_uvicorn_aa", "sessionless_overhead_pct_uvicorn_aa"),
    "replays": ("replays_per_session_cached", "replays_per_session_uncached"),
    "edge_direct": ("edge_vs_direct_throughput", "sse_first_event_delay_ms"),
    "edge_rss": ("edge_rss_mb_1000_streams",),
    "replay_cache": ("replay_cache_us_10k", "replay_cache_us_100k"),
    "sessions": tuple(f"session_cost_kb_{kind}" for kind in sessions.KINDS),
    "scale": ("scale_misrouted_calls", "scale_errors", "scale_kb_per_session", "scale_max_machine_rss_mb"),
    "workers_handover": ("handover_us", "handover_cpu_ratio", "crossing_us", "handover_cpu_floor_ratio"),
    "workers_throughput": ("workers_throughput_ratio", "workers_throughput_ratio_by_cpu"),
    "instructions": ("layer_instructions_pct", "sessionless_instructions_pct", "handover_instructions_ratio"),
}
# Too long and too large for every run: only with --scale, or named with --only.
NOT_BY_DEFAULT = set(GROUPS["scale"])


@dataclass
class Report:
    results: dict[str, float]
    details: dict[str, Any]
    profiles: dict[str, list[str]]
    failures: dict[str, dict[str, Any]] = field(default_factory=dict)

    def log(self, text: str) -> None:
        print(f"  [{time.strftime('%H:%M:%S')}] {text}", flush=True)


def machine_description() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = ""
    with contextlib.suppress(OSError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False, cwd=Path.cwd()
        ).stdout.strip()
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "load_average": [round(value, 2) for value in os.getloadavg()],
        "git_commit": commit,
    }


async def run_benchmarks(groups: set[str], quick: bool, report: Report) -> None:
    """Run each group of ``groups`` in the order of ``GROUPS``; a group that fails is recorded in
    ``report.failures`` (its keys left out) and the others run on."""
    throughput = Budget(seconds=0.5, rounds=8) if quick else Budget(seconds=1.0, rounds=20)
    for group, run in GROUP_RUNS.items():
        if group not in groups:
            continue
        keys_before = set(report.results)
        try:
            await run(report, quick, throughput)
        except Exception as exc:  # any failure of one group: the others still run
            for key in set(report.results) - keys_before:
                del report.results[key]
            reason = f"{type(exc).__name__}: {exc}"
            report.failures[group] = {"reason": reason, "traceback": traceback.format_exc().splitlines()[-12:]}
            report.log(f"{group} FAILED: {reason}")


async def _run_decision(report: Report, quick: bool, throughput: Budget) -> None:
    report.log("decision: timeit and cProfile of decide() and of the middleware alone")
    timing = layer.decision_timing()
    report.results["decision_us"] = timing["decision_us"]
    report.results["decision_first_sight_us"] = timing["decision_first_sight_us"]
    report.details["decision"] = {**timing, "middleware_us_per_request": layer.middleware_timing()}
    report.profiles.update(layer.decision_profiles(10_000 if quick else 100_000))


async def _run_inprocess(report: Report, quick: bool, throughput: Budget) -> None:
    paired = 1000 if quick else 4000
    report.log(f"in-process: {throughput.rounds} rounds x 2 x {throughput.seconds:g} s per era, {paired} paired calls")
    figures = await layer.inprocess_rounds(throughput, paired, profile_seconds=2.0 if quick else 4.0)
    report.results["layer_overhead_pct_inprocess"] = figures.handshake_paired.overhead_pct()
    report.results["sessionless_overhead_pct_inprocess"] = figures.modern_paired.overhead_pct()
    report.details["inprocess"] = {
        "handshake_paired": figures.handshake_paired.detail(),
        "sessionless_paired": figures.modern_paired.detail(),
        "handshake_rounds": figures.handshake.detail(),
        "sessionless_rounds": figures.modern.detail(),
    }
    report.profiles["inprocess_server"] = figures.profile


async def _run_uvicorn(report: Report, quick: bool, throughput: Budget) -> None:
    paired = _paired_uvicorn(quick)
    report.log(f"uvicorn: {throughput.rounds} rounds x 2 x {throughput.seconds:g} s, {paired} paired calls per era")
    served = await layer.uvicorn_rounds(throughput, paired)
    for key, rounds in (("layer_overhead_pct", served.handshake), ("sessionless_overhead_pct", served.modern)):
        report.results[key] = report.results[f"{key}_uvicorn"] = rounds.overhead_pct()
    report.details["uvicorn"] = {
        "handshake_rounds": served.handshake.detail(),
        "sessionless_rounds": served.modern.detail(),
        "handshake_paired_latency": served.handshake_paired.detail(),
        "sessionless_paired_latency": served.modern_paired.detail(),
    }


async def _run_uvicorn_aa(report: Report, quick: bool, throughput: Budget) -> None:
    report.log("uvicorn A/A: the same rounds with the layer-less app on both sides (the method's noise)")
    control = await layer.uvicorn_rounds(throughput, _paired_uvicorn(quick), subject_app=layer.BARE_APP)
    report.results["layer_overhead_pct_uvicorn_aa"] = control.handshake.overhead_pct()
    report.results["sessionless_overhead_pct_uvicorn_aa"] = control.modern.overhead_pct()
    report.details["uvicorn_aa"] = {
        "handshake_rounds": control.handshake.detail(),
        "sessionless_rounds": control.modern.detail(),
    }


async def _run_replays(report: Report, quick: bool, throughput: Budget) -> None:
    for cached in (True, False):
        name = "cached" if cached else "uncached"
        report.log(f"replays: 4 machines, 100 sessions x 10 calls, replay cache {'on' if cached else 'off'}")
        replays = await edge.replays_per_session(cached=cached)
        report.results[f"replays_per_session_{name}"] = replays["replays_per_session"]
        report.details[f"replays_{name}"] = replays


async def _run_edge_direct(report: Report, quick: bool, throughput: Budget) -> None:
    samples = 30 if quick else 100
    report.log(f"edge vs direct: {throughput.rounds} throughput rounds, {samples} SSE streams each way")
    rounds, direct_ms, edge_ms = await edge.edge_vs_direct(throughput, samples)
    report.results["edge_vs_direct_throughput"] = rounds.ratio()
    report.results["sse_first_event_delay_ms"] = edge.median_difference(edge_ms, direct_ms)
    report.details["edge_vs_direct"] = {
        **rounds.detail(),
        "sse_first_event_ms_direct": round(statistics.median(direct_ms), 3),
        "sse_first_event_ms_edge": round(statistics.median(edge_ms), 3),
        "sse_samples": len(edge_ms),
    }
    report.log("edge profile: the edge under cProfile, one machine, tools/call load")
    report.profiles["edge"] = await edge.profile_edge(2.0 if quick else 6.0)


async def _run_sessions(report: Report, quick: bool, throughput: Budget) -> None:
    count = 500 if quick else 1000  # 2,000 held streams got connection resets here; not looked into
    for kind in sessions.KINDS:
        report.log(f"session cost: {count} {kind} sessions on a fresh demo machine")
        cost = await sessions.session_cost_kb(kind, count)
        report.results[f"session_cost_kb_{kind}"] = cost["kb_per_session"]
        report.details[f"session_cost_{kind}"] = cost


async def _run_replay_cache(report: Report, quick: bool, throughput: Budget) -> None:
    report.log("replay cache: µs per request with 10,000 and 100,000 sessions cached")
    for label, entries in (("10k", 10_000), ("100k", 100_000)):
        figures = edge.replay_cache_us(entries)
        report.results[f"replay_cache_us_{label}"] = figures["us_per_request"]
        report.details[f"replay_cache_{label}"] = figures


async def _run_scale(report: Report, quick: bool, throughput: Budget) -> None:
    report.log("scale run: 10,000 sessions over 8 machines through the edge, 3 calls each")
    run = await scale.scale_run()
    report.results["scale_misrouted_calls"] = run["misrouted"]
    report.results["scale_errors"] = run["errors"]
    report.results["scale_kb_per_session"] = run["kb_per_session"]
    report.results["scale_max_machine_rss_mb"] = max(run["rss_mb_per_machine"].values())
    report.details["scale"] = run


async def _run_edge_rss(report: Report, quick: bool, throughput: Budget) -> None:
    report.log("edge memory: 1,000 SSE streams through a 4-machine edge")
    memory = await edge.edge_rss_with_streams()
    report.results["edge_rss_mb_1000_streams"] = memory["rss_mb"]
    report.details["edge_rss"] = memory


def _paired_uvicorn(quick: bool) -> int:
    return 500 if quick else 2000


async def _run_workers_handover(report: Report, quick: bool, throughput: Budget) -> None:
    pairs = 500 if quick else 2000
    report.log(f"hand-over: two workers of one machine, {pairs} calls each way, alternating")
    cost = await workers.handover_cost(pairs, cpu_blocks=throughput.rounds)
    report.results["handover_us"] = cost["handover_us"]
    report.results["handover_cpu_ratio"] = cost["handover_cpu_ratio"]
    report.log("the floor: a bare round trip between two processes, pinned apart, together, unpinned")
    floor = await asyncio.to_thread(crossing.round_trips, 4 if quick else 8)
    # Pinned apart: two busy workers run on two CPUs. Unpinned, the kernel sometimes puts two idle
    # processes on one CPU, and the figure jumps between the two placements from run to run.
    report.results["crossing_us"] = floor["apart_us"]
    served_cpu = cost["cpu_us_per_call_served"]
    report.results["handover_cpu_floor_ratio"] = (served_cpu + floor["apart_cpu_us"]) / served_cpu
    report.details["workers_handover"] = {**cost, "crossing": floor}


async def _run_workers_throughput(report: Report, quick: bool, throughput: Budget) -> None:
    report.log(f"workers: a CPU-bound tool under uvicorn --workers 1 and 2, {throughput.rounds} rounds")
    scaling = await workers.workers_throughput(throughput)
    report.results["workers_throughput_ratio"] = scaling["workers_throughput_ratio"]
    report.results["workers_throughput_ratio_by_cpu"] = scaling["workers_throughput_ratio_by_cpu"]
    report.details["workers_throughput"] = scaling


async def _run_instructions(report: Report, quick: bool, throughput: Budget) -> None:
    calls = 50 if quick else 100
    report.log(f"instructions: callgrind, in-process, 4 blocks of {calls} calls per era (a few minutes)")
    counted = await asyncio.to_thread(instructions.count_instructions, calls)
    for key in GROUPS["instructions"]:
        report.results[key] = counted[key]
    report.details["layer_instructions"] = counted


GROUP_RUNS: dict[str, Callable[[Report, bool, Budget], Awaitable[None]]] = {
    "decision": _run_decision,
    "inprocess": _run_inprocess,
    "uvicorn": _run_uvicorn,
    "uvicorn_aa": _run_uvicorn_aa,
    "replays": _run_replays,
    "edge_direct": _run_edge_direct,
    "sessions": _run_sessions,
    "replay_cache": _run_replay_cache,
    "scale": _run_scale,
    "edge_rss": _run_edge_rss,
    "workers_handover": _run_workers_handover,
    "workers_throughput": _run_workers_throughput,
    "instructions": _run_instructions,
}


def table(results: dict[str, float]) -> str:
    rows = [("key", "measured", "target", "met")]
    for key in TARGETS:
        if key in results:
            target = TARGETS[key]
            met = {True: "yes", False: "NO", None: "-"}[target.met(results[key])]
            rows.append((key, f"{results[key]:.3f}{target.unit}", str(target), met))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (about two minutes)")
    parser.add_argument("--out", type=Path, default=Path("bench-results.json"), help="where the JSON goes")
    parser.add_argument("--only", nargs="+", metavar="KEY", choices=sorted(TARGETS), help="run only these keys")
    parser.add_argument(
        "--scale", action="store_true", help="only the scale run: 10,000 sessions over 8 machines (a few minutes)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wanted = set(args.only or (GROUPS["scale"] if args.scale else set(TARGETS) - NOT_BY_DEFAULT))
    groups = {group for group, keys in GROUPS.items() if wanted & set(keys)}
    report = Report({}, {}, {})
    machine = machine_description()
    started = time.perf_counter()
    print(
        f"machine: {machine['cpu_count']} x {machine['cpu_model']}, Python {machine['python']}, {machine['platform']}"
    )
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run_benchmarks(groups, args.quick, report))
    document = {
        "machine": machine,
        "command": " ".join(["python -m tests.bench", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
        "quick": args.quick,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 1),
        "results": {key: round(value, 4) for key, value in report.results.items()},
        "targets": {key: str(TARGETS[key]) for key in report.results},
        "met": {key: TARGETS[key].met(value) for key, value in report.results.items()},
        "failed": {group: failure["reason"] for group, failure in report.failures.items()},
        "details": report.details,
        "profiles": report.profiles,
    }
    for group, failure in report.failures.items():
        document["details"][f"failed_{group}"] = failure
    args.out.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    print()
    for name, rows in report.profiles.items():
        print(f"profile {name} (own time per call, cumulative, share of own time):")
        print("\n".join(f"  {row}" for row in rows))
    print()
    print(table(report.results))
    for group, failure in report.failures.items():
        print(f"\nFAILED group {group} (keys {', '.join(GROUPS[group])} left out): {failure['reason']}")
    print(f"\n{document['seconds']} s; written to {args.out}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
