"""AffinityMiddleware at the ASGI level: raw messages in, raw messages out, no server."""

from __future__ import annotations

import json
import logging
import shlex
import time
from typing import Any

import pytest
from mcp.server.streamable_http_manager import _error_response

from fly_replay_router import AffinityMiddleware, AffinitySettings
from fly_replay_router.affinity.logs import DecisionLog
from fly_replay_router.affinity.token import TokenCodec
from fly_replay_router.protocol import SESSION_NOT_FOUND_BODY
from fly_replay_router.streaming import UncompressedStreamsMiddleware

HERE = "aaaaaaaaaaaaaa"
OTHER = "bbbbbbbbbbbbbb"
INNER = "7da4e80665bd4c6fb73231d63f0c227f"
KEY = "middleware-test-key-0123456789"
SETTINGS = AffinitySettings(machine_id=HERE, secret_keys=(KEY,), app_name="app-one")
CODEC = TokenCodec((KEY,), app_name="app-one")

pytestmark = pytest.mark.anyio


class InnerApp:
    """Records what reached it; answers with the given response messages."""

    def __init__(self, *response: dict[str, Any]) -> None:
        self.response = response or (
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]},
            {"type": "http.response.body", "body": b"{}"},
        )
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        for message in self.response:
            await send(message)


def http_scope(
    method: str = "POST", path: str = "/mcp", query: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None
) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": headers or [],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }


