"""Who may use the edge's own endpoints (``/_edge/``): requests addressed to the edge, from no foreign page.

The control surface stops, suspends and kills machines and has no authentication: it is meant for
the person at the keyboard. Two checks keep a web page in their browser from driving it:

- the ``Host`` header must name the edge itself (a loopback name, or the address it listens on) with
  its port: a DNS-rebinding page reaches the edge under its own host name and is refused (the
  defence RFC 9110 section 7.2 makes possible, and that local dev servers use against rebinding);
- an ``Origin`` header, when present, must be the edge's own origin: a foreign page's ``fetch`` or
  form post carries its own origin (RFC 6454; ``null`` from sandboxed or opaque contexts is foreign).

Requests for the machines (every other path) are not checked here: on Fly they reach the app, whose
own Host allowlist decides.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from fly_replay_router.asgi import Scope

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_WILDCARDS = ("0.0.0.0", "::", "")


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` keeps the edge reachable from this computer only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def edge_names(listen_host: str) -> tuple[str, ...]:
    """The host names a request may address the edge by when it listens on ``listen_host``."""
    names = list(LOOPBACK_NAMES)
    if listen_host in _WILDCARDS:
        # Every interface: this computer's names and addresses (what another host would type).
        hostname = socket.gethostname()
        names += [hostname, socket.getfqdn()]
        with contextlib.suppress(OSError):
            names += [str(info[4][0]) for info in socket.getaddrinfo(hostname, None)]
    else:
        names.append(listen_host.strip("[]"))
    return tuple(dict.fromkeys(name.lower() for name in names if name))


def refusal(scope: Scope, names: Iterable[str], port: int) -> str | None:
    """Why a request under ``/_edge/`` is refused (403), or ``None`` when it is the edge's own."""
    allowed = {name.lower() for name in names}
    host = origin = None
    for name, value in scope["headers"]:
        if name == b"host":
            host = value.decode("latin-1")
        elif name == b"origin":
            origin = value.decode("latin-1")
    if host is None:
        return "a request to the edge's own endpoints must carry a Host header"
    if _split_host(host) not in {(name, port) for name in allowed}:
        return (
            f"Host {host[:100]!r} is not this edge's address (port {port}); /_edge/ answers only requests "
            "addressed to the edge, so that a web page cannot reach it through DNS rebinding"
        )
    if origin is not None:
        parts = urlsplit(origin)
        try:
            origin_port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            origin_port = -1
        if parts.scheme not in ("http", "https") or ((parts.hostname or ""), origin_port) not in {
            (name, port) for name in allowed
        }:
            return f"Origin {origin[:100]!r} is foreign: /_edge/ answers the edge's own page and tools without one"
    return None


def _split_host(value: str) -> tuple[str, int]:
    """``127.0.0.1:8080`` / ``[::1]:8080`` / ``localhost`` -> (lowercase name, port; 80 when absent)."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        name, _, port_text = value.partition(":")
    if not port_text:
        return name, 80
    return (name, int(port_text)) if port_text.isascii() and port_text.isdigit() and len(port_text) <= 5 else (name, -1)
