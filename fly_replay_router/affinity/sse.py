"""Rewriting the session id in the legacy (2024-11-05) SSE ``endpoint`` event, as the stream passes.

The SDK opens ``GET /sse`` with ``event: endpoint`` whose data is a relative URL such as
``/messages/?session_id=<32 hex>``. The client posts every message to that URL, so the id in it
must become a token like the ``Mcp-Session-Id`` header does. Only the events before the endpoint
event are held back (at most ``MAX_SCAN_BYTES``); everything after it streams through untouched.

Reference: HTML "Server-sent events" (an event ends at a blank line; lines end in CRLF, LF or CR);
``mcp/server/sse.py`` (the endpoint event).
"""

from __future__ import annotations

import re
from collections.abc import Callable

MAX_SCAN_BYTES = 16 * 1024

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_ENDPOINT_LINE = re.compile(rb"^event:[ ]?endpoint[\r\n]", re.MULTILINE)
_NAMED_EVENT_LINE = re.compile(rb"^(?:event|data):", re.MULTILINE)
_SESSION_PARAM = re.compile(rb"([?&]session_id=)([^&#\r\n]+)")


class EndpointEventRewriter:
    """Feed it the body chunks of an SSE response; it returns what may be sent on.

    ``wrap`` turns the inner session id into a token. Once the endpoint event has passed (or an
    event that is not one, or ``MAX_SCAN_BYTES`` without a complete event), ``done`` is true and
    every later chunk should be sent as it is.
    """

    def __init__(self, wrap: Callable[[str], str]) -> None:
        self._wrap = wrap
        self._pending = b""
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send now; may be empty while the first events are incomplete."""
        if self.done:
            return chunk
        data = self._pending + chunk
        out = bytearray()
        while True:
            end = _EVENT_END.search(data)
            if end is None:
                if len(data) > MAX_SCAN_BYTES:
                    self._finish()
                    return bytes(out) + data
                self._pending = data
                return bytes(out)
            event, data = data[: end.end()], data[end.end() :]
            if _ENDPOINT_LINE.search(event):
                out += _SESSION_PARAM.sub(self._replace, event, count=1)
                self._finish()
                return bytes(out) + data
            out += event
            if _NAMED_EVENT_LINE.search(event):
                # Any other event first means this stream carries no endpoint event.
                self._finish()
                return bytes(out) + data

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