async def call(app: Any, scope: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """Run one request; return the messages sent and how often the body was read."""
    sent: list[dict[str, Any]] = []
    reads = 0

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b'{"jsonrpc": "2.0"}', "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent, reads


def header(message: dict[str, Any], name: bytes) -> bytes | None:
    return next((value for key, value in message["headers"] if key == name), None)


def token_for(owner: str, inner: str = INNER) -> bytes:
    return CODEC.issue(owner, inner, now=time.time()).encode()


async def test_a_minted_session_id_leaves_as_a_token_naming_this_machine() -> None:
    inner = InnerApp(
        {"type": "http.response.start", "status": 200, "headers": [(b"mcp-session-id", INNER.encode())]},
        {"type": "http.response.body", "body": b"{}"},
    )
    layer = AffinityMiddleware(inner, settings=SETTINGS)
    sent, _ = await call(layer, http_scope())
    token = header(sent[0], b"mcp-session-id")
    assert token is not None
    session = CODEC.verify(token.decode(), now=time.time())
    # The inner id names this worker process too (several workers per machine).
    assert (session.owner_machine_id, session.inner_session_id) == (HERE, f"{layer.workers.tag}~{INNER}")


@pytest.mark.parametrize(
    ("method", "extra"),
    [("POST", []), ("GET", [(b"last-event-id", b"42")]), ("GET", []), ("DELETE", [])],
)
async def test_own_session_is_served_with_the_inner_id_and_keeps_its_token(
    method: str, extra: list[tuple[bytes, bytes]]
) -> None:
    inner = InnerApp(
        {"type": "http.response.start", "status": 200, "headers": [(b"mcp-session-id", INNER.encode())]},
        {"type": "http.response.body", "body": b"ok"},
    )
    token = token_for(HERE)
    headers = [(b"mcp-session-id", token), (b"mcp-protocol-version", b"2025-11-25"), *extra]
    sent, _ = await call(AffinityMiddleware(inner, settings=SETTINGS), http_scope(method, headers=headers))
    assert inner.scopes[0]["headers"] == [(b"mcp-session-id", INNER.encode()), *headers[1:]]
    assert header(sent[0], b"mcp-session-id") == token
    assert sent[1]["body"] == b"ok"


async def test_other_machines_session_gets_fly_replay_without_touching_app_or_body() -> None:
    inner = InnerApp()
    headers = [(b"mcp-session-id", token_for(OTHER)), (b"content-length", b"18")]
    sent, reads = await call(AffinityMiddleware(inner, settings=SETTINGS), http_scope(headers=headers))
    assert inner.scopes == []
    assert reads == 0
    assert sent[0]["status"] == 307
    assert header(sent[0], b"fly-replay") == f"instance={OTHER};timeout=5s;fallback=force_self".encode()


@pytest.mark.parametrize(
    "fly_header",
    [
        (b"fly-replay-failed", b"instance=bbbbbbbbbbbbbb;reason=timeout;elapsed_ms=5000"),
        (b"fly-preferred-instance-unavailable", OTHER.encode()),
        (b"fly-replay-src", b"instance=cccccccccccccc;region=lcl;t=1"),
    ],
)
async def test_after_fly_already_tried_the_answer_is_404_never_a_second_replay(
    fly_header: tuple[bytes, bytes],
) -> None:
    inner = InnerApp()
    headers = [(b"mcp-session-id", token_for(OTHER)), fly_header]
    sent, reads = await call(AffinityMiddleware(inner, settings=SETTINGS), http_scope(headers=headers))
    assert (sent[0]["status"], header(sent[0], b"fly-replay"), sent[1]["body"]) == (404, None, SESSION_NOT_FOUND_BODY)
    assert inner.scopes == []
    assert reads == 0


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (b"not-a-token", "malformed_token"),
        (INNER.encode(), "malformed_token"),
        (b"A" * 1000, "token_too_long"),
        (b"\xff\xfe garbage", "malformed_token"),
        (
            TokenCodec(("some-other-key-0123456789",), app_name="app-one")
            .issue(OTHER, INNER, now=time.time())
            .encode(),
            "bad_signature",
        ),
        (TokenCodec((KEY,), app_name="app-two").issue(HERE, INNER, now=time.time()).encode(), "bad_signature"),
    ],
    ids=["not-a-token", "inner-id", "too-long", "not-ascii", "other-key", "other-app"],  # tokens differ per run
)
async def test_bad_tokens_get_the_sdks_404_and_one_info_line(
    token: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    inner = InnerApp()
    with caplog.at_level(logging.INFO, logger="fly_replay_router.affinity"):
        sent, _ = await call(
            AffinityMiddleware(inner, settings=SETTINGS), http_scope(headers=[(b"mcp-session-id", token)])
        )
    assert sent[0]["status"] == 404
    assert json.loads(sent[1]["body"])["error"]["message"] == "Session not found"
    assert inner.scopes == []
    records = [record for record in caplog.records if record.name == "fly_replay_router.affinity"]
    assert len(records) == 1
    assert records[0].levelno == logging.INFO
    assert f"reason={reason} " in records[0].getMessage()


async def test_expired_token_gets_404() -> None:
    settings = AffinitySettings(machine_id=HERE, secret_keys=(KEY,), app_name="app-one", max_token_age=60)
    old = CODEC.issue(HERE, INNER, now=time.time() - 61).encode()
    sent, _ = await call(
        AffinityMiddleware(InnerApp(), settings=settings), http_scope(headers=[(b"mcp-session-id", old)])
    )
    assert sent[0]["status"] == 404


async def test_404_body_is_byte_for_byte_the_sdks_own() -> None:
    assert _error_response("Session not found", 404).body == SESSION_NOT_FOUND_BODY


async def test_modern_era_requests_without_a_session_pass_through_untouched() -> None:
    inner = InnerApp()
    scope = http_scope(headers=[(b"mcp-protocol-version", b"2026-07-28")])
    sent, _ = await call(AffinityMiddleware(inner, settings=SETTINGS), scope)
    assert inner.scopes == [scope]
    assert sent == list(inner.response)


@pytest.mark.parametrize("version", [b"2026-07-28", b"2099-01-01", b"garbage"])
async def test_a_session_carrier_is_routed_whatever_the_protocol_version(version: bytes) -> None:
    inner = InnerApp()
    middleware = AffinityMiddleware(inner, settings=SETTINGS)
    raw_header = http_scope(headers=[(b"mcp-protocol-version", version), (b"mcp-session-id", INNER.encode())])
    raw_query = http_scope(
        path="/messages/", query=b"session_id=" + INNER.encode(), headers=[(b"mcp-protocol-version", version)]
    )
    for scope in (raw_header, raw_query):
        sent, _ = await call(middleware, scope)
        assert sent[0]["status"] == 404
    assert inner.scopes == []
    own = http_scope(headers=[(b"mcp-protocol-version", version), (b"mcp-session-id", token_for(HERE))])
    await call(middleware, own)
    assert header(inner.scopes[0], b"mcp-session-id") == INNER.encode()


async def test_sessionless_requests_pass_through_untouched() -> None:
    inner = InnerApp()
    scope = http_scope("GET", "/healthz")
    sent, _ = await call(AffinityMiddleware(inner, settings=SETTINGS), scope)
    assert inner.scopes == [scope]
    assert sent == list(inner.response)


async def test_a_response_naming_a_new_inner_session_gets_a_new_token() -> None:
    inner = InnerApp(
        {"type": "http.response.start", "status": 200, "headers": [(b"mcp-session-id", b"another-inner-id")]},
        {"type": "http.response.body", "body": b""},
    )
    layer = AffinityMiddleware(inner, settings=SETTINGS)
    sent, _ = await call(layer, http_scope(headers=[(b"mcp-session-id", token_for(HERE))]))
    new_token = header(sent[0], b"mcp-session-id")
    assert new_token is not None
    assert CODEC.verify(new_token.decode(), now=time.time()).inner_session_id == f"{layer.workers.tag}~another-inner-id"


async def test_legacy_message_post_gets_its_inner_id_back_in_the_query() -> None:
    inner = InnerApp()
    query = b"x=1&session_id=" + token_for(HERE) + b"&y=2"
    await call(AffinityMiddleware(inner, settings=SETTINGS), http_scope(path="/messages/", query=query))
    assert inner.scopes[0]["query_string"] == b"x=1&session_id=" + INNER.encode() + b"&y=2"


async def test_legacy_message_for_another_machine_is_replayed_and_bad_ones_get_404() -> None:
    inner = InnerApp()
    middleware = AffinityMiddleware(inner, settings=SETTINGS)
    sent, reads = await call(middleware, http_scope(path="/messages/", query=b"session_id=" + token_for(OTHER)))
    assert (sent[0]["status"], header(sent[0], b"fly-replay")) == (
        307,
        f"instance={OTHER};timeout=5s;fallback=force_self".encode(),
    )
    assert reads == 0
    sent, _ = await call(middleware, http_scope(path="/messages/", query=b"session_id=" + INNER.encode()))
    assert sent[0]["status"] == 404
    assert inner.scopes == []


async def test_a_percent_encoded_session_id_of_any_characters_gets_404() -> None:
    inner = InnerApp()
    query = b"session_id=%D9%A3%F0%9F%98%80%00%0A" + token_for(OTHER)
    sent, _ = await call(AffinityMiddleware(inner, settings=SETTINGS), http_scope(path="/messages/", query=query))
    assert sent[0]["status"] == 404
    assert inner.scopes == []


async def test_legacy_endpoint_event_is_rewritten_and_later_chunks_stream_unchanged() -> None:
    endpoint = b"event: endpoint\r\ndata: /messages/?session_id=" + INNER.encode() + b"\r\n\r\n"
    later = [b": ping\r\n\r\n", b'event: message\r\ndata: {"id": 1}\r\n\r\n']
    inner = InnerApp(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
        },
        {"type": "http.response.body", "body": endpoint[:20], "more_body": True},
        {"type": "http.response.body", "body": endpoint[20:], "more_body": True},
        *({"type": "http.response.body", "body": chunk, "more_body": True} for chunk in later),
        {"type": "http.response.body", "body": b"", "more_body": False},
    )
    layer = AffinityMiddleware(inner, settings=SETTINGS)
    sent, _ = await call(layer, http_scope("GET", "/sse"))
    bodies = [message["body"] for message in sent[1:]]
    assert bodies[0] == b""
    token = bodies[1].split(b"session_id=")[1].split(b"\r\n")[0].decode()
    assert CODEC.verify(token, now=time.time()).inner_session_id == f"{layer.workers.tag}~{INNER}"
    assert bodies[2:] == [*later, b""]


