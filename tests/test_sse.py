"""Rewriting the legacy SSE endpoint event, whatever the chunking and line endings."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fly_replay_router.affinity.capacity import LiveSessions
from fly_replay_router.affinity.rewrite import Watcher
from fly_replay_router.affinity.sse import MAX_SCAN_BYTES, SDK_MESSAGE_START, EndpointEventRewriter, passes_untouched
from fly_replay_router.protocol import SDK_EVENT_STREAM_TYPE

INNER = "7da4e80665bd4c6fb73231d63f0c227f"


def wrap(inner: str) -> str:
    return f"TOKEN-FOR-{inner}"


def run(chunks: list[bytes]) -> tuple[bytes, list[bytes]]:
    rewriter = EndpointEventRewriter(wrap)
    sent = [rewriter.feed(chunk) for chunk in chunks]
    sent.append(rewriter.flush())
    return b"".join(sent), sent


@pytest.mark.parametrize("eol", [b"\r\n", b"\n", b"\r"])
def test_endpoint_event_carries_the_token_with_any_line_ending(eol: bytes) -> None:
    event = b"event: endpoint" + eol + b"data: /messages/?session_id=" + INNER.encode() + eol + eol
    message = b"event: message" + eol + b'data: {"jsonrpc":"2.0"}' + eol + eol
    body, _ = run([event, message])
    assert body == event.replace(INNER.encode(), wrap(INNER).encode()) + message


def test_event_split_across_chunks_is_held_until_complete_then_sent_whole() -> None:
    event = b"event: endpoint\r\ndata: /prefix/messages/?session_id=" + INNER.encode() + b"\r\n\r\n"
    chunks = [event[i : i + 7] for i in range(0, len(event), 7)]
    body, sent = run(chunks)
    assert body == event.replace(INNER.encode(), wrap(INNER).encode())
    assert sent[-2] == body  # nothing went out before the event was complete


def test_comments_before_the_endpoint_event_pass_and_later_bytes_are_untouched() -> None:
    ping = b": ping\r\n\r\n"
    event = b"event: endpoint\r\ndata: /messages/?a=1&session_id=" + INNER.encode() + b"&b=2\r\n\r\n"
    later = b"event: message\r\ndata: session_id=" + INNER.encode() + b"\r\n\r\n"
    body, _ = run([ping + event, later])
    assert body == ping + event.replace(INNER.encode(), wrap(INNER).encode()) + later


def test_a_stream_that_starts_with_another_event_is_passed_through() -> None:
    message = b'event: message\r\ndata: {"x": "?session_id=abc"}\r\n\r\n'
    rewriter = EndpointEventRewriter(wrap)
    assert rewriter.feed(message) == message
    assert rewriter.done
    assert rewriter.feed(b"anything") == b"anything"


def test_scanning_gives_up_after_the_limit_without_losing_bytes() -> None:
    blob = b"x" * (MAX_SCAN_BYTES + 10)
    body, _ = run([blob[:100], blob[100:]])
    assert body == blob


def test_an_unfinished_event_is_flushed_unchanged_at_the_end() -> None:
    body, _ = run([b"event: endpoint\r\ndata: /messages/?session_id=abc"])
    assert body == b"event: endpoint\r\ndata: /messages/?session_id=abc"


# The event stream as a client reads it (HTML "Interpreting an event stream"): the dispatched events'
# types and data, after a leading BOM is dropped and lines end in CRLF, LF or CR.
def parse(stream: bytes) -> list[tuple[str, str]]:
    events: list[tuple[str, str]] = []
    kind, data = "", list[str]()
    for line in stream.removeprefix(b"\xef\xbb\xbf").decode().splitlines(keepends=True):
        if line.rstrip("\r\n") == "":
            if line[-1:] not in "\r\n":
                break  # an unfinished last line is dropped
            if data:
                events.append((kind or "message", "\n".join(data)))
            kind, data = "", list[str]()
            continue
        if line[-1:] not in "\r\n":
            break
        field, _, value = line.rstrip("\r\n").partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            kind = value
        elif field == "data":
            data.append(value)
    return events


def test_the_reference_parser_reads_the_sdks_endpoint_event() -> None:
    stream = b"event: endpoint\r\ndata: /messages/?session_id=" + INNER.encode() + b"\r\n\r\n"
    assert parse(stream) == [("endpoint", f"/messages/?session_id={INNER}")]


@pytest.mark.parametrize(
    "stream",
    [
        # A byte order mark before the first event: clients drop it, and so must the scan.
        b"\xef\xbb\xbfevent: endpoint\r\ndata: /messages/?session_id=" + INNER.encode() + b"\r\n\r\n",
        # Lines ended by CR alone after a comment: each line still starts after the CR.
        b": hello\revent: endpoint\rdata: /messages/?session_id=" + INNER.encode() + b"\r\r",
        # A CR then a CRLF: an empty line, so the event has ended.
        b"event: endpoint\rdata: /messages/?session_id=" + INNER.encode() + b"\r\r\n",
        # The type given after the data, in a later chunk than the event's start.
        b"data: /messages/?session_id=" + INNER.encode() + b"\nevent:endpoint\n\n",
        # A retry field and an id before anything is named.
        b"retry: 10\n\nid: 7\n\nevent: endpoint\ndata: /messages/?session_id=" + INNER.encode() + b"\n\n",
    ],
)
def test_no_endpoint_event_leaves_with_the_inner_id_however_it_is_written(stream: bytes) -> None:
    for size in (1, 2, 7, len(stream)):
        body, _ = run([stream[i : i + size] for i in range(0, len(stream), size)])
        events = parse(body)
        assert ("endpoint", f"/messages/?session_id={wrap(INNER)}") in events, (size, body)
        assert INNER.encode() not in body.replace(wrap(INNER).encode(), b"")


@pytest.mark.parametrize(
    "chunk",
    [
        b'event: message\r\ndata: {"jsonrpc":"2.0"}\r\n\r\n',  # the SDK's answers
        b"\xef\xbb\xbfevent: message\r\ndata: {}\r\n\r\n",  # a byte order mark: the type is still message
        b"data: {}\n\n",
        b": ping\r\rdata: x\r\r",
    ],
)
def test_a_first_chunk_of_complete_events_of_another_type_goes_on_as_the_same_object(chunk: bytes) -> None:
    assert passes_untouched(chunk)
    rewriter = EndpointEventRewriter(wrap)
    assert rewriter.feed(chunk) is chunk
    assert rewriter.done


@pytest.mark.parametrize(
    "chunk",
    [
        b"event: endpoint\r\ndata: /messages/?session_id=abc\r\n\r\n",  # an endpoint event
        b"event: message\r\nevent: endpoint\r\ndata: /x?session_id=abc\r\n\r\n",  # typed twice: the last wins
        b"event: message\r\ndata: {}\r\n",  # not complete: the type may still change
        b": ping\r\n\r\nevent: endpoint\r\ndata: /x?session_id=abc\r\n\r\n",  # a comment first
        b"event: message\r\ndatax: {}\r\n\r\n",  # no data field: nothing dispatched yet
        b"event: message\r\n\r\n",  # a type alone dispatches nothing
        b"",
    ],
)
def test_only_a_complete_named_event_that_cannot_be_an_endpoint_passes_untouched(chunk: bytes) -> None:
    assert not passes_untouched(chunk)


EVENT_LINES = st.sampled_from(
    [
        b": comment",
        b"id: 1",
        b"retry: 5",
        b"event: endpoint",
        b"event:endpoint",
        b"event: message",
        b"data: /messages/?session_id=" + INNER.encode(),
        b'data: {"jsonrpc":"2.0"}',
        b"data",
    ]
)
LINE_ENDS = st.sampled_from([b"\r\n", b"\n", b"\r"])


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    stream = draw(st.sampled_from([b"", b"\xef\xbb\xbf"]))
    for _ in range(draw(st.integers(1, 4))):
        for line in draw(st.lists(EVENT_LINES, min_size=0, max_size=4)):
            stream += line + draw(LINE_ENDS)
        stream += draw(LINE_ENDS)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    return stream, cuts


@settings(max_examples=400, deadline=None)
@given(streams())
def test_the_first_event_a_client_sees_as_endpoint_names_a_token_and_nothing_else_changes(
    case: tuple[bytes, list[int]],
) -> None:
    stream, cuts = case
    bounds = [0, *cuts, len(stream)]
    body, _ = run([stream[a:b] for a, b in itertools.pairwise(bounds)])
    before, after = parse(stream), parse(body)
    assert len(after) == len(before)
    if before and before[0][0] == "endpoint" and "session_id=" in before[0][1]:
        # The stream's first event is the endpoint event: the client reads a token in it.
        assert after[0] == ("endpoint", before[0][1].replace(INNER, wrap(INNER))), (stream, body)
        assert after[1:] == before[1:]
    else:
        # Anything else: at most one session_id rewritten, and every event still there.
        assert [kind for kind, _ in after] == [kind for kind, _ in before]


class _Layer:
    """What a Watcher asks of the layer, with tokens made as ``wrap`` makes them."""

    lazy_channel = False

    def __init__(self) -> None:
        self.live = LiveSessions(idle_timeout=60.0)

    def issue_token(self, inner_session_id: str) -> str:
        return wrap(inner_session_id)

    def served_by(self, headers: object) -> bytes:
        return b"machine=m;worker=w;via=direct"

    def admit(self, scope: object, *, legacy: bool, admitted: bool) -> None:
        return None

    async def refuse(self, scope: object, send: object, refusal: object) -> None:
        raise AssertionError("nothing is refused here")

    def record_refusal(self, scope: object, refusal: object) -> None:
        raise AssertionError("nothing is refused here")

    async def minting(self, scope: object) -> None:
        return None


def through_watcher(chunks: list[bytes], served: bytes | None) -> bytes:
    """The body a client gets when a POST's event stream answer, sent in ``chunks``, goes through a Watcher."""
    sent: list[bytes] = []

    async def downstream(message: dict[str, object]) -> None:
        if message["type"] == "http.response.body":
            sent.append(message["body"])  # type: ignore[arg-type]

    scope = {"type": "http", "method": "POST", "path": "/mcp", "headers": []}
    watcher = Watcher(scope, downstream, _Layer(), served, b"token" if served else None, False, None)  # type: ignore[arg-type]

    async def answer() -> None:
        await watcher.send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", SDK_EVENT_STREAM_TYPE)]}
        )
        for chunk in chunks:
            await watcher.send({"type": "http.response.body", "body": chunk, "more_body": True})
        await watcher.send({"type": "http.response.body", "body": b"", "more_body": False})

    asyncio.run(answer())
    return b"".join(sent)


