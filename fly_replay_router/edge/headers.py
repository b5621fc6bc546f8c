"""Request and response header rewriting at the edge, as the Fly Proxy does it.

References: Fly's "Request headers" (https://fly.io/docs/networking/request-headers/) for the
headers the proxy adds, and "Dynamic request routing with fly-replay"
(https://fly.io/docs/networking/dynamic-request-routing/) for those a client may send.
Client-sent copies of the proxy's own headers are dropped (an app must be able to trust
``fly-replay-src``); hop-by-hop headers (RFC 9110 section 7.6.1) never cross the proxy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fly_replay_router import fly

HOP_BY_HOP = fly.HOP_BY_HOP
# Headers only the proxy may set on a request. The routing headers a client may send are read
# by the edge and not passed on (unspecified by Fly; an app has no use for them).
PROXY_OWNED = frozenset(
    {
        fly.FLY_REPLAY_SRC,
        fly.FLY_REPLAY_FAILED,
        fly.FLY_PREFERRED_INSTANCE_UNAVAILABLE,
        fly.FLY_REPLAY_CACHE_STATUS,
        fly.FLY_REQUEST_ID,
        fly.FLY_CLIENT_IP,
        fly.FLY_REGION,
        fly.FLY_FORWARDED_PORT,
        fly.FLY_FORCE_INSTANCE_ID,
        fly.FLY_PREFER_INSTANCE_ID,
        fly.FLY_REPLAY_CACHE_CONTROL,
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-forwarded-ssl",
        "via",
    }
)
# Response headers addressed to the proxy, never shown to the client.
RESPONSE_CONSUMED = frozenset({fly.FLY_REPLAY, fly.FLY_REPLAY_CACHE, fly.FLY_REPLAY_CACHE_TTL_SECS})

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

Headers = list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class ClientRequest:
    """What the edge learnt from a client's request line and headers.

    ``headers`` is what goes to a machine: the client's end-to-end headers plus the Fly headers.
    ``content_length`` is ``None`` for a body of unknown length (chunked).
    """

    method: str
    path: str
    query: str
    headers: Headers
    force_instance: str | None
    prefer_instance: str | None
    cache_skip: bool
    content_length: int | None
    request_id: str

    @property
    def path_qs(self) -> str:
        """Path and query as sent upstream."""
        return f"{self.path}?{self.query}" if self.query else self.path

    def header_map(self) -> dict[str, str]:
        """Lowercase name -> value (repeated headers joined as HTTP allows; cookies with '; ')."""
        joined: dict[str, str] = {}
        for name, value in self.headers:
            if name in joined:
                joined[name] += ("; " if name == "cookie" else ", ") + value
            else:
                joined[name] = value
        return joined


def new_request_id(region: str) -> str:
    """``<ULID>-<region>``, the shape of Fly's ``Fly-Request-Id``."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    chars = [_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5)]
    return "".join(chars).lower() + f"-{region}"


def read_client_request(scope: Mapping[str, Any], *, region: str, edge_port: int) -> ClientRequest:
    """Split a client's request into routing facts and the headers a machine may see."""
    raw_headers = scope["headers"]
    assert isinstance(raw_headers, list | tuple)
    connection_tokens: set[str] = set()
    incoming: Headers = []
    for raw_name, raw_value in raw_headers:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        if name == "connection":
            connection_tokens.update(token.strip().lower() for token in value.split(","))
        incoming.append((name, value))
    force = prefer = None
    cache_skip = False
    content_length: int | None = 0
    headers: Headers = []
    for name, value in incoming:
        if name == fly.FLY_FORCE_INSTANCE_ID:
            force = value.strip() or None
        elif name == fly.FLY_PREFER_INSTANCE_ID:
            prefer = value.strip() or None
        elif name == fly.FLY_REPLAY_CACHE_CONTROL:
            cache_skip = value.strip().lower() == "skip"
        elif name == "transfer-encoding":
            content_length = None
        elif name == "content-length" and content_length is not None:
            content_length = fly.ascii_decimal(value.strip(), max_digits=20)
        if name in HOP_BY_HOP or name in PROXY_OWNED or name in connection_tokens:
            continue
        headers.append((name, value))
    client = scope.get("client")
    client_ip = str(client[0]) if isinstance(client, list | tuple) and client else "127.0.0.1"
    scheme = str(scope.get("scheme", "http"))
    request_id = new_request_id(region)
    headers += [
        (fly.FLY_CLIENT_IP, client_ip),
        (fly.FLY_REQUEST_ID, request_id),
        (fly.FLY_REGION, region),
        (fly.FLY_FORWARDED_PORT, str(edge_port)),
        ("x-forwarded-for", client_ip),
        ("x-forwarded-proto", scheme),
        ("x-forwarded-port", str(edge_port)),
        ("x-forwarded-ssl", "on" if scheme == "https" else "off"),
        ("via", "1.1 fly.io"),
    ]
    raw_query = scope.get("query_string", b"")
    raw_path = scope.get("raw_path")
    path = raw_path.decode("latin-1") if isinstance(raw_path, bytes) and raw_path else str(scope["path"])
    return ClientRequest(
        method=str(scope["method"]),
        path=path,
        query=raw_query.decode("latin-1") if isinstance(raw_query, bytes) else "",
        headers=headers,
        force_instance=force,
        prefer_instance=prefer,
        cache_skip=cache_skip,
        content_length=content_length,
        request_id=request_id,
    )


def replace_headers(headers: Headers, updates: Headers, *, delete: tuple[str, ...] = ()) -> Headers:
    """``headers`` with every name in ``updates`` or ``delete`` removed, then ``updates`` appended."""
    dropped = {name.lower() for name, _ in updates} | {name.lower() for name in delete}
    return [(name, value) for name, value in headers if name not in dropped] + [
        (name.lower(), value) for name, value in updates
    ]


def response_headers(upstream: list[tuple[bytes, bytes]], *, request_id: str) -> list[tuple[bytes, bytes]]:
    """A machine's response headers as the client gets them: no hop-by-hop, no proxy instructions."""
    connection_tokens: set[bytes] = set()
    for name, value in upstream:
        if name.lower() == b"connection":
            connection_tokens.update(token.strip().lower() for token in value.split(b","))
    kept = [
        (name, value)
        for name, value in upstream
        if (lowered := name.lower().decode("latin-1")) not in HOP_BY_HOP
        and lowered not in RESPONSE_CONSUMED
        and lowered != fly.FLY_REQUEST_ID
        and name.lower() not in connection_tokens
    ]
    kept.append((fly.FLY_REQUEST_ID.encode(), request_id.encode("latin-1")))
    kept.append((b"via", b"1.1 fly.io"))
    return kept
