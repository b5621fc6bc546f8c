"""MCP traffic for the benchmarks: proper JSON-RPC messages over aiohttp, and ASGI apps driven in-process.

Two eras of the protocol:

- handshake (``2025-11-25``): ``initialize``, ``notifications/initialized``, then ``tools/call`` with
  ``Mcp-Session-Id`` and ``MCP-Protocol-Version: 2025-11-25``; the answer is a one-event SSE stream;
- sessionless (``2026-07-28``): ``tools/call`` with ``MCP-Protocol-Version``, ``Mcp-Method`` and
  ``Mcp-Name`` headers and the client's identity in ``params._meta``, as the SDK's own client sends it;
  no session, a JSON answer.

aiohttp is the client because it costs several times less CPU per request than httpx
(``shared/reference/performance-notes.md``): on two cores the client competes with the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

HANDSHAKE_VERSION = "2025-11-25"
MODERN_VERSION = "2026-07-28"
ACCEPT = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
CLIENT_INFO = {"name": "bench", "version": "1"}


class LoadError(RuntimeError):
    """A benchmark request got an answer that a working server would not give."""


def initialize_body(request_id: int = 1) -> bytes:
    params = {"protocolVersion": HANDSHAKE_VERSION, "capabilities": {}, "clientInfo": CLIENT_INFO}
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "initialize", "params": params}).encode()


INITIALIZED_BODY = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()


def tool_call_body(request_id: int, tool: str, arguments: dict[str, Any] | None = None) -> bytes:
    params = {"name": tool, "arguments": arguments or {}}
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}).encode()


def modern_tool_call_body(request_id: int, tool: str) -> bytes:
    meta = {
        "io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
        "io.modelcontextprotocol/clientInfo": CLIENT_INFO,
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    params = {"name": tool, "arguments": {}, "_meta": meta}
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}).encode()


def session_headers(token: str) -> dict[str, str]:
    return {**ACCEPT, "mcp-session-id": token, "mcp-protocol-version": HANDSHAKE_VERSION}


def modern_headers(tool: str) -> dict[str, str]:
    return {**ACCEPT, "mcp-protocol-version": MODERN_VERSION, "mcp-method": "tools/call", "mcp-name": tool}


def result_of(body: bytes) -> dict[str, Any]:
    """The JSON-RPC message of a JSON answer or of a one-event SSE answer."""
    text = body.decode()
    if not text.lstrip().startswith("{"):
        data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
        if not data:
            raise LoadError(f"no data in the answer {text[:200]!r}")
        text = data[-1]
    message: dict[str, Any] = json.loads(text)
    if "result" not in message:
        raise LoadError(f"not a result: {text[:200]}")
    return message


def tool_text(body: bytes) -> str:
    return str(result_of(body)["result"]["content"][0]["text"])


async def open_session(http: aiohttp.ClientSession, mcp_url: str) -> str:
    """A new handshake-era session: ``initialize`` then ``notifications/initialized``; its token."""
    async with http.post(mcp_url, data=initialize_body(), headers=ACCEPT) as response:
        body = await response.read()
        if response.status != 200:
            raise LoadError(f"initialize: {response.status} {body[:200]!r}")
        token = response.headers["mcp-session-id"]
    async with http.post(mcp_url, data=INITIALIZED_BODY, headers=session_headers(token)) as response:
        await response.read()
        if response.status != 202:
            raise LoadError(f"notifications/initialized: {response.status}")
    return token


async def call_tool(http: aiohttp.ClientSession, mcp_url: str, token: str, request_id: int, tool: str) -> str:
    async with http.post(mcp_url, data=tool_call_body(request_id, tool), headers=session_headers(token)) as response:
        body = await response.read()
        if response.status != 200:
            raise LoadError(f"tools/call: {response.status} {body[:200]!r}")
    return tool_text(body)


async def call_tool_modern(http: aiohttp.ClientSession, mcp_url: str, request_id: int, tool: str) -> str:
    async with http.post(mcp_url, data=modern_tool_call_body(request_id, tool), headers=modern_headers(tool)) as resp:
        body = await resp.read()
        if resp.status != 200:
            raise LoadError(f"tools/call (2026-07-28): {resp.status} {body[:200]!r}")
    return tool_text(body)


Call = Callable[[int], Awaitable[object]]


@dataclass(frozen=True)
class Sample:
    """One timed run: completed calls per second, and server CPU seconds per call."""

    per_second: float
    cpu_per_call: float


def process_cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid`` so far, in seconds (``/proc/<pid>/task/*/schedstat``, ns resolution)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


async def measure(calls: Sequence[Call], seconds: float, cpu_seconds: Callable[[], float]) -> Sample:
    """Calls per second of ``calls`` run for ``seconds``, and the CPU ``cpu_seconds`` counted per call."""
    cpu_before = cpu_seconds()
    started = time.perf_counter()
    count = await _run_calls(calls, seconds)
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds() - cpu_before
    return Sample(count / elapsed, cpu / max(count, 1))


async def throughput(calls: Sequence[Call], seconds: float) -> float:
    """Completed calls per second: each of ``calls`` (one per concurrent client) in a loop for ``seconds``."""
    started = time.perf_counter()
    count = await _run_calls(calls, seconds)
    return count / (time.perf_counter() - started)


async def _run_calls(calls: Sequence[Call], seconds: float) -> int:
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(call: Call) -> None:
        nonlocal done
        request_id = 10
        while time.perf_counter() < deadline:
            request_id += 1
            await call(request_id)
            done += 1

    await asyncio.gather(*(worker(call) for call in calls))
    return done


async def first_event_ms(http: aiohttp.ClientSession, url: str) -> float:
    """Milliseconds from sending ``GET url`` to having the first complete SSE event."""
    started = time.perf_counter()
    async with http.get(url, headers={"accept": "text/event-stream"}) as response:
        if response.status != 200:
            raise LoadError(f"GET {url}: {response.status}")
        buffer = b""
        while b"\n\n" not in buffer.replace(b"\r\n", b"\n"):
            chunk = await response.content.readany()
            if not chunk:
                raise LoadError(f"GET {url}: the stream ended before its first event")
            buffer += chunk
        elapsed = (time.perf_counter() - started) * 1000
        response.close()
    return elapsed


@dataclass(eq=False)
class AsgiClient:
    """Sends requests straight into an ASGI app (no server, no socket) and collects the answer."""

    app: Callable[..., Awaitable[None]]
    host: bytes = b"127.0.0.1:8000"

    async def post(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        finished = asyncio.Event()
        delivered = False
        status = 0
        answer_headers: dict[bytes, bytes] = {}
        chunks: list[bytes] = []

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await finished.wait()  # a client that stays until the answer is complete
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                answer_headers.update(message.get("headers", []))
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    finished.set()

        raw_headers = [(b"host", self.host), (b"content-length", str(len(body)).encode())]
        raw_headers += [(name.encode(), value.encode()) for name, value in headers.items()]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": raw_headers,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
            "state": {},
        }
        await self.app(scope, receive, send)
        finished.set()
        return status, answer_headers, b"".join(chunks)

    async def open_session(self) -> str:
        status, headers, body = await self.post("/mcp", ACCEPT, initialize_body())
        if status != 200:
            raise LoadError(f"in-process initialize: {status} {body[:200]!r}")
        token = headers[b"mcp-session-id"].decode()
        status, _, _ = await self.post("/mcp", session_headers(token), INITIALIZED_BODY)
        if status != 202:
            raise LoadError(f"in-process notifications/initialized: {status}")
        return token

    async def call_tool(self, token: str, request_id: int, tool: str) -> str:
        status, _, body = await self.post("/mcp", session_headers(token), tool_call_body(request_id, tool))
        if status != 200:
            raise LoadError(f"in-process tools/call: {status} {body[:200]!r}")
        return tool_text(body)

    async def call_tool_modern(self, request_id: int, tool: str) -> str:
        status, _, body = await self.post("/mcp", modern_headers(tool), modern_tool_call_body(request_id, tool))
        if status != 200:
            raise LoadError(f"in-process tools/call (2026-07-28): {status} {body[:200]!r}")
        return tool_text(body)


class Lifespan:
    """Runs an ASGI app's lifespan in the current event loop (startup now, shutdown on ``stop``)."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self._app = app
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._task = asyncio.ensure_future(self._app(scope, self._inbox.get, self._outbox.put))
        await self._inbox.put({"type": "lifespan.startup"})
        message = await self._outbox.get()
        if message["type"] != "lifespan.startup.complete":
            raise LoadError(f"lifespan startup: {message}")

    async def stop(self) -> None:
        await self._inbox.put({"type": "lifespan.shutdown"})
        await self._outbox.get()
        if self._task is not None:
            await self._task
