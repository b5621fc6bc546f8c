"""Where a request carries a session id: read exactly as the server behind the layer reads it, or refused.

A session id reaches an MCP server in one of two carriers:

- the ``Mcp-Session-Id`` request header (Streamable HTTP), which the official SDK reads with
  Starlette's ``request.headers.get``: the first header of that (lowercase, as ASGI requires) name;
- the ``session_id`` query parameter (the 2024-11-05 HTTP+SSE transport's message posts), which the
  SDK reads with ``request.query_params.get``: Starlette's ``QueryParams``, that is
  ``urllib.parse.parse_qsl(query.decode("latin-1"), keep_blank_values=True)``, where ``&`` alone
  separates fields, ``+`` is a space, names and values are percent-decoded as UTF-8 (invalid
  sequences become U+FFFD), a field without ``=`` has an empty value, and the *last* repeated
  name wins.

The layer must route on the very value the server will use, or a request could show the layer one
value (a token) and the server another (a raw inner id). So a carrier is found with the same
decoding, byte for byte, and whatever could be read two ways is refused (404, ``ambiguous_carrier``):

- more than one ``Mcp-Session-Id`` header, or more than one ``session_id`` field;
- a header and a query carrier together;
- a field that another common parser would read as ``session_id``: ``;`` as a separator (old
  ``parse_qs``, several frameworks), a name that decodes to it only after a second decoding, in
  another case, with spaces or NULs around it, or with a ``[...]`` suffix (PHP, Rack).

A query without ``%`` and without ``session_id`` (in any case) cannot spell the name, so the common
case costs one scan of the query bytes.

References: MCP transports (https://modelcontextprotocol.io/specification/2025-11-25/basic/transports,
and 2024-11-05 "HTTP with SSE"); WHATWG URL "application/x-www-form-urlencoded parsing"; Python's
``urllib.parse.parse_qsl``; RFC 3986 section 2.1 (percent-encoding).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

from fly_replay_router.protocol import LEGACY_SESSION_PARAMETER

_NAME_BYTES = LEGACY_SESSION_PARAMETER.encode("ascii")
# Characters a lenient parser may drop around a field name.
_LOOSE_STRIP = " \t\r\n\x00\x0b\x0c"


class AmbiguousCarrier(Exception):
    """The request carries a session id that could be read more than one way: it must be refused."""


@dataclass(frozen=True, slots=True)
class QueryCarrier:
    """The one ``session_id`` field of a query string: its value as the server decodes it, and where it is.

    ``start`` and ``end`` delimit the whole field (name, ``=`` and value) in the raw query bytes.
    """

    value: str
    start: int
    end: int

    def replaced(self, query: bytes, inner_session_id: bytes) -> bytes:
        """``query`` with this field saying ``session_id=<inner_session_id>`` instead; the rest untouched."""
        return query[: self.start] + _NAME_BYTES + b"=" + inner_session_id + query[self.end :]


def find_query_carrier(query: bytes) -> QueryCarrier | None:
    """The ``session_id`` field of a query string, ``None`` if it has none.

    Raises ``AmbiguousCarrier`` for a repeated field or any field that another parser could take
    for ``session_id``.
    """
    if query.find(b"%") < 0 and query.lower().find(_NAME_BYTES) < 0:  # find: see sse.passes_untouched
        return None
    text = query.decode("latin-1")
    found: QueryCarrier | None = None
    position = 0
    for field in text.split("&"):
        start, position = position, position + len(field) + 1
        if not field:
            continue
        raw_name, _, raw_value = field.partition("=")
        pieces = field.split(";")
        if _decode(raw_name) == LEGACY_SESSION_PARAMETER:
            if found is not None:
                raise AmbiguousCarrier
            found = QueryCarrier(_decode(raw_value), start, start + len(field))
            pieces = pieces[1:]
        if any(_loosely_names_carrier(piece.partition("=")[0]) for piece in pieces):
            raise AmbiguousCarrier
    return found


def _decode(part: str) -> str:
    # parse_qsl's own steps, so the value is the one Starlette's QueryParams hands the server.
    return unquote(part.replace("+", " "), encoding="utf-8", errors="replace")


def _loosely_names_carrier(raw_name: str) -> bool:
    name = _decode(_decode(raw_name)).strip(_LOOSE_STRIP).lower()
    if name.endswith("]") and "[" in name:
        name = name[: name.index("[")].rstrip(_LOOSE_STRIP)
    return name == LEGACY_SESSION_PARAMETER
