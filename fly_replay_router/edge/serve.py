"""Running the edge under uvicorn, the way both the CLI and the tests do it.

uvloop + httptools (measured here at about 4x the requests per second of uvicorn's pure-Python
defaults), behind the front door's limits on a request's head (``door.py``); no ``server``/``date``
headers of the edge's own, since the machine's pass through;
no signal handling, since the CLI owns SIGINT/SIGTERM to stop its fleet too.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Generator

import uvicorn

from fly_replay_router.edge.door import DoorLimits, door_protocol
from fly_replay_router.edge.proxy import EdgeProxy


class EdgeServer(uvicorn.Server):
    """A uvicorn server that leaves signals to its caller and ends the live page's feeds on shutdown."""

    edge: EdgeProxy | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # An open page's feed never ends by itself: without this, uvicorn would wait out its
        # graceful timeout for it.
        if self.edge is not None:
            self.edge.shut_down()
        await super().shutdown(sockets)


def edge_server(edge: EdgeProxy, *, log_level: str = "warning") -> EdgeServer:
    """A server for ``edge``; start it with ``await server.serve(sockets=[listening_socket])``."""
    limits = DoorLimits(edge.config.max_head_bytes, edge.config.max_header_count, edge.config.head_timeout)
    config = uvicorn.Config(
        edge,
        # httptools, with the front door's head size limit and head deadline (door.py).
        http=door_protocol(limits, edge.status.error),
        lifespan="on",
        log_level=log_level,
        access_log=False,
        server_header=False,
        # The edge is the first proxy: a client's X-Forwarded-For must not become Fly-Client-IP.
        proxy_headers=False,
        date_header=False,
        timeout_graceful_shutdown=2,
    )
    server = EdgeServer(config)
    server.edge = edge
    return server
