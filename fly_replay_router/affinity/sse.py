"""Rewriting the session id in the legacy (2024-11-05) SSE ``endpoint`` event, as the stream passes.

The SDK opens ``GET /sse`` with ``event: endpoint`` whose data is a relative URL such as
``/messages/?session_id=<32 hex>``. The client posts every message to that URL, so the id in it
must become a token like the ``Mcp-Session-Id`` header does. Only the events before the endpoint
event are held back (at most ``MAX_SCAN_BYTES``); everything after it streams through untouched.

The first event a client dispatches (one with a ``data`` field) decides: an endpoint event is
rewritten, any other type means the stream carries none. Events that dispatch nothing (comments,
``id``, ``retry``) pass on while the scan goes on. Every event stream the layer passes is watched
this way (a Streamable HTTP answer included), so the usual first chunk, complete events of
another type, costs three byte tests and no copy (``passes_untouched``; the watcher tests a chunk
that opens as the SDKs write it, ``SDK_MESSAGE_START``, inline).

Reference: HTML "Server-sent events", "Interpreting an event stream" (lines end in CRLF, LF or
CR; an empty line ends an event; ``event:`` with one optional space names it:
https://html.spec.whatwg.org/multipage/server-sent-events.html); ``mcp/server/sse.py`` (the
endpoint event).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from fly_replay_router.protocol import ENDPOINT_SESSION_PARAM

MAX_SCAN_BYTES = 16 * 1024

ENDPOINT = b"endpoint"
# How the SDKs' first chunk opens: sse-starlette writes a message event's type, then its data, with
# CRLF line ends (``rewrite.Watcher`` decides such a chunk without calling ``passes_untouched``).
SDK_MESSAGE_START = b"event: message\r\ndata:"
# An empty line at the end of a chunk: every event in it is complete.
_ENDS_WITH_EMPTY_LINE = (b"\n\r\n", b"\n\n", b"\r\r", b"\r\r\n", b"\r\n\r", b"\n\r")  # CRLF CRLF first
# A stream may open with a byte order mark, which parsers drop before the first line.
_BOM = b"\xef\xbb\xbf"
_LINE_ENDS = frozenset({b"\r\n", b"\n", b"\r"})


def event_end(data: bytes, start: int = 0) -> int:
    """The index just past the first empty line at or after ``start`` (the end of an event), or -1.

    A line ends in CRLF, LF or CR; an empty line is a line end alone. A CR that ends ``data`` may
    be the first half of a CRLF: the event ends at it all the same, and the LF that may follow is
    an empty event of its own.
    """
    position = start
    # bytes.splitlines ends lines at CRLF, LF and CR: the SSE line ends, and nothing else.
    for line in data[start:].splitlines(keepends=True):
        position += len(line)
        if line in _LINE_ENDS:
            return position
    return -1


def dispatched_type(event: bytes) -> bytes | None:
    """The type a client gives this event (its last ``event`` field, ``message`` without one), or None if
    it dispatches nothing (no ``data`` field: comments, ``id``, ``retry``, a type alone)."""
    kind = b"message"
    has_data = False
    # bytes.splitlines ends lines at CRLF, LF and CR: the SSE line ends, and nothing else.
    for line in event.splitlines():
        name, _, value = line.partition(b":")
        if name == b"data":
            has_data = True
        elif name == b"event":
            kind = value.removeprefix(b" ")
    return kind if has_data else None


def passes_untouched(chunk: bytes) -> bool:
    """The first chunk of a stream decides it without a rewriter: every event in it is complete, one
    of them dispatches (a ``data:`` line), and none can be an endpoint event (no ``endpoint`` at all).

    Three byte tests, where reading the events line by line costs several times more: the usual
    stream (``event: message``, the Streamable HTTP answers) goes on untouched. False means only
    that a rewriter must look (``EndpointEventRewriter``). Not ``in``: CPython's
    ``bytes.__contains__`` first tries its operand as an integer, and the ``TypeError`` it makes and
    drops costs more than the search; ``partition`` takes its one argument without parsing a tuple
    of them, as ``find`` does, and a slice compares the usual ending cheaper than ``endswith``.
    """
    return (
        (chunk[-3:] == b"\n\r\n" or chunk.endswith(_ENDS_WITH_EMPTY_LINE))
        and (chunk.find(b"\ndata:") >= 0 or chunk.startswith(b"data:") or chunk.find(b"\rdata:") >= 0)
        and not chunk.partition(ENDPOINT)[1]
    )


def _rewrite_data(event: bytes, replace: Callable[[re.Match[bytes]], bytes]) -> bytes:
    """``event`` with every ``session_id`` of its ``data`` lines replaced (a client joins them into one
    URL); every other byte as it was."""
    lines = event.splitlines(keepends=True)
    for index, line in enumerate(lines):
        if line.partition(b":")[0] == b"data":
            lines[index] = ENDPOINT_SESSION_PARAM.sub(replace, line)
    return b"".join(lines)


class EndpointEventRewriter:
    """Feed it the body chunks of an SSE response; it returns what may be sent on.

    ``wrap`` turns the inner session id into a token. Once the endpoint event has passed (or an
    event that is not one, or ``MAX_SCAN_BYTES`` without a complete event), ``done`` is true and
    every later chunk should be sent as it is. A chunk that needs no change is returned as it came
    (the same object).
    """

    __slots__ = ("_pending", "_started", "_wrap", "done")

    def __init__(self, wrap: Callable[[str], str]) -> None:
        self._wrap = wrap
        self._pending = b""
        self._started = False  # the stream's first event has been seen
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send now; may be empty while the first events are incomplete."""
        if self.done:
            return chunk
        data = self._pending + chunk if self._pending else chunk
        passed = 0  # data[:passed]: whole events that may go on as they are
        while True:
            end = event_end(data, passed)
            if end < 0:
                if len(data) - passed > MAX_SCAN_BYTES:
                    self._finish()
                    return data
                self._pending = data[passed:]
                return data[:passed]
            event = data[passed:end]
            if not self._started:
                self._started = True
                if event.startswith(_BOM):  # sent on as it came, left out of the reading
                    event, passed = event[len(_BOM) :], passed + len(_BOM)
            kind = dispatched_type(event)
            if kind == ENDPOINT:
                self._finish()
                return data[:passed] + _rewrite_data(event, self._replace) + data[end:]
            passed = end
            if kind is not None:
                # Any other event first means this stream carries no endpoint event.
                self._finish()
                return data

    def flush(self) -> bytes:
        """What is still held back, for the last body message of the response."""
        pending, self._pending = self._pending, b""
        self._finish()
        return pending

    def _finish(self) -> None:
        self.done = True
        self._pending = b""

    def _replace(self, match: re.Match[bytes]) -> bytes:
        inner_session_id = match.group(2).decode("ascii", errors="replace")
        return match.group(1) + self._wrap(inner_session_id).encode("ascii")
