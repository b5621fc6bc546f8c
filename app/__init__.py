"""fly-replay-router: session affinity for stateful MCP servers on many Fly Machines."""

from app.affinity.middleware import AffinityMiddleware
from app.settings import AffinitySettings

__all__ = ["AffinityMiddleware", "AffinitySettings"]
