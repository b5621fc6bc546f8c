"""The local edge with one verb more, for the failover bench: ``POST /_bench/machines/<id>/destroy``.

``python -m tests.bench.failover_clients_edge ...`` takes the arguments of ``python -m
fly_replay_router.edge``. Destroying a machine is what ``fly machine destroy --force`` (and the end of a
blue-green deploy, or a scale-down) does on Fly: the machine is killed and its id leaves the app, so
the proxy has no machine for an ``instance=`` naming it. A replacement with a new id is started, as a
blue-green deploy or ``fly scale count`` would, so that the fleet keeps its size. The edge has no such
verb of its own (its machines keep their ids, as stopped Fly Machines do).
"""

from __future__ import annotations

import re
import sys

from fly_replay_router.asgi import Receive, Scope, Send
from fly_replay_router.edge import launch
from fly_replay_router.edge.__main__ import main
from fly_replay_router.edge.proxy import EdgeProxy
from fly_replay_router.edge.respond import respond_json

DESTROY = re.compile(r"/_bench/machines/([0-9a-z]{1,32})/destroy")


class DestroyingEdgeProxy(EdgeProxy):
    """``EdgeProxy`` that also answers ``POST /_bench/machines/<id>/destroy`` (kill, forget, replace)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = DESTROY.fullmatch(scope.get("path", "")) if scope["type"] == "http" else None
        if match is None or scope["method"] != "POST":
            await super().__call__(scope, receive, send)
            return
        machine_id = match.group(1)
        fleet = self.fleet
        if machine_id not in fleet.machines:
            await respond_json(send, 404, {"error": f"no machine {machine_id}"})
            return
        await fleet.kill(machine_id)
        del fleet.machines[machine_id]
        (replacement,) = fleet.plan(1)
        await fleet.start(replacement.id)
        await respond_json(send, 200, {"destroyed": machine_id, "replacement": replacement.id})


launch.EdgeProxy = DestroyingEdgeProxy  # type: ignore[misc]  # the launcher builds this class instead

if __name__ == "__main__":
    sys.exit(main())