@settings(max_examples=300, deadline=None)
@given(streams(), st.booleans(), st.sampled_from([None, b"inner-of-the-post"]))
def test_a_watched_stream_that_opens_as_the_sdk_writes_it_is_read_as_the_rewriter_reads_it(
    case: tuple[bytes, list[int]], sdk_opening: bool, served: bytes | None
) -> None:
    # The watcher decides a first chunk that opens with SDK_MESSAGE_START without passes_untouched:
    # whatever follows the opening (the generated lines are fields of the same first event, after
    # its data line), the client must get what the full rewriter gives.
    stream, cuts = case
    if sdk_opening:
        opening = SDK_MESSAGE_START + b" {}\r\n"
        stream, cuts = opening + stream.removeprefix(b"\xef\xbb\xbf"), [len(opening) + cut for cut in cuts]
    bounds = [0, *cuts, len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    assert through_watcher(chunks, served) == run(chunks)[0], stream


@pytest.mark.parametrize(
    "chunk",
    [
        SDK_MESSAGE_START + b" {}\r\nevent: endpoint\r\ndata: /messages/?session_id=" + INNER.encode() + b"\r\n\r\n",
        SDK_MESSAGE_START + b" {}\r\n",  # not complete: an event field may still follow
        SDK_MESSAGE_START + b" /messages/?session_id=" + INNER.encode() + b"\r\nevent:endpoint\r\n\r\n",
    ],
)
def test_an_sdk_opening_does_not_let_an_endpoint_event_through(chunk: bytes) -> None:
    rest = b"event: endpoint\r\ndata: /messages/?session_id=" + INNER.encode() + b"\r\n\r\n"
    body = through_watcher([chunk, rest], None)
    assert body == run([chunk, rest])[0]
    # The first event a client dispatches is an endpoint event, and it names the token.
    kind, data = parse(body)[0]
    assert kind == "endpoint", body
    assert data.endswith(f"session_id={wrap(INNER)}"), body