async def test_lifespan_and_websocket_scopes_pass_straight_through() -> None:
    seen: list[tuple[str, Any]] = []

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        message = await receive()
        seen.append((scope["type"], message["type"]))
        await send({"type": f"{message['type']}.complete"})

    middleware = AffinityMiddleware(inner, settings=SETTINGS)
    for scope_type, message_type in (("lifespan", "lifespan.startup"), ("websocket", "websocket.connect")):
        sent: list[dict[str, Any]] = []

        async def receive(message_type: str = message_type) -> dict[str, Any]:
            return {"type": message_type}

        async def send(message: dict[str, Any], sent: list[dict[str, Any]] = sent) -> None:
            sent.append(message)

        await middleware({"type": scope_type, "headers": [(b"mcp-session-id", b"x")]}, receive, send)
        assert sent == [{"type": f"{message_type}.complete"}]
    assert seen == [("lifespan", "lifespan.startup"), ("websocket", "websocket.connect")]


async def test_each_decision_not_served_here_is_one_structured_log_line(caplog: pytest.LogCaptureFixture) -> None:
    headers = [(b"mcp-session-id", token_for(OTHER)), (b"fly-request-id", b"01JDABCDEF-ams")]
    with caplog.at_level(logging.INFO, logger="fly_replay_router.affinity"):
        await call(AffinityMiddleware(InnerApp(), settings=SETTINGS), http_scope(headers=headers))
        await call(
            AffinityMiddleware(InnerApp(), settings=SETTINGS),
            http_scope(headers=[(b"mcp-session-id", token_for(HERE))]),
        )
    [record] = [
        record for record in caplog.records if record.name == "fly_replay_router.affinity"
    ]  # served here: no line
    assert record.getMessage() == (
        f"affinity outcome=replayed reason=- owner={OTHER} machine={HERE} "
        "request_id=01JDABCDEF-ams method=POST path=/mcp"
    )
    assert (record.outcome, record.owner, record.request_id) == ("replayed", OTHER, "01JDABCDEF-ams")  # type: ignore[attr-defined]


