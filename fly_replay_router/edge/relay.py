"""The way back: a machine's answer streamed to the client as it comes, with nothing buffered.

A body of unknown length (an event stream, a chunked answer) is copied while a watcher waits for
the client to hang up, so that an abandoned stream is closed on the machine too; a body of known
length ends by itself and is copied inline (two tasks fewer per request). Once the answer has
started, a failure can only end the body, as Fly's proxy does ("The Fly Proxy",
https://fly.io/docs/reference/fly-proxy/). A legacy HTTP+SSE stream names its MCP session in its
first event: the relay peeks at it for the session book.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp

from fly_replay_router.asgi import Receive, Send
from fly_replay_router.edge.context import EdgeContext
from fly_replay_router.edge.headers import response_headers
from fly_replay_router.edge.machine import Machine
from fly_replay_router.edge.respond import start_response
from fly_replay_router.edge.sessions import SSE_PEEK_BYTES, endpoint_session
from fly_replay_router.edge.upstream import RequestBody, finish_upstream

logger = logging.getLogger("fly_replay_router.edge")


async def relay(
    ctx: EdgeContext,
    response: aiohttp.ClientResponse,
    machine: Machine,
    send: Send,
    receive: Receive,
    body: RequestBody,
    request_id: str,
    *,
    peek: bool = False,
) -> None:
    """Stream ``response`` from ``machine`` to the client; ``peek`` reads a legacy stream's session."""
    complete = False
    watcher: asyncio.Task[None] | None = None
    try:
        await start_response(send, response.status, response_headers(list(response.raw_headers), request_id=request_id))
        if response.content_length is not None or not body.complete:
            complete = await _copy_body(ctx, response, send, machine)
        else:
            watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
            streaming = asyncio.ensure_future(_copy_body(ctx, response, send, machine, peek))
            done, _ = await asyncio.wait({streaming, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if streaming in done:
                complete = streaming.result()
            else:
                streaming.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await streaming
                logger.info("client went away; closing the stream from machine %s", machine.id)
    finally:
        if watcher is not None:
            watcher.cancel()
        finish_upstream(machine, response, reuse=complete)
    with contextlib.suppress(OSError, RuntimeError):
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _copy_body(
    ctx: EdgeContext, response: aiohttp.ClientResponse, send: Send, machine: Machine, peek: bool = False
) -> bool:
    token: str | None = None
    sessions = ctx.status.sessions
    try:
        async for chunk in response.content.iter_any():
            if peek:
                peek = False
                token = endpoint_session(chunk[:SSE_PEEK_BYTES])
                if token is not None:
                    sessions.opened(token, ctx.fleet.machines)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except TimeoutError:
        # The response has started: all the edge can do is end the body (Fly does the same).
        idle = ctx.config.fly_toml.idle_timeout
        ctx.status.error("idle_timeout", f"no data from machine {machine.id} for {idle:g}s")
        logger.info("idle timeout on a response from machine %s; ending it", machine.id)
        return False
    except aiohttp.ClientError as exc:
        ctx.status.error("upstream_broken", f"machine {machine.id}: {exc}")
        logger.warning("response from machine %s broke off: %s", machine.id, exc)
        return False
    finally:
        if token is not None:  # a legacy session lives as long as its stream
            sessions.closed(token)
    return True


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
