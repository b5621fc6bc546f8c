"""The hand-over's connections to a sibling worker, in one process: an owner on a real Unix socket.

What a user would notice: a request sent twice (a tool called twice), a 404 for a session whose
worker is alive, a hand-over that opens a connection per request. Each owner here counts the
connections it accepted and the requests it ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fly_replay_router.affinity.frames import (
    BODY,
    BODY_END,
    CHUNK,
    DISCONNECT,
    END,
    MAX_FRAME_BYTES,
    SCOPE,
    START,
    FrameChannel,
    decode_scope,
    encode_scope,
    frame,
)
from fly_replay_router.affinity.handover import Outcome, hand_over, serve_connection
from fly_replay_router.affinity.siblings import IDLE_PER_OWNER, Siblings, connect
from fly_replay_router.settings import AffinitySettings

pytestmark = pytest.mark.anyio

SENDER = "feedf00d"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Owner:
    """A worker's hand-over socket, serving ``answer`` for every request; counts what reached it."""

    path: str
    accepted: int = 0
    requests: list[bytes] = field(default_factory=list)
    channels: list[FrameChannel] = field(default_factory=list)
    server: asyncio.Server | None = None
    close_before_answering: bool = False

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.requests.append(body)
        if self.close_before_answering:
            for channel in self.channels:
                channel.close()
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-owner", b"yes")]})
        await send({"type": "http.response.body", "body": b"got " + body, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _accept(self, channel: FrameChannel) -> None:
        self.accepted += 1
        self.channels.append(channel)
        await serve_connection(self.app, channel, {}, None)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_unix_server(lambda: FrameChannel(self._accept), self.path)

    def drop_connections(self) -> None:
        for channel in self.channels:
            channel.close()
        self.channels.clear()

    def die(self) -> None:
        """As a worker killed with SIGKILL: every connection closed, nobody listening on the socket file."""
        assert self.server is not None
        self.server.close()
        self.drop_connections()


@contextlib.asynccontextmanager
async def running_owner(tmp_path: Path) -> AsyncIterator[Owner]:
    owner = Owner(str(tmp_path / "owner.sock"))
    await owner.start()
    try:
        yield owner
    finally:
        owner.die()


async def _hand(siblings: Siblings, owner: Owner, body: bytes, *, busy_timeout: float = 5.0) -> tuple[Outcome, bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/mcp", "query_string": b"", "headers": [(b"a", b"b")]}
    outcome = await hand_over(
        scope, receive, send, siblings=siblings, socket_path=owner.path, sender=SENDER, busy_timeout=busy_timeout
    )
    return outcome, b"".join(message.get("body", b"") for message in sent)


async def _until(condition: Any) -> None:
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110  (socket state seen by the event loop: no event to wait on)
            await asyncio.sleep(0.005)


async def test_hand_overs_one_after_another_share_one_connection(tmp_path: Path) -> None:
    siblings = Siblings()
    async with running_owner(tmp_path) as owner:
        for index in range(50):
            assert await _hand(siblings, owner, b"%d" % index) == (Outcome.ANSWERED, b"got %d" % index)
        concurrent = await asyncio.gather(*(_hand(siblings, owner, b"c%d" % index) for index in range(20)))
        assert all(outcome is Outcome.ANSWERED for outcome, _ in concurrent)
        # 20 at once need 20 connections; only IDLE_PER_OWNER of them are kept afterwards.
        assert owner.accepted == 20
        await _hand(siblings, owner, b"again")
        assert owner.accepted == 20
    siblings.close()
    assert len(owner.requests) == 71
    assert IDLE_PER_OWNER < 20


async def test_an_idle_connection_the_owner_closed_is_noticed_before_use(tmp_path: Path) -> None:
    siblings = Siblings()
    async with running_owner(tmp_path) as owner:
        await _hand(siblings, owner, b"first")
        assert siblings.idle(owner.path) == 1
        owner.drop_connections()  # the owner lives on; its end of the idle connection is closed
        await _until(lambda: siblings.idle(owner.path) == 0)
        assert await _hand(siblings, owner, b"second") == (Outcome.ANSWERED, b"got second")
    siblings.close()
    assert owner.requests == [b"first", b"second"]  # each sent once
    assert owner.accepted == 2


async def test_a_request_written_into_a_connection_closed_a_moment_ago_goes_once_on_a_new_one(
    tmp_path: Path,
) -> None:
    """The close has not reached the sender's event loop yet: the write itself fails (EPIPE), so
    nothing of the request was delivered, and it is sent on a fresh connection, once."""
    siblings = Siblings()
    async with running_owner(tmp_path) as owner:
        await _hand(siblings, owner, b"first")
        for channel in owner.channels:
            assert channel.transport is not None
            channel.transport.get_extra_info("socket").shutdown(socket.SHUT_RDWR)  # at once, in the kernel
        assert siblings.idle(owner.path) == 1  # not seen yet
        assert await _hand(siblings, owner, b"second") == (Outcome.ANSWERED, b"got second")
    siblings.close()
    assert owner.requests == [b"first", b"second"]
    assert owner.accepted == 2


async def test_an_owner_that_died_is_gone_and_gets_nothing(tmp_path: Path) -> None:
    siblings = Siblings()
    async with running_owner(tmp_path) as owner:
        await _hand(siblings, owner, b"first")
        owner.die()
        await _until(lambda: not os.path.exists(owner.path) or _refused(owner.path))
        assert await _hand(siblings, owner, b"second") == (Outcome.GONE, b"")
    siblings.close()
    assert owner.requests == [b"first"]


async def test_an_owner_that_closes_before_answering_is_busy_when_it_still_listens(tmp_path: Path) -> None:
    """The request may have been taken: it is not sent again, and the live owner's session is not ended."""
    siblings = Siblings()
    async with running_owner(tmp_path) as owner:
        owner.close_before_answering = True
        assert await _hand(siblings, owner, b"once") == (Outcome.BUSY, b"")
    siblings.close()
    assert owner.requests == [b"once"]


async def test_a_socket_nobody_listens_on_and_a_missing_one_are_gone(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(stale))  # bound, never listening: ECONNREFUSED, as after a worker died
    siblings = Siblings()
    try:
        for path in (stale, tmp_path / "missing.sock"):
            started = time.monotonic()
            assert await _hand(siblings, Owner(str(path)), b"x", busy_timeout=30) == (Outcome.GONE, b"")
            assert time.monotonic() - started < 5  # at once, not after the busy timeout
    finally:
        listener.close()


async def test_a_full_backlog_waits_for_the_owner_then_is_busy(tmp_path: Path) -> None:
    path = str(tmp_path / "full.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)  # accepts nothing: its backlog fills at once
    queued: list[socket.socket] = []
    try:
        while True:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            try:
                client.connect(path)
            except BlockingIOError:
                client.close()
                break
            queued.append(client)
        siblings = Siblings()
        started = time.monotonic()
        assert await _hand(siblings, Owner(path), b"x", busy_timeout=0.3) == (Outcome.BUSY, b"")
        assert time.monotonic() - started >= 0.3

        # The owner accepts in time: the same wait ends in an answer.
        async def accept_soon() -> None:
            await asyncio.sleep(0.2)
            for client in queued:
                client.close()
            accepted, _ = await asyncio.get_running_loop().sock_accept(listener)
            accepted.close()

        acceptor = asyncio.ensure_future(accept_soon())
        sock = await connect(path, 10)
        await acceptor
        sock.close()
    finally:
        listener.close()
        for client in queued:
            client.close()


def _refused(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return True
    finally:
        probe.close()
    return False


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
_bytes = st.binary(max_size=60)
_address = st.none() | st.tuples(st.from_regex(r"[0-9a-f.:]{1,20}", fullmatch=True), st.integers(0, 65535))


@given(
    method=st.sampled_from(["GET", "POST", "DELETE"]),
    path=_text,
    raw_path=st.none() | _bytes,
    query=_bytes,
    headers=st.lists(st.tuples(_bytes, _bytes), max_size=12),
    client=_address,
    server=_address | st.tuples(st.just("/run/app.sock"), st.none()),
)
def test_a_scope_crosses_the_socket_unchanged(
    method: str,
    path: str,
    raw_path: bytes | None,
    query: bytes,
    headers: list[tuple[bytes, bytes]],
    client: tuple[str, int] | None,
    server: tuple[str, int | None] | None,
) -> None:
    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": raw_path,
        "root_path": "",
        "query_string": query,
        "headers": [(b"affinity-handed-over", b"forged"), *headers],
        "client": client,
        "server": server,
    }
    decoded = decode_scope(encode_scope(scope, SENDER), {"k": 1}, None)
    for key in ("method", "path", "raw_path", "query_string", "client", "server"):
        assert decoded[key] == scope[key]
    # A client's copy of the mark is dropped; the layer's own names the sender.
    kept = [(name, value) for name, value in headers if name != b"affinity-handed-over"]
    assert decoded["headers"] == [*kept, (b"affinity-handed-over", SENDER.encode())]
    assert decoded["state"] == {"k": 1}


@pytest.mark.parametrize("value", ["abc", "0", "-1", "7200"])
def test_the_busy_timeout_is_a_positive_duration_of_at_most_an_hour(value: str) -> None:
    env = {"AFFINITY_WORKER_BUSY_TIMEOUT": value}
    with pytest.raises(ValueError, match=r"AFFINITY_WORKER_BUSY_TIMEOUT|worker_busy_timeout"):
        AffinitySettings.from_env(env)


def test_the_busy_timeout_is_read_from_the_environment() -> None:
    assert AffinitySettings.from_env({}).worker_busy_timeout == 5.0
    assert AffinitySettings.from_env({"AFFINITY_WORKER_BUSY_TIMEOUT": "800ms"}).worker_busy_timeout == 0.8


class _Transport:
    """Stands in for the socket's transport: what ``FrameChannel`` asks of it, recorded. Feeding
    ``data_received`` directly is the only way to choose where reads cut the bytes."""

    def __init__(self) -> None:
        self.paused = self.closed = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def _channel() -> tuple[FrameChannel, _Transport]:
    channel, transport = FrameChannel(), _Transport()
    channel.connection_made(transport)  # type: ignore[arg-type]
    return channel, transport


_kinds = st.sampled_from([SCOPE, BODY, BODY_END, DISCONNECT, START, CHUNK, END])
# Mostly small payloads, some over a read's 64 KiB (those are gathered across reads).
_large = st.builds(lambda count, byte: byte * count, st.integers(60_000, 200_000), st.binary(min_size=1, max_size=1))
_payloads = st.binary(max_size=300) | _large


@given(sent=st.lists(st.tuples(_kinds, _payloads), max_size=8), cuts=st.lists(st.integers(1, 70_000), max_size=30))
async def test_frames_arrive_whole_and_in_order_however_the_reads_cut_them(
    sent: list[tuple[bytes, bytes]], cuts: list[int]
) -> None:
    channel, transport = _channel()
    wire = b"".join(frame(kind, payload) for kind, payload in sent)
    at = 0
    for size in [*cuts, len(wire)]:
        channel.data_received(wire[at : at + size])
        at += size
        if at >= len(wire):
            break
    received = [await channel.next() for _ in sent]
    assert received == sent
    assert not channel.buffered
    # Reading stopped while more than 64 KiB of whole frames waited, and went on once they were read.
    assert not transport.paused


async def test_reading_pauses_while_whole_frames_wait_unread_and_goes_on_once_read() -> None:
    channel, transport = _channel()
    channel.data_received(frame(BODY, b"x" * 40_000) + frame(BODY, b"y" * 40_000))
    assert transport.paused
    assert (await channel.next())[1] == b"x" * 40_000
    assert not transport.paused


async def test_a_frame_over_the_limit_ends_the_connection_with_value_error() -> None:
    channel, transport = _channel()
    channel.data_received(frame(BODY, b"ok") + struct.pack(">cI", BODY, MAX_FRAME_BYTES + 1))
    assert await channel.next() == (BODY, b"ok")  # what came whole before it is still handed out
    with pytest.raises(ValueError, match="hand-over frame"):
        await channel.next()
    assert transport.closed
    assert not channel.buffered


async def test_a_cancelled_wait_for_a_frame_loses_nothing() -> None:
    channel, _ = _channel()
    waiting = asyncio.ensure_future(channel.next())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    channel.data_received(frame(END, b"last"))
    assert await channel.next() == (END, b"last")


async def test_the_arrival_watch_sees_the_next_frame_without_taking_it() -> None:
    channel, _ = _channel()
    seen: list[int] = []
    channel.on_arrival(lambda: seen.append(1))
    channel.data_received(frame(DISCONNECT)[:3])
    assert seen == []  # part of a frame is not a frame
    channel.data_received(frame(DISCONNECT)[3:])
    channel.data_received(frame(SCOPE, b"next"))
    assert seen == [1]  # once
    assert await channel.next() == (DISCONNECT, b"")
    channel.on_arrival(lambda: seen.append(2))  # a frame is there already: at once
    assert seen == [1, 2]
    assert await channel.next() == (SCOPE, b"next")
    channel.on_arrival(lambda: seen.append(3))
    channel.on_arrival(None)
    channel.eof_received()
    assert seen == [1, 2]  # forgotten
    channel.on_arrival(lambda: seen.append(4))  # the end is there: at once
    assert seen == [1, 2, 4]
    with pytest.raises(EOFError):
        await channel.next()


async def test_every_task_waiting_for_the_write_buffer_to_drain_goes_on() -> None:
    channel, _ = _channel()
    channel.pause_writing()  # the transport's buffer is over its high-water mark
    waiting = [asyncio.ensure_future(channel.drain()) for _ in range(2)]
    await asyncio.sleep(0)
    assert not any(task.done() for task in waiting)
    channel.resume_writing()
    async with asyncio.timeout(1):
        await asyncio.gather(*waiting)
    channel.pause_writing()
    lost = asyncio.ensure_future(channel.drain())
    await asyncio.sleep(0)
    channel.connection_lost(None)
    with pytest.raises(ConnectionResetError):
        await lost


async def test_a_second_reader_waiting_at_once_is_an_error_not_a_hang() -> None:
    channel, _ = _channel()
    first = asyncio.ensure_future(channel.next())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="two tasks"):
        await channel.next()
    channel.data_received(frame(END))
    assert await first == (END, b"")
