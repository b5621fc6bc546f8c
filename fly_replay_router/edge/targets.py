"""Reaching machines for one request: a named machine, a preferred one, or any by the balancing policy.

Fly retries a request whose connection could not be opened (the request never reached the app) on
another machine, or on the same forced machine until the replay ``timeout``; a stopped or suspended
machine that a replay or a force header names is started or resumed first, and the request waits
for it (autostart). References: "Dynamic request routing with fly-replay"
(https://fly.io/docs/networking/dynamic-request-routing/), "Fly Proxy autostop/autostart"
(https://fly.io/docs/reference/fly-proxy-autostop-autostart/).

Load, as Fly's "Load balancing" page (https://fly.io/docs/reference/load-balancing/) describes it,
counted in requests in flight per machine (the edge only sees requests, so ``type = "connections"``
is counted the same way):

- below ``soft_limit``: a candidate;
- at or above ``soft_limit``: used only when every running machine is there too, and then only
  after waking a stopped or suspended machine (``auto_start_machines``) if there is one;
- at ``hard_limit``: no new request goes to it. A request named to it (a replay, a force header)
  waits for room until its replay ``timeout``, then fails as an unreachable target would (so a
  ``fallback`` applies). When every machine is at its hard limit, a balanced request waits (queues)
  up to ``queue_timeout`` and then gets ``503`` with code ``no_capacity``: unspecified by Fly, whose
  proxy retries load balancing for a while and then errors; a bounded wait and a 5xx is the reading
  that neither drops requests at once nor holds them forever.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import aiohttp

from fly_replay_router import fly
from fly_replay_router.edge.context import EdgeContext
from fly_replay_router.edge.errors import EdgeError, RoutingFailure
from fly_replay_router.edge.headers import ClientRequest, Headers, replace_headers
from fly_replay_router.edge.machine import Machine, MachineStartError
from fly_replay_router.edge.upstream import ConnectFailed, RequestBody, send_upstream

logger = logging.getLogger("fly_replay_router.edge")

_RETRY_PAUSE = 0.1
# How often a queued request looks for room again.
_QUEUE_PAUSE = 0.02
# Fly's connect attempts are short; a refused or silent port should move on quickly.
_CONNECT_TIMEOUT = 2.0


class Dispatcher:
    """Sends one request's attempts to machines; raises ``RoutingFailure`` or ``EdgeError``."""

    def __init__(self, ctx: EdgeContext, request: ClientRequest, body: RequestBody) -> None:
        self.ctx = ctx
        self.request = request
        self.body = body

    async def send(self, machine: Machine, headers: Headers, path_qs: str | None = None) -> aiohttp.ClientResponse:
        """One attempt on ``machine``; ``ConnectFailed`` if it refused the connection."""
        if not self.body.can_send:
            raise EdgeError(502, "PA01", "request body was already streamed and cannot be sent again")
        idle = self.ctx.config.fly_toml.idle_timeout
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=_CONNECT_TIMEOUT, sock_read=idle)
        try:
            return await send_upstream(
                self.ctx.upstream.session(),
                machine,
                method=self.request.method,
                path_qs=path_qs or self.request.path_qs,
                headers=headers,
                body=self.body,
                timeouts=timeout,
            )
        except ConnectFailed:
            self.ctx.status.retries += 1
            if machine.state == "started":
                machine.unreachable = True
            raise
        except TimeoutError:
            raise EdgeError(504, "upstream_timeout", f"machine {machine.id} sent no response in time") from None
        except aiohttp.ClientError as exc:
            raise EdgeError(502, "upstream_error", f"machine {machine.id}: {exc}") from None

    async def forced(
        self, machine_id: str, headers: Headers, patience: float, path_qs: str | None = None
    ) -> tuple[aiohttp.ClientResponse, Machine]:
        """Exactly ``machine_id``: autostart it if stopped, retry refused connections for ``patience`` s."""
        started = time.monotonic()
        machine = self.ctx.fleet.machines.get(machine_id)
        if machine is None:
            detail = f"no machine {machine_id} in app {self.ctx.config.app_name}"
            raise RoutingFailure("no_candidate", machine_id, detail, elapsed_ms=0)
        config = self.ctx.config
        queued = False
        while True:
            elapsed = time.monotonic() - started
            if machine.state != "started" and config.fly_toml.auto_start:
                await self.autostart(machine)
            if machine.state != "started":
                why = f"machine {machine_id} is {machine.state} and auto_start_machines is off"
            elif config.fly_toml.hard_limit is not None and machine.in_flight >= config.fly_toml.hard_limit:
                why = f"machine {machine_id} stayed at its hard limit ({config.fly_toml.hard_limit}) for {patience:g}s"
                if not queued:
                    queued = True
                    self.ctx.status.queued += 1
            else:
                try:
                    return await self.send(machine, headers, path_qs), machine
                except ConnectFailed:
                    why = f"machine {machine_id} refused connections for {patience:g}s"
                elapsed = time.monotonic() - started
            if elapsed >= patience:
                raise RoutingFailure("timeout", machine_id, why, elapsed_ms=round(elapsed * 1000))
            await asyncio.sleep(_QUEUE_PAUSE if queued else _RETRY_PAUSE)

    async def autostart(self, machine: Machine) -> None:
        """Start a stopped machine, resume a suspended one, or wait for the start already under way."""
        if machine.state in ("stopped", "suspended"):
            self.ctx.status.autostarts += 1
            verb = "resuming" if machine.state == "suspended" else "starting"
            self.ctx.status.record("autostart", f"{verb} {machine.id}")
            logger.info("autostart: %s machine %s", verb, machine.id)
        try:
            await self.ctx.fleet.start(machine.id)
        except MachineStartError as exc:
            raise RoutingFailure("retries_exhausted", machine.id, str(exc)) from None

    async def preferred(
        self, machine_id: str, headers: Headers, path_qs: str | None = None
    ) -> tuple[aiohttp.ClientResponse, Machine]:
        """``machine_id`` if it can take the request, else another with ``fly-preferred-instance-unavailable``."""
        machine = self.ctx.fleet.machines.get(machine_id)
        if machine is not None and machine.state == "started":
            try:
                return await self.send(machine, headers, path_qs), machine
            except ConnectFailed:
                pass
        unavailable = replace_headers(headers, [(fly.FLY_PREFERRED_INSTANCE_UNAVAILABLE, machine_id)])
        try:
            return await self.balanced(unavailable, exclude={machine_id}, path_qs=path_qs)
        except RoutingFailure as failure:
            raise EdgeError(502, "unreachable", failure.detail) from None

    async def balanced(
        self, headers: Headers, *, exclude: set[str], path_qs: str | None = None
    ) -> tuple[aiohttp.ClientResponse, Machine]:
        """Any started machine but ``exclude``, by load then the balancing policy (see the module docstring).

        Wakes a stopped or suspended machine when none runs below its soft limit; queues up to
        ``queue_timeout`` when every machine is at its hard limit.
        """
        config, fleet = self.ctx.config, self.ctx.fleet
        soft, hard = config.fly_toml.soft_limit, config.fly_toml.hard_limit
        tried = set(exclude)
        deadline: float | None = None
        while True:
            running = [m for m in fleet.started() if m.id not in tried]
            room = [m for m in running if hard is None or m.in_flight < hard]
            relaxed = [m for m in room if m.in_flight < soft]
            asleep = [] if relaxed or not config.fly_toml.auto_start else self._asleep(tried)
            if relaxed:
                machine = self.pick(relaxed)
            elif asleep:
                # Every running machine is at its soft limit (or none runs): wake one, as Fly does.
                machine = asleep[0]
                try:
                    await self.autostart(machine)
                except RoutingFailure:
                    tried.add(machine.id)
                    continue
            elif room:
                machine = self.pick(room)  # above the soft limit, below the hard one: allowed
            elif running:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + config.queue_timeout
                    self.ctx.status.queued += 1
                if now >= deadline:
                    detail = f"every machine stayed at its hard limit ({hard}) for {config.queue_timeout:g}s"
                    raise EdgeError(503, "no_capacity", detail)
                await asyncio.sleep(_QUEUE_PAUSE)
                continue
            else:
                raise RoutingFailure("no_candidate", "*", "no machine could take the request")
            try:
                return await self.send(machine, headers, path_qs), machine
            except ConnectFailed:
                tried.add(machine.id)

    def _asleep(self, tried: set[str]) -> list[Machine]:
        """Machines that autostart can wake, suspended first (resuming is faster than booting)."""
        order = {"suspended": 0, "starting": 1, "stopped": 2}
        asleep = [m for m in self.ctx.fleet.machines.values() if m.id not in tried and m.state in order]
        return sorted(asleep, key=lambda m: order[m.state])

    def pick(self, candidates: list[Machine]) -> Machine:
        """The balancing policy: random (default), round-robin or least-requests."""
        policy = self.ctx.config.balance
        if policy == "round-robin":
            return candidates[next(self.ctx.round_robin) % len(candidates)]
        if policy == "least-requests":
            return min(candidates, key=lambda m: (m.in_flight, m.requests))
        return random.choice(candidates)
