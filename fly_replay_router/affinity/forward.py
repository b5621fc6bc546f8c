"""Forwarding a request Fly cannot replay (body over 1 MiB, or of unknown length) to its owner.

Fly's proxy buffers at most 1 MiB of a request body for a replay; a larger body would fail with
error PA01. The layer instead streams such a request itself to the owner over the private network
(``http://<owner>.vm.<app>.internal:<port>`` on Fly), and streams the answer back. The forwarded
request keeps the client's token, so the owner verifies it like any other; it carries
``affinity-forwarded-from`` so that a machine that is not the owner refuses it instead of
forwarding again.

Reference: ``shared/reference/fly-proxy.md`` (limits, private network); httpx streaming
(``client.send(request, stream=True)``, ``aiter_raw()``, ``aclose()``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import httpx

from fly_replay_router import fly
from fly_replay_router.asgi import Receive, Scope, Send

logger = logging.getLogger("fly_replay_router.affinity")

FORWARDED_FROM = b"affinity-forwarded-from"
HOP_BY_HOP = frozenset(name.encode("ascii") for name in fly.HOP_BY_HOP)


def body_replayable(content_length: bytes | None, chunked: bool) -> bool:
    """Fly can replay a request with these headers: no body, or a declared length within its buffer."""
    if chunked:
        return False
    if content_length is None:
        return True
    return content_length.isdigit() and int(content_length) <= fly.REPLAY_BODY_LIMIT


class OwnerForwarder:
    """Streams requests to other machines of the app and their answers back (one httpx client)."""

    def __init__(self, *, connect_timeout: float = 5.0) -> None:
        self._timeout = httpx.Timeout(connect=connect_timeout, read=None, write=None, pool=connect_timeout)
        self._client: httpx.AsyncClient | None = None

    async def forward(self, scope: Scope, receive: Receive, send: Send, *, owner_url: str, this_machine: str) -> bool:
        """Send the request to ``owner_url``; False if the owner could not be reached (nothing sent)."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout, follow_redirects=False)
        target = owner_url + (scope.get("raw_path") or (scope["root_path"] + scope["path"]).encode()).decode("latin-1")
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")
        headers = [(name, value) for name, value in scope["headers"] if name not in HOP_BY_HOP]
        headers.append((FORWARDED_FROM, this_machine.encode("ascii")))
        request = self._client.build_request(scope["method"], target, headers=headers, content=_body(receive))
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TransportError as exc:
            logger.info("affinity: forward to %s failed: %r", owner_url, exc)
            return False
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [
                        (name, value) for name, value in response.headers.raw if name.lower() not in HOP_BY_HOP
                    ],
                }
            )
            try:
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except httpx.TransportError as exc:
                # The answer has started: all that is left is to end it.
                logger.info("affinity: forwarded answer from %s cut short: %r", owner_url, exc)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()
        return True


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return
