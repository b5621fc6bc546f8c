"""Forwarding only ever talks to the owner, whatever the request target, body or client does.

Owners are real uvicorn processes (``tests/forward_owner.py`` records what reaches them, or the
demo MCP app). The forwarding machine is a real process where the HTTP parser allows the request,
and the layer driven with raw ASGI messages where only a more lenient parser (h11) would let the
request through.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from fly_replay_router import AffinityMiddleware, AffinitySettings
from fly_replay_router.affinity.token import TokenCodec
from tests.conftest import APP_NAME, SECRET, Machine, running_pair, start_machine
from tests.mcp_http import call_count_message, open_session, session_headers, tool_text

pytestmark = pytest.mark.anyio

HERE = "aaaaaaaaaaaaaa"
OWNER = "bbbbbbbbbbbbbb"
OTHER_OWNER = "cccccccccccccc"
CODEC = TokenCodec((SECRET,), app_name=APP_NAME)
OWNER_APP = "tests.forward_owner:app"


@pytest.fixture(scope="module")
def recording_owners() -> Iterator[tuple[Machine, Machine, Machine]]:
    """Two owners and a bystander, each recording what reaches it."""
    started = [start_machine(machine_id, app=OWNER_APP) for machine_id in (OWNER, OTHER_OWNER, "eeeeeeeeeeeeee")]
    try:
        yield started[0], started[1], started[2]
    finally:
        for machine in started:
            machine.stop()


def records(machine: Machine) -> list[dict[str, Any]]:
    return list(httpx.get(f"{machine.url}/_records", timeout=5).json())


async def until_uploads_held(owner: Machine, count: int) -> None:
    """Wait until ``count`` requests are reading their body on ``owner``: each holds a pool connection."""
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(timeout=5) as http:
        while (held := int((await http.get(f"{owner.url}/_in_progress")).text)) < count:
            assert time.monotonic() < deadline, f"only {held} of {count} uploads reached {owner.machine_id}"
            await asyncio.sleep(0.02)


LAYERS: list[AffinityMiddleware] = []


@pytest.fixture(autouse=True)
async def close_layers() -> AsyncIterator[None]:
    """Every layer a test made closes its connections to owners when the test ends."""
    yield
    while LAYERS:
        await LAYERS.pop().aclose()


def layer_for(*owners: Machine, **options: Any) -> AffinityMiddleware:
    async def never_called(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("a request for another machine's session reached this machine's app")

    settings = AffinitySettings(
        machine_id=HERE,
        secret_keys=(SECRET,),
        app_name=APP_NAME,
        peer_urls=tuple((owner.machine_id, owner.url) for owner in owners),
        **options,
    )
    LAYERS.append(AffinityMiddleware(never_called, settings=settings))
    return LAYERS[-1]


def forward_scope(
    token: str, raw_path: bytes = b"/mcp", query: bytes = b"", extra: list[tuple[bytes, bytes]] | None = None
) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": raw_path.decode("latin-1"),
        "raw_path": raw_path,
        "query_string": query,
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:8080"),
            (b"mcp-session-id", token.encode()),
            (b"transfer-encoding", b"chunked"),
            *(extra or []),
        ],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8080),
    }


class Client:
    """The client side of one ASGI request: a body given in pieces, then silence or a disconnect."""

    def __init__(self, *pieces: bytes, then: str = "end") -> None:
        self.messages: list[dict[str, Any]] = [
            {"type": "http.request", "body": piece, "more_body": True} for piece in pieces
        ]
        if then == "end":
            self.messages.append({"type": "http.request", "body": b"", "more_body": False})
        elif then == "disconnect":
            self.messages.append({"type": "http.disconnect"})
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        if self.messages:
            return self.messages.pop(0)
        await asyncio.Event().wait()  # "silence": a client that stalls forever
        raise AssertionError("unreachable")

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def body(self) -> bytes:
        return b"".join(message.get("body", b"") for message in self.sent[1:])


# --- finding 2: the target comes from the owner's address, never from the request ----------------


@pytest.mark.parametrize(
    "raw_path",
    [b"@{evil}/steal", b"*", b"http://{evil}/steal", b"{evil}/steal", b"", b"/mcp\r\nhost: {evil}", b"/caf\xc3\xa9"],
)
async def test_no_request_target_can_steer_a_forward_away_from_the_owner(
    recording_owners: tuple[Machine, Machine, Machine], raw_path: bytes
) -> None:
    owner, _, evil = recording_owners
    evil_host = urlsplit(evil.url).netloc.encode()
    token = CODEC.issue(OWNER, "inner-of-the-owner", now=time.time())
    client = Client(b'{"jsonrpc": "2.0"}')
    scope = forward_scope(token, raw_path.replace(b"{evil}", evil_host), extra=[(b"authorization", b"Bearer mine")])
    before = (len(records(owner)), len(records(evil)))
    await layer_for(owner, evil)(scope, client.receive, client.send)
    assert client.status == 404
    assert json.loads(client.body)["error"]["message"] == "Session not found"
    assert (len(records(owner)), len(records(evil))) == before


async def test_the_clients_authorization_and_target_reach_the_owner_unchanged(
    recording_owners: tuple[Machine, Machine, Machine],
) -> None:
    owner = recording_owners[0]
    token = CODEC.issue(OWNER, "inner-of-the-owner", now=time.time())
    client = Client(b"x" * 1000, b"y" * 24)
    scope = forward_scope(
        token, b"/mcp/a%2Fb@c", b"q=%20x&r=@evil:1", extra=[(b"authorization", b"Bearer client-own-secret")]
    )
    await layer_for(owner)(scope, client.receive, client.send)
    assert client.status == 200
    assert json.loads(client.body) == {"received": 1024}
    last = records(owner)[-1]
    assert (last["raw_path"], last["query"]) == ("/mcp/a%2Fb@c", "q=%20x&r=@evil:1")
    assert last["authorization"] == "Bearer client-own-secret"
    assert last["forwarded_from"] == HERE


# --- finding 3: OPTIONS * and other odd targets on a real machine ----------------------------------


async def raw_exchange(url: str, request: bytes, *, close_after: float | None = None) -> bytes:
    """Send raw bytes; read the answer to the end, or close after ``close_after`` seconds without reading."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(request)
        await writer.drain()
        if close_after is not None:
            await asyncio.sleep(close_after)
            return b""
        return await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()


