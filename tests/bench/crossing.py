"""The floor under a hand-over: one round trip between two processes over a Unix stream socket.

A hand-over adds one exchange between two worker processes to a call: the sibling writes the
request to the owner, and the owner writes the answer back. Each write wakes a process that
was waiting. This module times that exchange with nothing else in it: blocking ``sendall`` and
``recv`` on a socket pair, a 1.5 KB request and a 0.6 KB answer (about a ``tools/call``'s frames),
no event loop, no framing. No hand-over can add less than this to a call's latency or CPU.

Three placements, measured side by side:

- ``apart``: the two processes pinned to two different CPUs, as two busy workers usually are.
  Each write then wakes a process on the other CPU.
- ``together``: both pinned to one CPU. The kernel switches from one process to the other on
  the same CPU, which is much cheaper on a virtual machine.
- ``unpinned``: wherever the kernel puts them, as the benchmark's workers are.

Each placement reports the median round trip in µs and the CPU time of both processes per round
trip (``getrusage``), taken in alternating blocks.

Reference: unix(7) (stream sockets); sched_setaffinity(2).
"""

from __future__ import annotations

import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

REQUEST = b"r" * 1500
ANSWER = b"a" * 600
BLOCK_ROUND_TRIPS = 2000

# The echoing process: reads a request, writes the answer; once the socket closes, prints its CPU
# seconds since the warm-up.
WARM_UP = 50
_ECHO = (
    f"WARM_UP, REQUEST_BYTES, ANSWER = {WARM_UP}, {len(REQUEST)}, {ANSWER!r}\n"
    + """
import os, resource, socket, sys
cpu = int(sys.argv[2])
if cpu >= 0:
    os.sched_setaffinity(0, {cpu})
peer = socket.socket(fileno=int(sys.argv[1]))
served = 0
start = 0.0

def request():
    got = 0
    while got < REQUEST_BYTES:
        data = peer.recv(65536)
        if not data:
            return False  # the socket closed: the measuring process is done
        got += len(data)
    return True

while request():
    peer.sendall(ANSWER)
    served += 1
    if served == WARM_UP:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        start = usage.ru_utime + usage.ru_stime
usage = resource.getrusage(resource.RUSAGE_SELF)
print(usage.ru_utime + usage.ru_stime - start, flush=True)
"""
)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _read_answer(peer: socket.socket) -> None:
    got = 0
    while got < len(ANSWER):
        data = peer.recv(65536)
        if not data:
            raise EOFError("the echoing process ended")
        got += len(data)


def _block(mine: int, theirs: int, round_trips: int) -> tuple[list[float], float]:
    """``round_trips`` timed round trips with this process on CPU ``mine`` and the echo on ``theirs``
    (-1: wherever the kernel puts it); the times, and both processes' CPU seconds per round trip."""
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    echo = subprocess.Popen(
        [sys.executable, "-c", _ECHO, str(there.fileno()), str(theirs)],
        pass_fds=[there.fileno()],
        stdout=subprocess.PIPE,
        text=True,
    )
    there.close()
    allowed = os.sched_getaffinity(0)
    try:
        if mine >= 0:
            os.sched_setaffinity(0, {mine})
        for _ in range(WARM_UP):  # the echo has started and both sides are warm
            here.sendall(REQUEST)
            _read_answer(here)
        times: list[float] = []
        clock = time.perf_counter
        cpu_before = _cpu_seconds()
        for _ in range(round_trips):
            started = clock()
            here.sendall(REQUEST)
            _read_answer(here)
            times.append(clock() - started)
        own_cpu = _cpu_seconds() - cpu_before
    finally:
        os.sched_setaffinity(0, allowed)
        here.close()
    out, _ = echo.communicate(timeout=30)
    return times, (own_cpu + float(out.strip())) / round_trips


def round_trips(blocks: int = 8, round_trips: int = BLOCK_ROUND_TRIPS) -> dict[str, Any]:
    """The round trip in each placement, in blocks that take turns (the order reversed every other block)."""
    cpus = sorted(os.sched_getaffinity(0))
    placements = {"apart": (cpus[0], cpus[-1]), "together": (cpus[0], cpus[0]), "unpinned": (-1, -1)}
    times: dict[str, list[float]] = {name: [] for name in placements}
    cpu: dict[str, list[float]] = {name: [] for name in placements}
    for block in range(blocks):
        order = list(placements) if block % 2 == 0 else list(reversed(placements))
        for name in order:
            block_times, block_cpu = _block(*placements[name], round_trips)
            times[name] += block_times
            cpu[name].append(block_cpu)
    figures: dict[str, Any] = {"cpus": len(cpus), "round_trips_each": blocks * round_trips}
    for name in placements:
        figures[f"{name}_us"] = round(statistics.median(times[name]) * 1e6, 1)
        figures[f"{name}_cpu_us"] = round(statistics.median(cpu[name]) * 1e6, 1)
    if len(cpus) < 2:
        figures["note"] = "one CPU: both placements are the same"
    return figures


if __name__ == "__main__":
    import json

    print(json.dumps(round_trips(), indent=2))