async def test_a_path_with_an_encoded_newline_cannot_write_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    forged = "/mcp\naffinity outcome=forwarded reason=- owner=evil machine=x"
    scope = {**http_scope(path=forged), "method": "POST \x1b[2J"}
    scope["headers"] = [(b"mcp-session-id", b"bad"), (b"fly-request-id", b'01J "quoted" \\ id')]
    with caplog.at_level(logging.INFO, logger="fly_replay_router.affinity"):
        await call(AffinityMiddleware(InnerApp(), settings=SETTINGS), scope)
    [record] = [record for record in caplog.records if record.name == "fly_replay_router.affinity"]
    line = record.getMessage()
    assert "\n" not in line
    assert "\x1b" not in line
    # Read as logfmt (quoted values are one field), the line has each field once, owner "-".
    fields = [token.split("=", 1) for token in shlex.split(line)[1:]]
    assert [key for key, _ in fields] == ["outcome", "reason", "owner", "machine", "request_id", "method", "path"]
    assert dict(fields)["owner"] == "-"
    assert 'path="/mcp\\naffinity outcome=forwarded reason=- owner=evil machine=x"' in line
    assert 'request_id="01J \\"quoted\\" \\\\ id"' in line


async def test_a_flood_of_rejections_is_a_few_lines_and_a_count(caplog: pytest.LogCaptureFixture) -> None:
    middleware = AffinityMiddleware(InnerApp(), settings=SETTINGS)
    with caplog.at_level(logging.INFO, logger="fly_replay_router.affinity"):
        for number in range(200):
            await call(middleware, http_scope(headers=[(b"mcp-session-id", f"forged-{number}".encode())]))
        middleware._log.flush()  # the summary a timer writes when the window ends
    lines = [record.getMessage() for record in caplog.records if record.name == "fly_replay_router.affinity"]
    assert len(lines) <= 10
    assert lines[-1].startswith("affinity outcome=rejected suppressed=")
    written = sum(" reason=malformed_token " in line for line in lines)
    assert written + int(lines[-1].split("suppressed=")[1].split()[0]) == 200
    assert "reasons=malformed_token:" in lines[-1]


