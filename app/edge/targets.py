"""Reaching machines for one request: a named machine, a preferred one, or any by the balancing policy.

Fly retries a request whose connection could not be opened (the request never reached the app) on
another machine, or on the same forced machine until the replay ``timeout``; a stopped machine that
a replay or a force header names is started first (autostart). ``shared/reference/fly-proxy.md``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING

import aiohttp

from app import fly
from app.edge.headers import ClientRequest, Headers, replace_headers
from app.edge.machine import Machine, MachineStartError
from app.edge.upstream import ConnectFailed, RequestBody, send_upstream

if TYPE_CHECKING:
    from app.edge.proxy import EdgeProxy

logger = logging.getLogger("app.edge")

_RETRY_PAUSE = 0.1
# Fly's connect attempts are short; a refused or silent port should move on quickly.
_CONNECT_TIMEOUT = 2.0


class EdgeError(Exception):
    """A request the edge answers itself: ``status`` and a body naming ``code`` (``PA01`` ...)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class RoutingFailure(Exception):
    """No connection to a replay target could be opened (``fly-replay-failed``'s ``reason``)."""

    def __init__(self, reason: fly.FailureReason, target: str, detail: str, *, elapsed_ms: int | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.target = target
        self.detail = detail
        self.elapsed_ms = elapsed_ms


class Dispatcher:
    """Sends one request's attempts to machines; raises ``RoutingFailure`` or ``EdgeError``."""

    def __init__(self, edge: EdgeProxy, request: ClientRequest, body: RequestBody) -> None:
        self.edge = edge
        self.request = request
        self.body = body

    async def send(self, machine: Machine, headers: Headers, path_qs: str | None = None) -> aiohttp.ClientResponse:
        """One attempt on ``machine``; ``ConnectFailed`` if it refused the connection."""
        if not self.body.can_send:
            raise EdgeError(502, "PA01", "request body was already streamed and cannot be sent again")
        config = self.edge.config
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=_CONNECT_TIMEOUT, sock_read=config.idle_timeout)
        try:
            return await send_upstream(
                self.edge.session(),
                machine,
                method=self.request.method,
                path_qs=path_qs or self.request.path_qs,
                headers=headers,
                body=self.body,
                timeouts=timeout,
            )
        except ConnectFailed:
            self.edge.status.retries += 1
            self.edge.fleet.refresh()
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
        machine = self.edge.fleet.machines.get(machine_id)
        if machine is None:
            detail = f"no machine {machine_id} in app {self.edge.config.app_name}"
            raise RoutingFailure("no_candidate", machine_id, detail, elapsed_ms=0)
        while True:
            if machine.state != "started":
                await self.autostart(machine)
            try:
                return await self.send(machine, headers, path_qs), machine
            except ConnectFailed:
                elapsed = time.monotonic() - started
                if elapsed >= patience:
                    detail = f"machine {machine_id} refused connections for {patience:g}s"
                    raise RoutingFailure("timeout", machine_id, detail, elapsed_ms=round(elapsed * 1000)) from None
                await asyncio.sleep(_RETRY_PAUSE)

    async def autostart(self, machine: Machine) -> None:
        """Start a stopped machine, or wait for the start already under way."""
        if machine.state == "stopped":
            self.edge.status.autostarts += 1
            self.edge.status.record("autostart", machine.id)
            logger.info("autostarting machine %s", machine.id)
        try:
            await self.edge.fleet.start(machine.id)
        except MachineStartError as exc:
            raise RoutingFailure("retries_exhausted", machine.id, str(exc)) from None

    async def preferred(
        self, machine_id: str, headers: Headers, path_qs: str | None = None
    ) -> tuple[aiohttp.ClientResponse, Machine]:
        """``machine_id`` if it can take the request, else another with ``fly-preferred-instance-unavailable``."""
        machine = self.edge.fleet.machines.get(machine_id)
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
        """Any started machine but ``exclude``, by the balancing policy; autostart one if none runs."""
        tried = set(exclude)
        while True:
            candidates = [m for m in self.edge.fleet.started() if m.id not in tried]
            if candidates:
                machine = self.pick(candidates)
            else:
                # Nothing runs: wake a machine, as Fly does with auto_start_machines.
                waking = ("starting", "stopped")
                stopped = [m for m in self.edge.fleet.machines.values() if m.id not in tried and m.state in waking]
                if not stopped:
                    raise RoutingFailure("no_candidate", "*", "no machine could take the request")
                machine = stopped[0]
                try:
                    await self.autostart(machine)
                except RoutingFailure:
                    tried.add(machine.id)
                    continue
            try:
                return await self.send(machine, headers, path_qs), machine
            except ConnectFailed:
                tried.add(machine.id)

    def pick(self, candidates: list[Machine]) -> Machine:
        """The balancing policy: random (default), round-robin or least-requests."""
        policy = self.edge.config.balance
        if policy == "round-robin":
            return candidates[next(self.edge.round_robin) % len(candidates)]
        if policy == "least-requests":
            return min(candidates, key=lambda m: (m.in_flight, m.requests))
        return random.choice(candidates)
