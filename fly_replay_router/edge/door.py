"""The edge's HTTP/1.1 connections: a limit on the size of a request's head, and a deadline to send it.

A proxy in front of the internet must not hold whatever a client sends, for as long as it likes,
before a request even starts. Two rules, applied before the ASGI app (``proxy.py``) sees a request:

- **Head size.** The request line and headers together may take ``max_head_bytes`` (64 KiB) and
  ``max_header_count`` fields (100); past either, the edge answers **431 Request Header Fields Too
  Large** (RFC 6585, section 5: https://www.rfc-editor.org/rfc/rfc6585#section-5) and closes the
  connection. Fly's documentation names no figure for its proxy: 64 KiB is four times a common
  16 KiB per-server default and far above an MCP request (a session token is a few hundred bytes,
  a bearer token a few KiB); 100 fields is a common default of HTTP servers. The head is counted as
  it arrives, so an endless header costs at most the limit plus one read, never its whole size.
- **Head deadline.** A connection must deliver a request's complete head within ``head_timeout``
  seconds (30) of opening, or of the first byte of a later request on it; otherwise the edge
  answers **408 Request Timeout** (RFC 9110, section 15.5.9) if part of a head arrived, and closes.
  Unspecified by Fly; 30 s is long enough for any real client on a slow link and ends slowloris
  connections (a head trickled a byte at a time) instead of holding them forever. Between requests,
  uvicorn's own keep-alive timeout closes idle connections.

Refusing while the client is still sending would make its kernel reset the connection before the
answer is read, so after a refusal the edge half-closes and discards what still arrives for a
moment (a "lingering close", RFC 9112, section 9.6) before closing.

This subclasses uvicorn's httptools protocol, the parser the edge runs on (``serve.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fly_replay_router.edge.config import DEFAULT_HEAD_TIMEOUT, DEFAULT_MAX_HEAD_BYTES, DEFAULT_MAX_HEADER_COUNT

# How long a refused connection keeps reading (and discarding) before it closes.
LINGER_SECONDS = 2.0
# Bytes of a head line that are not the name and value: ": " and CRLF.
_FIELD_OVERHEAD = 4

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


@dataclass(frozen=True, slots=True)
class DoorLimits:
    """The front door's rules; ``on_refusal(code, detail)`` is told of each refused request."""

    max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES
    max_header_count: int = DEFAULT_MAX_HEADER_COUNT
    head_timeout: float = DEFAULT_HEAD_TIMEOUT


class _HeadRefused(Exception):
    """Raised inside the parser's callback to stop it: the head broke a limit."""


def door_protocol(limits: DoorLimits, on_refusal: Callable[[str, str], None] | None = None) -> type[HttpToolsProtocol]:
    """A uvicorn HTTP protocol class (``uvicorn.Config(http=...)``) that applies ``limits``."""
    members: dict[str, object] = {"limits": limits}
    if on_refusal is not None:
        members["on_refusal"] = staticmethod(on_refusal)
    return type("FrontDoorProtocol", (FrontDoorProtocol,), members)


class FrontDoorProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head size limit (431) and a head deadline (408)."""

    limits: DoorLimits = DoorLimits()
    on_refusal: Callable[[str, str], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.limits.head_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: read and drop until the connection closes
        self._unset_keepalive_if_required()
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadRefused):
                self._refuse(431, str(exc.__context__))
                return
            self._bad_request()
            return
        except httptools.HttpParserError:
            self._bad_request()
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._in_head and self._head_bytes > self.limits.max_head_bytes:
            self._refuse(431, f"request head over {self.limits.max_head_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:  # a later request on a kept-alive connection
            self._head_timer = self.loop.call_later(self.limits.head_timeout, self._head_timed_out)

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= self.limits.max_header_count:
            raise _HeadRefused(f"more than {self.limits.max_header_count} header fields")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        size = len(self.url) + sum(len(name) + len(value) + _FIELD_OVERHEAD for name, value in self.headers)
        if size > self.limits.max_head_bytes:
            raise _HeadRefused(f"request head of {size} bytes, over {self.limits.max_head_bytes}")
        self._in_head = False
        self._head_bytes = 0
        self._stop_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._in_head:
            return
        if self._head_bytes == 0:
            self.transport.close()  # nothing asked, nothing to answer
            return
        self._refuse(408, f"request head not complete within {self.limits.head_timeout:g}s")

    def _bad_request(self) -> None:
        self.logger.info("invalid HTTP request received; answered 400")
        self.send_400_response("Invalid HTTP request received.")

    def _refuse(self, status: int, detail: str) -> None:
        self._refused = True
        self._stop_head_timer()
        if self.on_refusal is not None:
            self.on_refusal("header_too_large" if status == 431 else "header_timeout", detail)
        body = f"{status}: {detail}\n".encode()
        head = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])
        head += b"content-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(
            body
        )
        self.transport.write(head + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)
