"""A simulated Fly edge proxy and a local fleet of machines (``python -m app.edge``)."""

from app.edge.config import EdgeConfig, FlyToml, SessionCacheRule
from app.edge.fleet import Fleet, FleetSpec
from app.edge.machine import Machine
from app.edge.proxy import EdgeProxy

__all__ = ["EdgeConfig", "EdgeProxy", "Fleet", "FleetSpec", "FlyToml", "Machine", "SessionCacheRule"]
