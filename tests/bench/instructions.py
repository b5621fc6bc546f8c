"""What the layer costs in CPU instructions, counted by valgrind's callgrind: steady where time is not.

``layer_instructions_pct``: instructions per handshake-era ``tools/call`` (``whoami``) through the
demo app (``app.main``) against the same app without the layer (``tests.bench.bare_app``), both
called as ASGI in one process (no server, no socket), ``(with - without) / with * 100``;
``sessionless_instructions_pct`` the same for ``2026-07-28`` calls (the pass-through). One
process under ``valgrind --tool=callgrind`` runs a warm-up, then blocks of calls in ABBA order
(bare, layered, layered, bare; twice per era: ``pct_per_abba_cycle`` in the details gives each
cycle's figure). Each block sits between two marker calls: callgrind zeroes
its counters on entering ``getpgrp`` and writes them out on entering ``getsid`` (``--zero-before``,
``--dump-before``), so a block's file holds exactly its own instructions: start-up, imports and
the warm-up count nowhere. The cyclic garbage collector is run before each block and off during
it: a full collection walks every object of the process, and falls in one block and not another.

``handover_instructions_ratio``: instructions of a handshake-era ``tools/call`` that reaches a sibling
worker and is handed over to its owner (both workers' layers in this process, over a real Unix
socket) over the same call served by the owner; both without the HTTP server, whose work a hand-over
moves to the sibling rather than adds. What a hand-over costs the kernel (two more wake-ups) is not
in it: ``handover_cpu_ratio`` (``workers.py``) has everything, on real processes.

The same run counts the layer's parts on their own (``details.layer_instructions.parts``, per
call): the middleware around a stub app minus the stub, ``decide`` for a token seen before,
``TokenCodec.verify``, the session budget's bookkeeping, the ``send`` wrapper that echoes the
token, the scope copy. CPython 3.11 runs Python code in one C function, so callgrind cannot name
Python functions: the parts are measured instead.

Command (one group of the benchmark, or this module alone, which prints the table)::

    .venv/bin/python -m tests.bench --only layer_instructions_pct
    .venv/bin/python -m tests.bench.instructions [--calls 100]

Reference: the callgrind manual (https://valgrind.org/docs/manual/cl-manual.html), options
``--zero-before``, ``--dump-before``, ``--callgrind-out-file``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

VALGRIND = "valgrind"
ZERO_MARKER, DUMP_MARKER = "getpgrp", "getsid"
TOOL = "whoami"
WARM_UP_CALLS = 150
# ABBA cycles per era: each gives its own figure, and the spread between them says how steady it is.
CYCLES = 2
PART_CALLS = 2000


def _zero() -> None:
    os.getpgrp()  # callgrind zeroes its counters here (--zero-before=getpgrp)


def _dump() -> None:
    os.getsid(0)  # ... and writes them out here (--dump-before=getsid)


class Blocks:
    """The labelled blocks of one run, in the order callgrind writes their files."""

    def __init__(self) -> None:
        self.labels: list[tuple[str, int]] = []

    async def calls(self, label: str, count: int, call: Callable[[int], Awaitable[object]]) -> None:
        self._open(label, count)
        try:
            for index in range(count):
                await call(index + 10)
        except BaseException:
            self._close(failed=True)
            raise
        self._close(failed=False)

    def repeat(self, label: str, count: int, function: Callable[[], object]) -> None:
        self._open(label, count)
        try:
            for _ in range(count):
                function()
        except BaseException:
            self._close(failed=True)
            raise
        self._close(failed=False)

    def _open(self, label: str, count: int) -> None:
        self.labels.append((label, count))
        _quiet_collector()
        _zero()

    def _close(self, *, failed: bool) -> None:
        # A block that fails still writes its file (the numbering stays in step), labelled "failed/".
        _dump()
        gc.enable()
        if failed:
            label, count = self.labels[-1]
            self.labels[-1] = (f"failed/{label}", count)


def _quiet_collector() -> None:
    # A full collection walks every object of the process (millions of instructions), whenever the
    # allocation counts say so: inside one block and not the next. Blocks run without it.
    gc.collect()
    gc.disable()


async def _app_blocks(blocks: Blocks, calls: int) -> None:
    from tests.bench import layer, mcp_load

    layer._set_machine_environment()  # before app.main is imported (bare_app imports it too)
    from app import main
    from tests.bench import bare_app

    layer._quiet_sdk_logs()
    lifespan = mcp_load.Lifespan(bare_app.app)  # one MCP session manager serves both apps
    await lifespan.start()
    try:
        bare, layered = mcp_load.AsgiClient(bare_app.app), mcp_load.AsgiClient(main.app)
        tokens = {client: await client.open_session() for client in (bare, layered)}
        assert await layered.call_tool(tokens[layered], 1, TOOL) == main.settings.machine_id
        eras: dict[str, Callable[[mcp_load.AsgiClient], Callable[[int], Awaitable[object]]]] = {
            "handshake": lambda client: functools.partial(client.call_tool, tokens[client], tool=TOOL),
            "sessionless": lambda client: functools.partial(client.call_tool_modern, tool=TOOL),
        }
        for make in eras.values():
            for client in (bare, layered):
                call = make(client)
                for index in range(WARM_UP_CALLS):
                    await call(index)
        await _handover_blocks(blocks, calls, main)
        for era, make in eras.items():
            for _ in range(CYCLES):
                for name, client in (("bare", bare), ("layered", layered), ("layered", layered), ("bare", bare)):
                    await blocks.calls(f"{era}/{name}", calls, make(client))
    finally:
        await lifespan.stop()


async def _handover_blocks(blocks: Blocks, calls: int, main: Any) -> None:
    """A handshake-era ``tools/call`` served by the worker that owns its session, and the same call
    reaching a sibling worker that hands it over (one process, two layers, a real Unix socket)."""
    from fly_replay_router.affinity import handover
    from fly_replay_router.affinity.middleware import AffinityMiddleware
    from tests.bench import mcp_load

    # The owner holds an answer's frames up to COALESCE_SECONDS to send them in one write. Natively a
    # tools/call answer fits in that hold (one read on the sibling; tests/bench/handover_reads.py
    # counts it); callgrind runs the code about 50 times slower, and the hold would run out before
    # the answer's end: three reads and wake-ups that do not happen outside it. So the hold is
    # stretched as much here.
    handover.COALESCE_SECONDS, coalesce = handover.COALESCE_SECONDS * 50, handover.COALESCE_SECONDS
    # main.layer is the owner: the demo's lifespan opened its hand-over socket.
    sibling = AffinityMiddleware(main.mcp_app, settings=main.settings)
    owner_client, sibling_client = mcp_load.AsgiClient(main.layer), mcp_load.AsgiClient(sibling)
    token = await owner_client.open_session()
    served = functools.partial(owner_client.call_tool, token, tool=TOOL)
    handed = functools.partial(sibling_client.call_tool, token, tool=TOOL)
    assert await handed(1) == main.settings.machine_id
    for index in range(WARM_UP_CALLS):
        await served(index)
        await handed(index)
    try:
        for _ in range(CYCLES):
            for name, call in (("served", served), ("handed", handed), ("handed", handed), ("served", served)):
                await blocks.calls(f"handover/{name}", calls, call)
    finally:
        handover.COALESCE_SECONDS = coalesce
        await sibling.workers.stop()


def _part_blocks(blocks: Blocks) -> None:
    """The layer's parts, each on its own (see the module docstring)."""
    from fly_replay_router.affinity.capacity import LiveSessions
    from fly_replay_router.affinity.decision import decide
    from fly_replay_router.affinity.rewrite import Watcher
    from fly_replay_router.affinity.token import TokenCodec
    from tests.bench.layer import _middleware_request, _run_to_completion, sdk_like_answer
    from tests.conftest import APP_NAME, SECRET

    through, direct = _middleware_request()
    for function in (through, direct):
        for _ in range(WARM_UP_CALLS):
            function()
    blocks.repeat("part/middleware_with_stub", PART_CALLS, through)
    blocks.repeat("part/stub_alone", PART_CALLS, direct)

    machine = "benc0000000001"
    codec = TokenCodec((SECRET,), app_name=APP_NAME)
    now = time.time()
    inner = uuid.uuid4().hex
    token = codec.issue(machine, inner, now=now)
    codec.verify(token, now=now)
    blocks.repeat("part/decide", PART_CALLS, lambda: decide(token, machine_id=machine, codec=codec, now=now))
    blocks.repeat("part/token_verify", PART_CALLS, lambda: codec.verify(token, now=now))

    live = LiveSessions(idle_timeout=1800.0)
    inner_bytes = inner.encode()
    live.minted(inner_bytes, "/mcp", time.monotonic())

    session = live.get(inner_bytes)
    assert session is not None

    def budget() -> None:  # as the middleware does for a session it served before
        session.start()
        session.finish(time.monotonic())

    blocks.repeat("part/budget_started_finished", PART_CALLS, budget)

    scope: dict[str, Any] = {"type": "http", "method": "POST", "path": "/mcp", "headers": [(b"a", b"b")] * 6}

    class Layer:  # what the watcher asks of the layer, on a served answer that mints nothing
        lazy_channel = False

        def __init__(self) -> None:
            self.live = live

        def issue_token(self, inner_session_id: str) -> str:
            return inner_session_id

        def admit(self, scope: Any, *, legacy: bool, admitted: bool) -> None:
            return None

        async def refuse(self, scope: Any, send: Any, refusal: Any) -> None:
            return None

        def record_refusal(self, scope: Any, refusal: Any) -> None:
            return None

        async def minting(self, scope: Any) -> None:
            return None

    layer = Layer()

    async def sink(message: Any) -> None:
        return None

    async def sdk_answer(send: Callable[[Any], Awaitable[None]]) -> None:
        for message in sdk_like_answer(inner_bytes):
            await send(message)

    def watched() -> None:
        watcher = Watcher(scope, sink, layer, inner_bytes, token.encode(), False, b"x")
        _run_to_completion(sdk_answer(watcher.send))

    blocks.repeat("part/watcher", PART_CALLS, watched)
    blocks.repeat("part/plain_send", PART_CALLS, lambda: _run_to_completion(sdk_answer(sink)))

    def scope_copy() -> None:
        copied = dict(scope)
        copied["headers"] = rewritten = list(scope["headers"])
        rewritten[0] = (b"mcp-session-id", inner_bytes)

    blocks.repeat("part/scope_copy", PART_CALLS, scope_copy)