def metric(machine: Machine, outcome: str, reason: str) -> float:
    text = httpx.get(f"{machine.metrics_url}/metrics", timeout=5).text
    pattern = rf'affinity_decisions_total\{{[^}}]*outcome="{outcome}",reason="{reason}"\}} (\S+)'
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def mcp_pair() -> Iterator[tuple[Machine, Machine]]:
    with running_pair((HERE, OWNER)) as pair:
        yield pair


async def test_options_star_with_another_machines_token_and_a_chunked_body_gets_404_without_a_traceback(
    mcp_pair: tuple[Machine, Machine],
) -> None:
    here, _ = mcp_pair
    token = CODEC.issue(OWNER, "0123456789abcdef0123456789abcdef", now=time.time())
    request = (
        f"OPTIONS * HTTP/1.1\r\nhost: 127.0.0.1\r\nmcp-session-id: {token}\r\n"
        "transfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ).encode()
    answer = await raw_exchange(here.url, request)
    # The demo puts the layer around its MCP routes, all under "/": "*" gets the framework's 404
    # before the layer. The layer's own answer to "*" is the ASGI-level test above.
    assert answer.startswith(b"HTTP/1.1 404 "), answer[:200]
    assert "Traceback" not in here.log()


# --- finding 4: a body that ends early is never delivered as complete -------------------------------


async def test_a_client_that_leaves_mid_body_never_runs_a_call_on_the_owner(mcp_pair: tuple[Machine, Machine]) -> None:
    here, owner = mcp_pair
    async with httpx.AsyncClient(timeout=10) as raw:
        token = await open_session(raw, f"{owner.url}/mcp")
        call = json.dumps(call_count_message(5)).encode()
        host = urlsplit(here.url).netloc  # the SDK's DNS-rebinding check wants the port too
        head = "".join(f"{name}: {value}\r\n" for name, value in session_headers(token).items())
        cut_requests = [
            # Chunked: one whole chunk holding a complete call, and no last chunk.
            f"POST /mcp HTTP/1.1\r\nhost: {host}\r\n{head}transfer-encoding: chunked\r\n\r\n".encode()
            + f"{len(call):x}\r\n".encode()
            + call
            + b"\r\n",
            # Content-Length: more declared than sent.
            f"POST /mcp HTTP/1.1\r\nhost: {host}\r\n{head}content-length: {len(call) + 2_000_000}\r\n\r\n".encode()
            + call,
        ]
        for number, request in enumerate(cut_requests, start=1):
            # Long enough for the machine to start the forward and pass the whole call on.
            await raw_exchange(here.url, request, close_after=0.5)
            deadline = time.monotonic() + 10
            while metric(here, "rejected", "client_left") + metric(here, "forwarded", "") < number:
                assert time.monotonic() < deadline, f"the machine never finished forward {number}"
                await asyncio.sleep(0.05)
            # The session is intact and no cut call ran in it: the next count is this client's own.
            answer = await raw.post(
                f"{owner.url}/mcp", headers=session_headers(token), json=call_count_message(10 + number)
            )
            assert tool_text(answer) == str(number)
        assert metric(here, "rejected", "client_left") == 2
    # The forwarding machine stays quiet. (The owner's SDK logs the disconnect it saw as an error
    # with a traceback, as it does for any client that leaves mid-body: that is the request failing.)
    assert "Traceback" not in here.log()


async def test_a_client_that_stalls_mid_body_gets_408_and_the_owner_sees_the_request_fail(
    recording_owners: tuple[Machine, Machine, Machine],
) -> None:
    owner = recording_owners[0]
    token = CODEC.issue(OWNER, "inner-of-the-owner", now=time.time())
    client = Client(b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call"}', then="stall")
    before = len(records(owner))
    layer = layer_for(owner, forward_write_timeout=0.5)
    await asyncio.wait_for(layer(forward_scope(token), client.receive, client.send), timeout=10)
    assert client.status == 408
    deadline = time.monotonic() + 10
    while len(records(owner)) == before:
        assert time.monotonic() < deadline, "the owner never saw the request end"
        await asyncio.sleep(0.05)
    assert records(owner)[-1]["complete"] is False


# --- finding 5: timeouts, and a pool per owner --------------------------------------------------


async def test_slow_uploads_to_one_owner_do_not_starve_forwards_to_another(
    recording_owners: tuple[Machine, Machine, Machine],
) -> None:
    busy_owner, other_owner, _ = recording_owners
    pool = 20  # connections per owner (the default)
    layer = layer_for(busy_owner, other_owner, forward_connections_per_owner=pool)
    attacker_token = CODEC.issue(OWNER, "attackers-own-session", now=time.time())
    stalled = [Client(b"{", then="stall") for _ in range(100)]
    uploads = [
        asyncio.ensure_future(layer(forward_scope(attacker_token), client.receive, client.send)) for client in stalled
    ]
    try:
        # The busy owner's pool is full: every connection it may have is held by a stalled upload.
        await until_uploads_held(busy_owner, pool)
        client = Client(b"a real session's call")
        token = CODEC.issue(OTHER_OWNER, "a-real-session", now=time.time())
        await layer(forward_scope(token), client.receive, client.send)
        assert client.status == 200
        assert json.loads(client.body) == {"received": 21}
    finally:
        for upload in uploads:
            upload.cancel()
        await asyncio.gather(*uploads, return_exceptions=True)


async def test_a_busy_owner_gets_503_not_404_so_the_client_keeps_its_session(
    recording_owners: tuple[Machine, Machine, Machine],
) -> None:
    owner = recording_owners[0]
    layer = layer_for(owner, forward_connections_per_owner=2, forward_connect_timeout=0.5)
    token = CODEC.issue(OWNER, "attackers-own-session", now=time.time())
    stalled = [Client(b"{", then="stall") for _ in range(2)]
    uploads = [asyncio.ensure_future(layer(forward_scope(token), c.receive, c.send)) for c in stalled]
    try:
        await until_uploads_held(owner, 2)
        client = Client(b"{}")
        await layer(forward_scope(token), client.receive, client.send)
        assert client.status == 503
        assert dict(client.sent[0]["headers"])[b"retry-after"] == b"1"
    finally:
        for upload in uploads:
            upload.cancel()
        await asyncio.gather(*uploads, return_exceptions=True)
