"""The layer's promises as invariants over every path, checked against what the SDK really holds.

A model-based test (hypothesis's ``RuleBasedStateMachine``): an in-process fleet of two machines of
two workers each, every worker the real ``AffinityMiddleware`` around its own real SDK server
(whichever ``mcp`` line is installed: 2.x ``MCPServer`` or 1.x ``FastMCP``), Streamable HTTP at
``/mcp`` and legacy HTTP+SSE at ``/sse``. Workers of one machine hand requests to each other over
their real Unix sockets; a 307 with ``fly-replay`` is followed the way Fly's proxy follows it (to a
random worker of the named machine, with ``fly-replay-src``). Rules send what clients and attackers
send; after every step the invariants are checked against the SDK's own session tables:

1. only sealed ids leave: every response ``Mcp-Session-Id`` and every ``endpoint`` event's
   ``session_id`` is a token of this fleet;
2. the budget counts what the server holds: per worker, the layer's live sessions equal the SDK's
   Streamable HTTP sessions and its open legacy streams equal the SDK's legacy sessions;
3. no 5xx, except the layer's deliberate 503 with ``Retry-After`` (every machine full, an owner busy);
4. no 404 for a session the SDK still holds, for a request that carried its token once.

Run by ``tests/test_invariants.py`` (2.x in this process, 1.x in its own environment) and directly:
``python -m tests.model_fleet --examples 500`` for a long run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from fly_replay_router import AffinityMiddleware, AffinitySettings, transport_security
from fly_replay_router.affinity.token import InvalidToken, TokenCodec

T = TypeVar("T")
MACHINES = ("aaaaaaaaaaaaaa", "bbbbbbbbbbbbbb")
SECRET = "model-fleet-secret-0123456789abcdef"
APP = "model-fleet"
HOST = (b"host", b"127.0.0.1:8080")
ACCEPT = (b"accept", b"application/json, text/event-stream")
JSON = (b"content-type", b"application/json")
VERSIONS = (None, "2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25", "2026-07-28")
MAX_SESSIONS, MAX_LEGACY = 2, 1
_ENDPOINT_ID = re.compile(rb"session_id=([^&\s]+)")
_CALL_TIMEOUT = 20.0
# What the runs reached, across examples: a floor on each (``run``) shows the rules really got there.
TALLY: Counter[str] = Counter()
FLOORS = {"via=handover": 1, "via=replay": 1, "minted": 5, "legacy sealed": 2, "refused": 1, "deleted": 1}


def initialize(version: str | None) -> bytes:
    params = {
        "protocolVersion": version or "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "m", "version": "1"},
    }
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params}).encode()


_REQUEST_IDS = iter(range(2, 1 << 62))


def ping() -> bytes:
    """A ping with an id of its own (the SDK pairs answers with requests by id, per session)."""
    return json.dumps({"jsonrpc": "2.0", "id": next(_REQUEST_IDS), "method": "ping"}).encode()


def new_server(name: str) -> Any:
    """A real SDK server of the installed line, and a way to its session tables."""
    try:
        from mcp.server.mcpserver import MCPServer
    except ImportError:  # the 1.x line
        from mcp.server.fastmcp import FastMCP

        return FastMCP(name, transport_security=_security())
    return MCPServer(name)


def _security() -> Any:
    return transport_security(AffinitySettings(machine_id=MACHINES[0], secret_keys=(SECRET,), app_name=APP))


@dataclass
class Worker:
    machine: str
    layer: AffinityMiddleware
    server: Any
    sse: Any  # the SDK's SseServerTransport

    def sdk_sessions(self) -> set[str]:
        return set(self.server.session_manager._server_instances)

    def sdk_legacy(self) -> int:
        return len(self.sse._read_stream_writers)


def new_worker(machine: str, socket_dir: str) -> Worker:
    from mcp.server.sse import SseServerTransport
    from starlette.applications import Starlette

    server = new_server(f"model-{machine}")
    before = {id(o) for o in gc.get_objects() if isinstance(o, SseServerTransport)}
    if hasattr(server, "settings"):  # 1.x: paths and security are server settings
        streamable, legacy = server.streamable_http_app(), server.sse_app()
    else:
        streamable = server.streamable_http_app(streamable_http_path="/mcp", transport_security=_security())
        legacy = server.sse_app(transport_security=_security())
    sse = next(o for o in gc.get_objects() if isinstance(o, SseServerTransport) and id(o) not in before)
    inner = Starlette(routes=[*streamable.routes, *legacy.routes])
    config = AffinitySettings(
        machine_id=machine,
        secret_keys=(SECRET,),
        app_name=APP,
        max_sessions=MAX_SESSIONS,
        max_legacy_sessions=MAX_LEGACY,
        new_session_rate=0.5,
        new_session_burst=4,
        workers=2,
        worker_socket_dir=socket_dir,
    )
    return Worker(machine, AffinityMiddleware(inner, settings=config), server, sse)


@dataclass
class Exchange:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    task: asyncio.Task[None] | None = None  # a held event stream
    gone: asyncio.Event | None = None


@dataclass
class Session:
    token: str
    legacy: bool = False
    stream: Exchange | None = None
    ended: bool = False


@dataclass
class Observations:
    """Everything that left the fleet, for the invariants."""

    exchanges: list[tuple[str, Exchange]] = field(default_factory=list)
    unexpected_404: list[str] = field(default_factory=list)


async def asgi_call(
    app: Any, method: str, path: str, *, query: bytes = b"", headers: list[tuple[bytes, bytes]], body: bytes = b""
) -> Exchange:
    """One request through ``app``; an event stream is held open after its first data (or its end)."""
    messages: list[dict[str, Any]] = []
    first_data = asyncio.Event()
    gone = asyncio.Event()
    sent_body = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)
        if message["type"] == "http.response.body" and (message.get("body") or not message.get("more_body")):
            first_data.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
        "state": {},
    }
    task = asyncio.ensure_future(app(scope, receive, send))
    waiter = asyncio.ensure_future(first_data.wait())
    await asyncio.wait({task, waiter}, timeout=_CALL_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if not messages:
        gone.set()
        await asyncio.wait_for(task, _CALL_TIMEOUT)
        raise AssertionError(f"{method} {path}: no answer")
    start = messages[0]
    ended = any(m["type"] == "http.response.body" and not m.get("more_body") for m in messages)
    streaming = (
        not ended
        and not task.done()
        and any(n == b"content-type" and v.startswith(b"text/event-stream") for n, v in start.get("headers", ()))
    )
    if not streaming:
        done, _ = await asyncio.wait({task}, timeout=_CALL_TIMEOUT)
        if not done:
            gone.set()
            await asyncio.wait({task}, timeout=_CALL_TIMEOUT)
        task.result()
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    exchange = Exchange(start["status"], list(start.get("headers", ())), body)
    if streaming:
        exchange.task, exchange.gone = task, gone
    else:
        gone.set()
    return exchange


async def _cancel_the_rest() -> None:
    """Tasks a step left behind (a hand-over's body pump, a stream's watcher): ended before the loop is."""
    rest = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)


class FleetModel(RuleBasedStateMachine):
    """Rules: what clients and attackers send. Invariants: the layer's promises (module docstring)."""

    sessions = Bundle("sessions")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.tmp = tempfile.TemporaryDirectory(prefix="model-fleet-")
        self.codec = TokenCodec((SECRET,), app_name=APP)
        self.observed = Observations()
        self.workers: dict[str, list[Worker]] = {}
        self.held: list[Exchange] = []
        self.random = random.Random(0)
        self._stopping = threading.Event()
        ready: asyncio.Future[None] = asyncio.run_coroutine_threadsafe(self._serve(), self.loop)  # type: ignore[assignment]
        self._serving = ready
        self.run(self._until_started())

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=120)

    async def _until_started(self) -> None:
        while not self.workers or len(self.workers) < len(MACHINES):
            if self._serving.done():
                self._serving.result()
            await asyncio.sleep(0.01)

    async def _serve(self) -> None:
        """The fleet's lifespans, entered and left in one task (the SDK's task groups require it)."""
        self._stop_event = asyncio.Event()
        async with contextlib.AsyncExitStack() as stack:
            started: dict[str, list[Worker]] = {}
            for machine in MACHINES:
                directory = f"{self.tmp.name}/{machine}"
                workers = [new_worker(machine, directory) for _ in range(2)]
                for worker in workers:
                    await stack.enter_async_context(worker.server.session_manager.run())
                    await stack.enter_async_context(worker.layer.workers.running())
                started[machine] = workers
            self.workers = started
            await self._stop_event.wait()
            for exchange in self.held:
                assert exchange.gone is not None
                exchange.gone.set()
            for exchange in self.held:
                assert exchange.task is not None
                await asyncio.wait({exchange.task}, timeout=_CALL_TIMEOUT)

    def teardown(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self._stop_event.set)
            self._serving.result(timeout=60)
            self.run(_cancel_the_rest())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()
            self.tmp.cleanup()

    # -- sending, as Fly's proxy would route it ------------------------------------------------

    async def _send(
        self, machine: str, worker: int, method: str, path: str, headers: list[tuple[bytes, bytes]], **kw: Any
    ) -> Exchange:
        for _hop in range(4):
            target = self.workers[machine][worker]
            exchange = await asgi_call(target.layer, method, path, headers=headers, **kw)
            replay = dict(exchange.headers).get(b"fly-replay")
            if replay is None:
                self.observed.exchanges.append((f"{method} {path} -> {machine}/{worker}", exchange))
                self._tally(method, exchange)
                return exchange
            fields = dict(part.split(b"=", 1) for part in replay.split(b";") if b"=" in part)
            source = b"instance=" + machine.encode()
            if b"state" in fields:
                source += b";state=" + fields[b"state"]
            headers = [(n, v) for n, v in headers if n != b"fly-replay-src"] + [(b"fly-replay-src", source)]
            if b"instance" in fields:
                machine = fields[b"instance"].decode()
            else:  # elsewhere=true: any other machine
                machine = next(m for m in MACHINES if m != machine)
            worker = self.random.randrange(2)
        raise AssertionError(f"{method} {path}: more replays than a full fleet needs")

    @staticmethod
    def _tally(method: str, exchange: Exchange) -> None:
        answered = dict(exchange.headers)
        served_by = answered.get(b"affinity-served-by", b"").decode()
        for hop in ("handover", "replay"):
            TALLY[f"via={hop}"] += hop in served_by
        TALLY["minted"] += b"mcp-session-id" in answered and method == "POST" and exchange.status < 400
        TALLY["legacy sealed"] += b"event: endpoint" in exchange.body
        TALLY["refused"] += exchange.status in (429, 503)
        TALLY["deleted"] += method == "DELETE" and exchange.status < 300

    def _session_headers(self, token: str, version: str | None) -> list[tuple[bytes, bytes]]:
        headers = [HOST, ACCEPT, JSON, (b"mcp-session-id", token.encode())]
        if version is not None:
            headers.append((b"mcp-protocol-version", version.encode()))
        return headers

    def _owner_holds(self, token: str) -> bool:
        try:
            session = self.codec.verify(token, now=time.time())
        except InvalidToken:
            return False
        tag, _, inner = session.inner_session_id.partition("~")
        for worker in self.workers.get(session.owner_machine_id, []):
            if worker.layer.workers.tag == tag:
                return inner in worker.sdk_sessions()
        return False

    # -- rules ---------------------------------------------------------------------------------

    @rule(
        target=sessions,
        machine=st.sampled_from(MACHINES),
        worker=st.integers(0, 1),
        version=st.sampled_from(VERSIONS),
        client=st.sampled_from(["203.0.113.7", "2001:db8::1", "2001:db8::2", None]),
    )
    def open_session(self, machine: str, worker: int, version: str | None, client: str | None) -> Session:
        headers = [HOST, ACCEPT, JSON]
        if version is not None:
            headers.append((b"mcp-protocol-version", version.encode()))
        if client is not None:
            headers.append((b"fly-client-ip", client.encode()))
        exchange = self.run(self._send(machine, worker, "POST", "/mcp", headers, body=initialize(version)))
        token = dict(exchange.headers).get(b"mcp-session-id", b"").decode()
        return Session(token)

    @rule(
        machine=st.sampled_from(MACHINES),
        worker=st.integers(0, 1),
        count=st.integers(2, 5),
        client=st.sampled_from(["203.0.113.7", "2001:db8::1", None]),
    )
    def open_several(self, machine: str, worker: int, count: int, client: str | None) -> None:
        """A client that opens sessions in a row (and forgets them): the cap, elsewhere, the rate."""
        for _ in range(count):
            self.open_session(machine, worker, None, client)

    @rule(
        session=sessions,
        machine=st.sampled_from(MACHINES),
        worker=st.integers(0, 1),
        carrier=st.sampled_from(["header", "query", "both"]),
        version=st.sampled_from(VERSIONS),
    )
    def call(self, session: Session, machine: str, worker: int, carrier: str, version: str | None) -> None:
        if not session.token:
            return
        headers = self._session_headers(session.token, version)
        query = b""
        if carrier != "header":
            query = b"session_id=" + session.token.encode()
            if carrier == "query":
                headers = [(n, v) for n, v in headers if n != b"mcp-session-id"]
        held = self._owner_holds(session.token)
        exchange = self.run(self._send(machine, worker, "POST", "/mcp", headers, query=query, body=ping()))
        if exchange.status == 404 and held and carrier == "header" and not session.legacy:
            self.observed.unexpected_404.append(f"call {session.token[:24]} via {machine}/{worker}")

    @rule(session=sessions, machine=st.sampled_from(MACHINES), worker=st.integers(0, 1), size=st.integers(2, 12))
    def burst(self, session: Session, machine: str, worker: int, size: int) -> None:
        if not session.token or session.legacy:
            return
        headers = self._session_headers(session.token, "2025-06-18")
        held = self._owner_holds(session.token)

        async def many() -> list[Exchange]:
            sends = [self._send(machine, worker, "POST", "/mcp", list(headers), body=ping()) for _ in range(size)]
            return list(await asyncio.gather(*sends))

        for exchange in self.run(many()):
            if exchange.status == 404 and held:
                self.observed.unexpected_404.append(f"burst {session.token[:24]}")

    @rule(session=sessions, machine=st.sampled_from(MACHINES), worker=st.integers(0, 1))
    def delete(self, session: Session, machine: str, worker: int) -> None:
        if not session.token:
            return
        headers = self._session_headers(session.token, "2025-06-18")
        exchange = self.run(self._send(machine, worker, "DELETE", "/mcp", headers))
        session.ended = session.ended or exchange.status < 300

    @rule(
        session=sessions,
        machine=st.sampled_from(MACHINES),
        worker=st.integers(0, 1),
        method=st.sampled_from(["GET", "DELETE", "POST"]),
    )
    def other_route(self, session: Session, machine: str, worker: int, method: str) -> None:
        """A route the app does not have, with a session's token: the app's 404 ends nothing."""
        if not session.token:
            return
        self.run(self._send(machine, worker, method, "/not-mcp", self._session_headers(session.token, None)))

    @rule(
        target=sessions,
        machine=st.sampled_from(MACHINES),
        worker=st.integers(0, 1),
        carrier=st.sampled_from(["none", "query", "header"]),
        session=st.none() | sessions,
        method=st.sampled_from(["GET", "HEAD"]),
    )
    def legacy_open(self, machine: str, worker: int, carrier: str, session: Session | None, method: str) -> Session:
        headers = [HOST, (b"accept", b"text/event-stream")]
        query = b""
        if carrier != "none" and session is not None and session.token:
            if carrier == "query":
                query = b"session_id=" + session.token.encode()
            else:
                headers.append((b"mcp-session-id", session.token.encode()))
        exchange = self.run(self._send(machine, worker, method, "/sse", headers, query=query))
        if exchange.task is not None:
            self.held.append(exchange)
        found = _ENDPOINT_ID.search(exchange.body)
        return Session(found.group(1).decode() if found else "", legacy=True, stream=exchange)

    @rule(session=sessions)
    def legacy_close(self, session: Session) -> None:
        stream = session.stream
        if stream is None or stream.task is None or stream.task.done():
            return
        assert stream.gone is not None
        stream.gone.set()

        async def closed() -> None:
            assert stream.task is not None
            await asyncio.wait({stream.task}, timeout=_CALL_TIMEOUT)
            await asyncio.sleep(0)

        self.run(closed())

    @rule(
        machine=st.sampled_from(MACHINES),
        worker=st.integers(0, 1),
        version=st.sampled_from(VERSIONS),
        body=st.sampled_from([b"{", b"[]", b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}', b"\xff\xfe"]),
    )
    def malformed(self, machine: str, worker: int, version: str | None, body: bytes) -> None:
        headers = [HOST, ACCEPT, JSON]
        if version is not None:
            headers.append((b"mcp-protocol-version", version.encode()))
        self.run(self._send(machine, worker, "POST", "/mcp", headers, body=body))

    @rule(
        machine=st.sampled_from(MACHINES),
        worker=st.integers(0, 1),
        forged=st.sampled_from(
            ["aaaaaaaaaaaaaa.2.AAAA", "bbbbbbbbbbbbbb.2." + "A" * 60, "x", "aaaaaaaaaaaaaa", "\u0663" * 3]
        ),
    )
    def forged_token(self, machine: str, worker: int, forged: str) -> None:
        headers = [HOST, ACCEPT, JSON, (b"mcp-session-id", forged.encode("utf-8"))]
        exchange = self.run(self._send(machine, worker, "POST", "/mcp", headers, body=ping()))
        assert exchange.status == 404, f"a forged token got {exchange.status}"

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def promises_hold(self) -> None:
        self.only_sealed_ids_leave()
        self.no_5xx()
        self.the_budget_counts_what_the_server_holds()
        assert not self.observed.unexpected_404, self.observed.unexpected_404
        # Every check above has seen them: the next step's checks look at its own answers.
        self.observed.exchanges.clear()

    def only_sealed_ids_leave(self) -> None:
        for label, exchange in self.observed.exchanges:
            for name, value in exchange.headers:
                if name == b"mcp-session-id":
                    self._sealed(value.decode("latin-1"), label)
            if b"event: endpoint" in exchange.body:
                found = _ENDPOINT_ID.search(exchange.body)
                assert found is not None, f"{label}: an endpoint event without a session"
                self._sealed(found.group(1).decode("latin-1"), label)

    def _sealed(self, token: str, label: str) -> None:
        try:
            self.codec.verify(token, now=time.time())
        except InvalidToken as exc:
            raise AssertionError(f"{label}: an id left unsealed: {token!r} ({exc.reason})") from None

    def no_5xx(self) -> None:
        for label, exchange in self.observed.exchanges:
            if exchange.status >= 500:
                retry = dict(exchange.headers).get(b"retry-after")
                assert exchange.status == 503, f"{label}: {exchange.status} {exchange.body[:200]!r}"
                assert retry is not None, f"{label}: 503 without Retry-After"

    def the_budget_counts_what_the_server_holds(self) -> None:
        now = time.monotonic()
        for machine, workers in self.workers.items():
            for index, worker in enumerate(workers):
                live = worker.layer.live
                sdk = worker.sdk_sessions()
                assert live.count(now) == len(sdk), f"{machine}/{index}: budget {live.count(now)}, SDK {len(sdk)}"
                assert live.legacy_streams == worker.sdk_legacy(), (
                    f"{machine}/{index}: legacy budget {live.legacy_streams}, SDK {worker.sdk_legacy()}"
                )
                assert live.count(now) <= MAX_SESSIONS
                assert live.legacy_streams <= MAX_LEGACY


def run(examples: int, steps: int, *, randomize: bool = False) -> None:
    """Run the state machine (raises hypothesis's falsifying example on a broken promise)."""
    config = settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=not randomize,
        database=None,
    )
    TALLY.clear()
    run_state_machine_as_test(FleetModel, settings=config)
    if examples >= 20:
        short = {name: TALLY[name] for name, floor in FLOORS.items() if TALLY[name] < floor}
        assert not short, f"the rules did not reach these often enough: {short} (reached: {dict(TALLY)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--examples", type=int, default=40, help="fleets to build and drive (default 40)")
    parser.add_argument("--steps", type=int, default=30, help="rules per fleet at most (default 30)")
    parser.add_argument(
        "--random", action="store_true", help="draw new sequences each run (default: the same ones, as CI runs them)"
    )
    args = parser.parse_args()
    started = time.monotonic()
    logging.basicConfig(level=logging.WARNING)
    run(args.examples, args.steps, randomize=args.random)
    print(f"model fleet: {args.examples} examples x {args.steps} steps held every invariant "
          f"in {time.monotonic() - started:.0f}s; reached {dict(TALLY)}", flush=True)  # fmt: skip
    sys.exit(0)


if __name__ == "__main__":
    main()
