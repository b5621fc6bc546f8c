"""The MCP SDK's DNS-rebinding check, opened to the hosts this app is really reached on.

The SDK answers 421 to any ``Host`` outside its allowlist, and its default allowlist is loopback
only: behind ``<app>.fly.dev`` every request would fail. Allowed hosts match exactly, or as
``name:*`` for any port; the SDK has no subdomain wildcards.

Reference: ``mcp/server/transport_security.py``; ``shared/reference/mcp-sessions.md``.
"""

from __future__ import annotations

from mcp.server.transport_security import TransportSecuritySettings

from app.settings import AffinitySettings

LOOPBACK_HOSTS = ("127.0.0.1:*", "localhost:*", "[::1]:*")


def transport_security(settings: AffinitySettings) -> TransportSecuritySettings:
    """Allow loopback, ``<app_name>.fly.dev`` and ``settings.allowed_hosts``, with their origins."""
    public = f"{settings.app_name}.fly.dev"
    hosts = [*LOOPBACK_HOSTS, public, f"{public}:*", *settings.allowed_hosts]
    origins = [f"{scheme}://{host}" for host in hosts for scheme in ("https", "http")]
    return TransportSecuritySettings(allowed_hosts=hosts, allowed_origins=origins)
