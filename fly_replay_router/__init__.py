"""fly-replay-router: session affinity for stateful MCP servers on many Fly Machines.

Importing it loads the layer only: no MCP SDK, no web framework, nothing registered globally.
"""

from fly_replay_router.affinity.metrics import register_metrics
from fly_replay_router.affinity.middleware import AffinityMiddleware
from fly_replay_router.hosts import transport_security
from fly_replay_router.mount import FlyMCPApp, load_settings, wrap_mcp_app
from fly_replay_router.settings import AffinitySettings
from fly_replay_router.streaming import UncompressedStreamsMiddleware

__all__ = [
    "AffinityMiddleware",
    "AffinitySettings",
    "FlyMCPApp",
    "UncompressedStreamsMiddleware",
    "load_settings",
    "register_metrics",
    "transport_security",
    "wrap_mcp_app",
]