def test_the_rejection_summary_comes_once_per_window() -> None:
    now = [0.0]
    log = DecisionLog(HERE, window=10, burst=2, clock=lambda: now[0])
    scope = http_scope()
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("fly_replay_router.affinity")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        for reason in ("bad_signature", "bad_signature", "token_expired", "bad_signature", "ambiguous_carrier"):
            log.decision(scope, "rejected", reason, None)
        log.decision(scope, "replayed", "", OTHER)  # ordinary traffic is never held back
        assert len(records) == 3
        now[0] = 10.5
        log.decision(scope, "rejected", "token_expired", None)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert records[3] == (
        "affinity outcome=rejected suppressed=3 reasons=ambiguous_carrier:1,bad_signature:1,token_expired:1 "
        f"window_s=10 machine={HERE}"
    )
    assert "reason=token_expired" in records[4]
    assert len(records) == 5


class RaisesAfterAnswering:
    """An inner app that answers in full, then raises (as the SDK's GET /sse does after its 421)."""

    def __init__(self, status: int, error: Exception) -> None:
        self.status = status
        self.error = error

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b"refused"})
        raise self.error


async def test_only_the_sdks_error_after_its_own_421_is_absorbed() -> None:
    absorbed = AffinityMiddleware(RaisesAfterAnswering(421, ValueError("Request validation failed")), settings=SETTINGS)
    sent, _ = await call(absorbed, http_scope("GET", "/sse"))
    assert sent[0]["status"] == 421
    for status, error in ((200, ValueError("boom")), (421, RuntimeError("boom")), (500, ValueError("boom"))):
        with pytest.raises(type(error)):
            await call(AffinityMiddleware(RaisesAfterAnswering(status, error), settings=SETTINGS), http_scope("GET"))


class HeadersOnce:
    """Response headers an app gives as a one-pass iterable (ASGI allows any iterable of pairs)."""

    def __init__(self, pairs: list[tuple[bytes, bytes]]) -> None:
        self.pairs = pairs

    def __iter__(self) -> Any:
        pairs, self.pairs = self.pairs, []
        return iter(pairs)


@pytest.mark.parametrize("request_session", ["served", "minted", "none"])
async def test_headers_given_as_a_one_pass_iterable_all_reach_the_client(request_session: str) -> None:
    pairs = [(b"content-type", b"text/event-stream"), (b"x-kept", b"1")]
    if request_session != "none":
        pairs.append((b"mcp-session-id", INNER.encode() if request_session == "served" else b"new-inner-id"))
    inner = InnerApp(
        {"type": "http.response.start", "status": 200, "headers": HeadersOnce(pairs)},
        {"type": "http.response.body", "body": b"event: message\r\ndata: {}\r\n\r\n"},
    )
    layer = AffinityMiddleware(inner, settings=SETTINGS)
    headers = (
        [(b"mcp-session-id", token_for(HERE, f"{layer.workers.tag}~{INNER}"))] if request_session == "served" else []
    )
    sent, _ = await call(UncompressedStreamsMiddleware(layer), http_scope(method="GET", headers=headers))
    received = dict(sent[0]["headers"])
    assert received[b"x-kept"] == b"1"
    assert received[b"content-type"] == b"text/event-stream"
    assert received[b"content-encoding"] == b"none"  # the stream is marked as uncompressed
    if request_session != "none":
        assert CODEC.verify(received[b"mcp-session-id"].decode(), now=time.time()).owner_machine_id == HERE


async def test_request_and_response_header_pairs_given_as_lists_are_read_as_pairs() -> None:
    # ASGI gives header pairs as "two-item iterables": a server or test client may use lists. Before,
    # a served request with list pairs was a 500 (the carrier was looked up as a tuple).
    inner = InnerApp(
        {"type": "http.response.start", "status": 200, "headers": [[b"mcp-session-id", INNER.encode()]]},
        {"type": "http.response.body", "body": b"{}"},
    )
    layer = AffinityMiddleware(inner, settings=SETTINGS)
    token = token_for(HERE, f"{layer.workers.tag}~{INNER}")
    scope = http_scope(headers=[[b"host", b"x"], [b"mcp-session-id", token]])  # type: ignore[list-item]
    sent, _ = await call(layer, scope)
    assert sent[0]["status"] == 200
    assert [list(pair) for pair in inner.scopes[0]["headers"]] == [[b"host", b"x"], [b"mcp-session-id", INNER.encode()]]
    assert dict(sent[0]["headers"])[b"mcp-session-id"] == token  # the client's own token, echoed
