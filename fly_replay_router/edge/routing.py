"""Where a request goes: the first hop, then every ``fly-replay`` answer until a real one.

Fly's rules ("Dynamic request routing with fly-replay",
https://fly.io/docs/networking/dynamic-request-routing/, and "Error codes and troubleshooting",
https://fly.io/docs/reference/error-codes/) as the edge applies them:

- first hop: ``fly-force-instance-id`` (retried, no fallback), else a replay cache hit, else
  ``fly-prefer-instance-id`` (another machine with ``fly-preferred-instance-unavailable``), else the
  balancing policy over started machines, skipping any that refuse connections;
- a ``fly-replay`` answer is thrown away and the original request goes to its target with
  ``fly-replay-src``; a target that cannot be reached within ``timeout`` brings the fallback
  (``force_self`` / ``prefer_self``, with ``fly-replay-failed``), and a fallback request is never
  replayed again; an error *response* from a target is not a failure;
- PA01 (body not replayable), PA02 (more than ten replays), PA03 (invalid instruction).
"""

from __future__ import annotations

import logging
import time

import aiohttp

from fly_replay_router import fly
from fly_replay_router.edge.cache import CacheLookup
from fly_replay_router.edge.config import split_pattern
from fly_replay_router.edge.context import EdgeContext
from fly_replay_router.edge.errors import EdgeError, RoutingFailure
from fly_replay_router.edge.headers import ClientRequest, Headers, replace_headers
from fly_replay_router.edge.machine import Machine
from fly_replay_router.edge.targets import Dispatcher
from fly_replay_router.edge.upstream import ConnectFailed, RequestBody, finish_upstream

logger = logging.getLogger("fly_replay_router.edge")

# Enough for a JSON replay instruction; fly.parse_replay_json refuses anything longer.
_MAX_INSTRUCTION_BODY = 16 * fly.MAX_HEADER_VALUE + 1


