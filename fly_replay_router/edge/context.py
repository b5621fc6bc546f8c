"""What the edge's parts share for the life of one edge, handed to each part instead of the proxy.

The front door (``proxy.py``) builds one ``EdgeContext``; routing, targets, the relay, the control
surface and the page each receive it (or the few fields they use) and never reach back for the
proxy, so that the edge's modules import in one direction, the way a request travels:
``proxy`` -> ``routing`` -> ``targets`` -> ``upstream``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from fly_replay_router.edge.cache import ReplayCache
from fly_replay_router.edge.config import EdgeConfig
from fly_replay_router.edge.fleet import Fleet
from fly_replay_router.edge.status import EdgeStatus
from fly_replay_router.edge.upstream import UpstreamPool


@dataclass(eq=False)
class EdgeContext:
    """One edge's configuration, machines, counters, replay cache and upstream connections."""

    config: EdgeConfig
    fleet: Fleet
    status: EdgeStatus = field(default_factory=EdgeStatus)
    cache: ReplayCache = field(default_factory=ReplayCache)
    upstream: UpstreamPool = field(default_factory=UpstreamPool)
    # The balancer's turn counter for --balance round-robin.
    round_robin: itertools.count[int] = field(default_factory=itertools.count)
    # Set when the server shuts down: the page's endless feeds end.
    closing: bool = False
