"""Event streams: not compressed, and kept alive well inside the proxy's idle timeout.

Fly's proxy compresses a response that has no ``Content-Encoding`` and buffers what it compresses, so
an unmarked event stream is held back; ``Content-Encoding: none`` turns that off. A stream with no
bytes for ``http_options.idle_timeout`` is closed (Fly does not document the default; the doctor
assumes 60 s), so a server must send a comment (``: ping``) every 15-30 s. The doctor asks for
compression as a browser does (``Accept-Encoding: gzip, deflate, br``) so that a proxy that would
compress, does.

References: Fly "Content encoding" (https://fly.io/docs/networking/content-encoding/); Fly app
configuration, ``http_options`` (https://fly.io/docs/reference/configuration/); MCP "Transports",
listening for messages from the server (GET).
"""

from __future__ import annotations

import asyncio
import time

import httpx

from fly_replay_router.doctor.results import CheckResult, failed, passed, unknown
from fly_replay_router.doctor.sticking import SessionRun, close_session, open_session
from fly_replay_router.doctor.wire import HANDSHAKE_VERSION, SESSION_HEADER, Endpoint, Exchange

ASSUMED_IDLE_TIMEOUT = 60.0
# "Well inside" the idle timeout: half of it.
KEEPALIVE_LIMIT = ASSUMED_IDLE_TIMEOUT / 2
# The stream's status and headers must come this fast: they tell the client it is listening.
PROMPT_SECONDS = 5.0
NOT_COMPRESSED = ("", "none", "identity")


def stream_encoding(exchange: Exchange) -> str | None:
    """The ``Content-Encoding`` of an event-stream answer (``""`` for none); None if it was not a stream."""
    content_type = exchange.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != "text/event-stream":
        return None
    return str(exchange.headers.get("content-encoding", "")).strip().lower()


async def watch_event_stream(endpoint: Endpoint, wait: float) -> tuple[Exchange | None, dict[str, object]]:
    """Open a session and its GET stream; time its headers and first bytes. Also the session's opening answer."""
    run = await open_session(endpoint)
    try:
        if run.token is None:
            return None, {}
        return run.opening, await _watch_get_stream(endpoint, run, wait)
    finally:
        await close_session(endpoint, run)


def judge_event_streams(answered: list[Exchange], stream: dict[str, object], wait: float) -> CheckResult:
    """``event_streams``: no stream compressed (POST answers, the GET stream); the GET stream prompt, kept alive."""
    if not stream:
        return unknown("event_streams", "not checked: no session could be opened")
    post_encodings = sorted({encoding for exchange in answered if (encoding := stream_encoding(exchange)) is not None})
    compressed = [encoding for encoding in [*post_encodings, stream.get("content_encoding")] if _compressed(encoding)]
    evidence = {"post_answer_encodings": post_encodings or None, **stream}
    if compressed:
        return failed(
            "event_streams",
            f"an event stream came compressed (Content-Encoding: {compressed[0]})",
            "Fly's proxy compresses a response without Content-Encoding and holds events back to fill its "
            "blocks: mark streams Content-Encoding: none (UncompressedStreamsMiddleware, outermost)",
            **evidence,
        )
    status = stream.get("status")
    if status == 405:
        return unknown(
            "event_streams", "the server offers no GET stream (405); answers to POSTs were not compressed", **evidence
        )
    if status != 200:
        return failed(
            "event_streams",
            f"GET stream answered {status}",
            "the session's GET stream did not open: see the owner's logs",
            **evidence,
        )
    headers_s, first_s = stream.get("headers_s"), stream.get("first_bytes_s")
    assert isinstance(headers_s, float)
    if not isinstance(first_s, float) and wait < KEEPALIVE_LIMIT:
        return unknown(
            "event_streams",
            f"not compressed; no keep-alive in the {wait:g} s waited (--stream-wait below {KEEPALIVE_LIMIT:g} s)",
            **evidence,
        )
    if not isinstance(first_s, float):
        return failed(
            "event_streams",
            f"no keep-alive comment or event on the GET stream in {wait:g} s",
            f"Fly's proxy closes a stream idle for http_options.idle_timeout: send a comment (': ping') every "
            f"15-30 s (the official SDK does every 15 s) and keep idle_timeout above {ASSUMED_IDLE_TIMEOUT:g} s",
            **evidence,
        )
    if headers_s > PROMPT_SECONDS and headers_s >= first_s - 0.5:
        return failed(
            "event_streams",
            f"the GET stream's headers took {headers_s} s",
            "something in front holds the stream until its first bytes (buffering): mark it Content-Encoding: none",
            **evidence,
        )
    if first_s > KEEPALIVE_LIMIT:
        return failed(
            "event_streams",
            f"the first keep-alive came after {first_s} s",
            f"a stream silent for the idle timeout is closed: send a comment at least every {KEEPALIVE_LIMIT:g} s",
            **evidence,
        )
    return passed(
        "event_streams",
        f"not compressed; stream open in {headers_s} s, first keep-alive after {first_s} s",
        **evidence,
    )


def _compressed(encoding: object) -> bool:
    return isinstance(encoding, str) and encoding not in NOT_COMPRESSED


async def _watch_get_stream(endpoint: Endpoint, run: SessionRun, wait: float) -> dict[str, object]:
    assert run.token is not None
    headers = {
        "accept": "text/event-stream",
        "accept-encoding": "gzip, deflate, br",
        SESSION_HEADER: run.token,
        "mcp-protocol-version": HANDSHAKE_VERSION,
    }
    request = endpoint.client.build_request(
        "GET", endpoint.url, headers=headers, timeout=httpx.Timeout(wait + PROMPT_SECONDS, connect=PROMPT_SECONDS)
    )
    started = time.perf_counter()
    evidence: dict[str, object] = {}
    try:
        async with asyncio.timeout(wait + PROMPT_SECONDS):
            response = await endpoint.client.send(request, stream=True)
    except (httpx.HTTPError, TimeoutError) as exc:
        return {"status": None, "error": type(exc).__name__, "headers_s": round(time.perf_counter() - started, 2)}
    try:
        evidence["status"] = response.status_code
        evidence["headers_s"] = round(time.perf_counter() - started, 2)
        evidence["content_encoding"] = response.headers.get("content-encoding", "").lower() or None
        if response.status_code == 200:
            first = await _first_bytes(response, started + wait)
            evidence["first_bytes_s"] = None if first is None else round(first - started, 2)
    finally:
        await response.aclose()
    return evidence


async def _first_bytes(response: httpx.Response, deadline: float) -> float | None:
    """When the first body bytes (a comment or an event) arrived, or None by ``deadline``."""
    try:
        async with asyncio.timeout(max(0.0, deadline - time.perf_counter())):
            async for chunk in response.aiter_raw():
                if chunk:
                    return time.perf_counter()
    except (httpx.HTTPError, TimeoutError):
        return None
    return None
