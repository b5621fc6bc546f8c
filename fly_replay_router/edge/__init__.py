"""A simulated Fly edge proxy and a local fleet of machines (``python -m fly_replay_router.edge``)."""

from fly_replay_router.edge.config import EdgeConfig, FlyToml, SessionCacheRule
from fly_replay_router.edge.fleet import Fleet, FleetSpec
from fly_replay_router.edge.machine import Machine
from fly_replay_router.edge.proxy import EdgeProxy

__all__ = ["EdgeConfig", "EdgeProxy", "Fleet", "FleetSpec", "FlyToml", "Machine", "SessionCacheRule"]