class Router:
    """Routes one request. Per-request state lives here, never in the shared ``EdgeContext``."""

    def __init__(self, ctx: EdgeContext, request: ClientRequest, body: RequestBody) -> None:
        self.ctx = ctx
        self.request = request
        self.body = body
        self.lookup: CacheLookup = ctx.cache.lookup(
            request.path, request.header_map(), skip_requested=request.cache_skip
        )
        self.to = Dispatcher(ctx, request, body)
        self._served_from_cache = False
        # Every machine that answered, in order: where the request landed, then each replay target.
        self.hops: list[str] = []
        # A path rule (fly-replay-cache: /prefix/*) to store once the replay reached its target.
        self._path_rule: tuple[str | None, int] = (None, 0)

    @property
    def cache_hit(self) -> bool:
        """Whether the first hop came from the replay cache."""
        return self._served_from_cache

    async def route(self) -> tuple[aiohttp.ClientResponse, Machine]:
        """The response to relay and the machine that gave it. Raises ``EdgeError``."""
        response, machine = await self._first_hop()
        self.hops.append(machine.id)
        hit = self.lookup.hit if self._served_from_cache else None
        replays = 0
        fallback_hop = False
        while True:
            instruction = await self._instruction(response, machine)
            self._cache_invalidation(response, instruction)
            if instruction is None:
                return response, machine
            machine.replays_answered += 1
            if hit is not None:
                self.ctx.cache.invalidate(hit)  # the cached target no longer takes these requests
                hit = None
            if fallback_hop:
                raise EdgeError(502, "PA02", f"machine {machine.id} replayed a fallback request, which Fly forbids")
            if replays >= self.ctx.config.max_replays:
                raise EdgeError(502, "PA02", f"more than {self.ctx.config.max_replays} replays for one request")
            if not self.body.replayable:
                raise EdgeError(502, "PA01", "request body too large (or of unknown length) to replay")
            replays += 1
            self.ctx.status.replays += 1
            replayer = machine
            try:
                response, machine = await self._replay(instruction, replayer)
            except RoutingFailure as failure:
                if instruction.fallback is None:
                    raise EdgeError(502, "unreachable", failure.detail) from None
                response, machine = await self._fallback(instruction, replayer, failure)
                fallback_hop = True
            else:
                self._remember(instruction, machine)
            self.hops.append(machine.id)

    # --- first hop -------------------------------------------------------------------------

    async def _first_hop(self) -> tuple[aiohttp.ClientResponse, Machine]:
        # Unspecified by Fly: a client's fly-force-instance-id is taken as more explicit than
        # the replay cache, and the cache as more binding than fly-prefer-instance-id.
        request, headers = self.request, self.request.headers
        if request.force_instance is not None:
            try:
                return await self.to.forced(request.force_instance, headers, self.ctx.config.default_replay_timeout)
            except RoutingFailure as failure:
                raise EdgeError(502, "unreachable", f"fly-force-instance-id: {failure.detail}") from None
        if self.lookup.target is not None:
            machine = self.ctx.fleet.machines.get(self.lookup.target)
            if machine is not None and machine.state == "started":
                cached = replace_headers(headers, [(fly.FLY_REPLAY_CACHE_STATUS, "hit")])
                try:
                    response = await self.to.send(machine, cached)
                except ConnectFailed:
                    pass
                else:
                    self._served_from_cache = True
                    self.ctx.status.replay_cache_hits += 1
                    return response, machine
            if self.lookup.hit is not None:
                self.ctx.cache.invalidate(self.lookup.hit)  # an optimisation, never a guarantee
        if request.prefer_instance is not None:
            return await self.to.preferred(request.prefer_instance, headers)
        return await self.to.balanced(headers, exclude=set())

    # --- replays ---------------------------------------------------------------------------

    async def _instruction(self, response: aiohttp.ClientResponse, machine: Machine) -> fly.ReplayInstruction | None:
        header = response.headers.get(fly.FLY_REPLAY)
        content_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if header is None and content_type != fly.REPLAY_JSON_CONTENT_TYPE:
            return None
        drained = False
        try:
            if header is not None:
                if response.content_length is not None and response.content_length < _MAX_INSTRUCTION_BODY:
                    await response.read()  # a small answer body: keep the connection for reuse
                    drained = True
                return fly.parse_replay_header(header)
            document = await response.content.read(_MAX_INSTRUCTION_BODY)
            return fly.parse_replay_json(document)
        except fly.InvalidReplay as exc:
            raise EdgeError(502, "PA03", f"invalid fly-replay from machine {machine.id}: {exc}") from None
        except (TimeoutError, aiohttp.ClientError) as exc:
            # The client learns which machine failed, never its internal address (aiohttp's text has it).
            logger.warning("edge: machine %s failed a request: %r", machine.id, exc)
            raise EdgeError(502, "upstream_error", f"machine {machine.id} could not complete the request") from None
        finally:
            finish_upstream(machine, response, reuse=drained)

    async def _replay(
        self, instruction: fly.ReplayInstruction, replayer: Machine
    ) -> tuple[aiohttp.ClientResponse, Machine]:
        """Send the original request where ``instruction`` says, with ``fly-replay-src``."""
        config = self.ctx.config
        source = fly.ReplaySource(
            instance=replayer.id, region=config.region, t=time.time_ns() // 1000, state=instruction.state
        )
        updates: Headers = [(fly.FLY_REPLAY_SRC, source.to_header())]
        if self.lookup.involved:
            updates.append((fly.FLY_REPLAY_CACHE_STATUS, "bypass" if self.lookup.bypass else "miss"))
        delete: tuple[str, ...] = ()
        path_qs = self.request.path_qs
        if instruction.transform is not None:
            updates += list(instruction.transform.set_headers)
            delete = instruction.transform.delete_headers
            if instruction.transform.path is not None:
                new_path = instruction.transform.path
                query = f"?{self.request.query}" if self.request.query and "?" not in new_path else ""
                path_qs = new_path + query
        headers = replace_headers(self.request.headers, updates, delete=delete)
        timeout = instruction.timeout or config.default_replay_timeout
        logger.info(
            "machine %s replays %s %s: %s", replayer.id, self.request.method, self.request.path, _describe(instruction)
        )
        if instruction.instance is not None:
            return await self.to.forced(instruction.instance, headers, timeout, path_qs)
        if instruction.prefer_instance is not None:
            return await self.to.preferred(instruction.prefer_instance, headers, path_qs)
        if instruction.app is not None and instruction.app != config.app_name:
            raise RoutingFailure("no_candidate", instruction.app, f"unknown app {instruction.app!r}")
        if instruction.regions and not any(config.serves_region(r) for r in instruction.regions):
            raise RoutingFailure("no_candidate", ",".join(instruction.regions), "no machine in that region")
        exclude = {replayer.id} if instruction.elsewhere else set()
        return await self.to.balanced(headers, exclude=exclude, path_qs=path_qs)

    async def _fallback(
        self, instruction: fly.ReplayInstruction, replayer: Machine, failure: RoutingFailure
    ) -> tuple[aiohttp.ClientResponse, Machine]:
        """Bring the request back (``force_self``: the replaying machine; ``prefer_self``: or any)."""
        ctx = self.ctx
        ctx.status.fallbacks += 1
        ctx.status.record("fallback", f"{replayer.id} -> {failure.target}: {failure.reason}")
        report = fly.ReplayFailure(
            instance=failure.target,
            app=ctx.config.app_name,
            region=ctx.config.region,
            replay_source=replayer.id,
            reason=failure.reason,
            elapsed_ms=failure.elapsed_ms,
        )
        headers = replace_headers(self.request.headers, [(fly.FLY_REPLAY_FAILED, report.to_header())])
        logger.info("replay to %s failed (%s); falling back to %s", failure.target, failure.reason, replayer.id)
        try:
            if instruction.fallback == "force_self":
                return await self.to.forced(replayer.id, headers, ctx.config.default_replay_timeout)
            return await self.to.preferred(replayer.id, headers)
        except RoutingFailure as second:
            raise EdgeError(502, "unreachable", f"fallback to {replayer.id} failed: {second.detail}") from None

    # --- replay cache ----------------------------------------------------------------------

    def _cacheable(self, instruction: fly.ReplayInstruction) -> bool:
        # A cached replay cannot carry state, transforms, timeout or fallback (Fly's replay caching rules).
        return (
            instruction.state is None
            and instruction.transform is None
            and instruction.timeout is None
            and instruction.fallback is None
        )

    def _remember(self, instruction: fly.ReplayInstruction, machine: Machine) -> None:
        """After a replay reached ``machine``: store it for the session key or the path rule."""
        if not self._cacheable(instruction):
            return
        session_key = self.lookup.session_key
        if session_key is not None and not self.lookup.bypass and instruction.instance == machine.id:
            self.ctx.cache.remember_session(session_key, machine.id)
        pattern, ttl = self._path_rule
        if pattern is not None:
            self.ctx.cache.remember_path(pattern, ttl, machine.id)

    def _cache_invalidation(self, response: aiohttp.ClientResponse, instruction: fly.ReplayInstruction | None) -> None:
        """Read a response's cache headers: ``invalidate``, or a path rule to store after the replay."""
        value = response.headers.get(fly.FLY_REPLAY_CACHE, "").strip()
        directive = instruction.cache if instruction is not None else None
        invalidate = value.lower() == "invalidate" or (directive is not None and directive.invalidate)
        if invalidate:
            for key in (self.lookup.hit, self.lookup.session_key):
                if key is not None:
                    self.ctx.cache.invalidate(key)
            self._path_rule = (None, 0)
            return
        ttl_text = response.headers.get(fly.FLY_REPLAY_CACHE_TTL_SECS, "")
        if split_pattern(value.rstrip("*")) is not None:
            self._path_rule = (value, fly.ascii_decimal(ttl_text.strip(), max_digits=9) or 10)
        elif directive is not None and directive.prefix is not None and split_pattern(directive.prefix.rstrip("*")):
            self._path_rule = (directive.prefix, directive.ttl_seconds or 10)
        else:
            self._path_rule = (None, 0)


def _describe(instruction: fly.ReplayInstruction) -> str:
    try:
        return instruction.to_header()
    except ValueError:
        return repr(instruction)  # the JSON form's transform/cache have no header spelling
