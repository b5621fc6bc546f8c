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


def transport_security(settings: AffinitySettings) -> TransportSecuritySettings:
    """Allow loopback, ``<app_name>.fly.dev`` and ``settings.allowed_hosts``, with their origins.

    For the official SDK (mcp 1.x and 2.x), which is imported only when this is called.
    """
    from mcp.server.transport_security import TransportSecuritySettings

    public = f"{settings.app_name}.fly.dev"
    hosts = [*LOOPBACK_HOSTS, public, f"{public}:*", *settings.allowed_hosts]
    origins = [f"{scheme}://{host}" for host in hosts for scheme in ("https", "http")]
    return TransportSecuritySettings(allowed_hosts=hosts, allowed_origins=origins)
