"""Autostop, as Fly Proxy does it from ``fly.toml``: stop or suspend idle machines above the minimum.

Fly's rule ("Fly Proxy autostop/autostart", https://fly.io/docs/reference/fly-proxy-autostop-autostart/):
every few minutes the proxy checks whether the app has excess capacity, judged by the
``soft_limit``, and if so stops (``auto_stop_machines = "stop"``) or suspends (``"suspend"``)
exactly one Machine; ``min_machines_running`` Machines are kept running. With several Machines
there is excess capacity when the load would still fit under the soft limit on one Machine fewer;
with a single Machine, when it has no traffic.

What this edge does, every ``autostop_interval`` seconds (``--autostop-interval``; Fly's "few
minutes" scaled down):

1. nothing when ``auto_stop`` is ``off`` or at most ``min_machines_running`` machines run;
2. excess capacity: the requests in flight on all running machines fit under ``soft_limit`` on one
   machine fewer (with one machine: it has none in flight);
3. among running machines, the idle ones: no request in flight (an open SSE stream is a request in
   flight for its whole life) and none sent or finished during the last interval. Fly does not say
   which Machine it picks, nor whether a busy one may be chosen; the safe reading is never to cut a
   request, so only an idle machine is stopped, the one idle the longest;
4. at most one machine per check, as on Fly.

A stopped machine loses its memory (its MCP sessions get 404 afterwards); a suspended one keeps it
and resumes when a request or replay names it (``targets.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from fly_replay_router.edge.config import EdgeConfig
from fly_replay_router.edge.fleet import Fleet
from fly_replay_router.edge.machine import Machine, MachineControlError

logger = logging.getLogger("fly_replay_router.edge")


def machine_to_stop(machines: list[Machine], config: EdgeConfig, now: float) -> Machine | None:
    """The one machine autostop stops or suspends now, or ``None`` (rules 1-4 of the module docstring)."""
    if config.fly_toml.auto_stop == "off":
        return None
    running = [m for m in machines if m.state == "started"]
    if len(running) <= config.fly_toml.min_machines_running or not running:
        return None
    load = sum(m.in_flight for m in running)
    # One machine: excess when it has no traffic; more: when the load fits on one machine fewer.
    excess = load == 0 if len(running) == 1 else load < config.fly_toml.soft_limit * (len(running) - 1)
    if not excess:
        return None
    idle = [m for m in running if m.in_flight == 0 and now - m.last_active >= config.autostop_interval]
    if not idle:
        return None
    return min(idle, key=lambda m: m.last_active)


class Autostop:
    """The periodic check; ``run()`` until cancelled. ``on_stop`` is told which machine and how."""

    def __init__(self, fleet: Fleet, config: EdgeConfig, on_stop: Callable[[Machine, str], None] | None = None) -> None:
        self.fleet = fleet
        self.config = config
        self.on_stop = on_stop

    async def run(self) -> None:
        """Check every ``autostop_interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.config.autostop_interval)
            try:
                await self.check()
            except MachineControlError as exc:  # the machine changed state meanwhile
                logger.info("autostop skipped: %s", exc)

    async def check(self) -> Machine | None:
        """One check: stop or suspend at most one machine; return it."""
        machine = machine_to_stop(list(self.fleet.machines.values()), self.config, time.monotonic())
        if machine is None:
            return None
        how = self.config.fly_toml.auto_stop
        logger.info("autostop: %s idle machine %s", "suspending" if how == "suspend" else "stopping", machine.id)
        if how == "suspend":
            await self.fleet.suspend(machine.id)
        else:
            await self.fleet.stop(machine.id)
        if self.on_stop is not None:
            self.on_stop(machine, how)
        return machine


async def cancel(task: asyncio.Task[None] | None) -> None:
    """Stop a running ``Autostop.run`` task."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