def child(calls: int) -> None:
    """Inside valgrind: the blocks, then their labels on stdout (one JSON line)."""
    import uvloop

    blocks = Blocks()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_app_blocks(blocks, calls))
    error = None
    try:
        _part_blocks(blocks)
    except Exception as exc:  # the app blocks' figures still count; the parts are reported as failed
        error = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"labels": blocks.labels, "parts_error": error}))


def _summary(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise RuntimeError(f"no summary line in {path}")


def count_instructions(calls: int = 100) -> dict[str, Any]:
    """Run the blocks under callgrind; instructions per call of each label, and the percentages."""
    valgrind = shutil.which(VALGRIND)
    if valgrind is None:
        raise RuntimeError("valgrind is not installed (Debian: apt-get install -y valgrind)")
    with tempfile.TemporaryDirectory(prefix="bench-callgrind-") as directory:
        out = Path(directory) / "callgrind.out"
        command = [
            valgrind,
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            f"--zero-before={ZERO_MARKER}",
            f"--dump-before={DUMP_MARKER}",
            sys.executable,
            "-m",
            "tests.bench.instructions",
            "--child",
            "--calls",
            str(calls),
        ]
        started = time.perf_counter()
        run = subprocess.run(command, capture_output=True, text=True, check=False, cwd=Path(__file__).parents[2])
        if run.returncode != 0:
            said = [line for line in run.stderr.splitlines() if line.strip() and not line.startswith("==")]
            raise RuntimeError(f"the callgrind run failed ({run.returncode}): " + " | ".join(said[-3:]))
        report = json.loads(run.stdout.strip().splitlines()[-1])
        labels, parts_error = report["labels"], report["parts_error"]
        per_label: dict[str, list[float]] = {}
        for index, (label, count) in enumerate(labels, start=1):
            per_label.setdefault(label, []).append(_summary(Path(f"{out}.{index}")) / count)
    per_call = {label: sum(values) / len(values) for label, values in per_label.items()}
    cycles = {
        era: [
            round(percentages(_cycle(per_label, cycle))[key], 3) for cycle in range(len(per_label[f"{era}/bare"]) // 2)
        ]
        for era, key in (("handshake", "layer_instructions_pct"), ("sessionless", "sessionless_instructions_pct"))
    }
    return {
        **percentages(per_call),
        "pct_per_abba_cycle": cycles,
        "instructions_per_call": {label: round(value) for label, value in per_call.items()},
        "blocks_per_call": {label: [round(value) for value in values] for label, values in per_label.items()},
        "calls_per_block": calls,
        "valgrind_seconds": round(time.perf_counter() - started, 1),
        "command": " ".join(command[:5]) + " python -m tests.bench.instructions --child --calls " + str(calls),
        "parts": parts(per_call) if parts_error is None else {"failed": parts_error},
    }


def _cycle(per_label: dict[str, list[float]], cycle: int) -> dict[str, float]:
    """The per-call figures of one ABBA cycle (two blocks of each app per era)."""
    return {
        label: sum(values[2 * cycle : 2 * cycle + 2]) / 2
        for label, values in per_label.items()
        if not label.startswith(("part/", "handover/"))
    }


def percentages(per_call: dict[str, float]) -> dict[str, float]:
    """``(with - without) / with * 100`` per era, and the layer's instructions per call."""
    figures: dict[str, float] = {}
    for era, key in (("handshake", "layer_instructions_pct"), ("sessionless", "sessionless_instructions_pct")):
        layered, bare = per_call[f"{era}/layered"], per_call[f"{era}/bare"]
        figures[key] = (layered - bare) / layered * 100
        figures[f"{era}_layer_instructions_per_call"] = round(layered - bare)
    if "handover/served" in per_call:
        served, handed = per_call["handover/served"], per_call["handover/handed"]
        figures["handover_instructions_ratio"] = handed / served
        figures["handover_instructions_per_call"] = round(handed - served)
    return figures


def parts(per_call: dict[str, float]) -> dict[str, int]:
    """Instructions per request of each part of the layer (handshake era, a session served here)."""
    whole = per_call["part/middleware_with_stub"] - per_call["part/stub_alone"]
    measured = {
        "decide, for a token's first request on this worker": per_call["part/decide"],
        "  of which TokenCodec.verify": per_call["part/token_verify"],
        "session budget: Live.start + Live.finish": per_call["part/budget_started_finished"],
        "Watcher: made, and the SDK's 3 messages through it, over plain sends": per_call["part/watcher"]
        - per_call["part/plain_send"],
        "scope copy with the inner id": per_call["part/scope_copy"],
    }
    # decide is not on the path of a token served here before (the middleware remembers it).
    counted = sum(value for name, value in measured.items() if not name.startswith(("  ", "decide")))
    return {
        "middleware around a stub, over the stub": round(whole),
        **{name: round(value) for name, value in measured.items()},
        "the rest of __call__ (header pass, carriers, the served-here lookup, clock, calls)": round(whole - counted),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=100, help="calls per block (4 blocks per era)")
    args = parser.parse_args(argv)
    if args.child:
        child(args.calls)
        return 0
    figures = count_instructions(args.calls)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
