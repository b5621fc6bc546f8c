"""fly-replay-router: session affinity for stateful MCP servers on many Fly Machines.

The public names below load on first use (PEP 562), so that importing a part of the package (the
Fly grammar, the edge) does not load the layer, and nothing here imports an MCP SDK or registers
global state.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fly_replay_router.affinity.metrics import register_metrics as register_metrics
    from fly_replay_router.affinity.middleware import AffinityMiddleware as AffinityMiddleware
    from fly_replay_router.hosts import transport_security as transport_security
    from fly_replay_router.mount import FlyMCPApp as FlyMCPApp
    from fly_replay_router.mount import load_settings as load_settings
    from fly_replay_router.mount import wrap_mcp_app as wrap_mcp_app
    from fly_replay_router.settings import AffinitySettings as AffinitySettings
    from fly_replay_router.streaming import UncompressedStreamsMiddleware as UncompressedStreamsMiddleware

_HOMES = {
    "AffinityMiddleware": "fly_replay_router.affinity.middleware",
    "AffinitySettings": "fly_replay_router.settings",
    "FlyMCPApp": "fly_replay_router.mount",
    "UncompressedStreamsMiddleware": "fly_replay_router.streaming",
    "load_settings": "fly_replay_router.mount",
    "register_metrics": "fly_replay_router.affinity.metrics",
    "transport_security": "fly_replay_router.hosts",
    "wrap_mcp_app": "fly_replay_router.mount",
}
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


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'fly_replay_router' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
