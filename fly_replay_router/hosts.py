"""The MCP SDK's DNS-rebinding check, opened to the hosts this app is really reached on.

The SDK answers 421 to any ``Host`` outside its allowlist, and its default allowlist is loopback
only: behind ``<app>.fly.dev`` every request would fail. Allowed hosts match exactly, or as
``name:*`` for any port; the SDK has no subdomain wildcards.

Reference: the SDK's ``mcp/server/transport_security.py``; MCP "Transports", security warning
(validate ``Origin``: https://modelcontextprotocol.io/specification/2025-11-25/basic/transports).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fly_replay_router.settings import AffinitySettings

if TYPE_CHECKING:
    from mcp.server.transport_security import TransportSecuritySettings

LOOPBACK_HOSTS = ("127.0.0.1:*", "localhost:*", "[::1]:*")


def allowed_hosts(settings: AffinitySettings) -> list[str]:
    """Loopback, ``<app_name>.fly.dev`` and ``settings.allowed_hosts``: the ``Host`` values to accept.

    For any SDK that takes a list (PrefectHQ FastMCP's ``http_app(allowed_hosts=...)``, say).
    """
    public = f"{settings.app_name}.fly.dev"
    return [*LOOPBACK_HOSTS, public, f"{public}:*", *settings.allowed_hosts]


def allowed_origins(settings: AffinitySettings) -> list[str]:
    """The ``Origin`` values that go with ``allowed_hosts``: each host over https and http."""
    return [f"{scheme}://{host}" for host in allowed_hosts(settings) for scheme in ("https", "http")]


def transport_security(settings: AffinitySettings) -> TransportSecuritySettings:
    """The official SDK's ``TransportSecuritySettings`` (mcp 1.x and 2.x) for ``allowed_hosts``.

    The SDK is imported only when this is called.
    """
    from mcp.server.transport_security import TransportSecuritySettings

    return TransportSecuritySettings(allowed_hosts=allowed_hosts(settings), allowed_origins=allowed_origins(settings))
