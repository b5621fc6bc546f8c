"""Rewriting the legacy SSE endpoint event, whatever the chunking and line endings."""

from __future__ import annotations

import pytest

from fly_replay_router.affinity.sse import MAX_SCAN_BYTES, EndpointEventRewriter

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
