"""Session carriers: the layer reads them exactly as the server behind it does, or refuses.

The server is the official SDK on Starlette: ``request.headers.get("mcp-session-id")`` and
``request.query_params.get("session_id")``. The differential test generates carrier forms with
hypothesis (``FUZZ_EXAMPLES``, 10,000 by default; ``FUZZ_EXAMPLES=100000`` for the long run) and
checks that the value the server reads is always one the layer verified, or that the layer refused.
"""

from __future__ import annotations

import asyncio
import json
import string
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.datastructures import Headers, QueryParams

import fly_replay_router.affinity.middleware as middleware_module
from fly_replay_router import AffinityMiddleware, AffinitySettings
from fly_replay_router.affinity.carriers import AmbiguousCarrier, find_query_carrier
from fly_replay_router.affinity.token import InvalidToken, SessionToken, TokenCodec
from fly_replay_router.fly import parse_replay_header
from tests.conftest import APP_NAME, SECRET, start_machine
from tests.test_fuzz import EXAMPLES, NOW, FrozenClock, Inputs, RecordingForwarder, quiet_layer_logs, run_fuzz

HERE = "aaaaaaaaaaaaaa"
OTHER = "bbbbbbbbbbbbbb"
APP = "carrier-app"
KEY = "carrier-test-key-0123456789"
MAX_AGE = 3600.0
SETTINGS = AffinitySettings(machine_id=HERE, secret_keys=(KEY,), app_name=APP, max_token_age=MAX_AGE)
CODEC = TokenCodec((KEY,), app_name=APP)
INNER = "7da4e80665bd4c6fb73231d63f0c227f"
ATTACKER_INNER = "0123456789abcdef0123456789abcdef"


# --- the query parser, case by case --------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "value"),
    [
        (b"", None),
        (b"a=1&b=2", None),
        (b"q=%20x", None),
        (b"session_id=abc", "abc"),
        (b"x=1&session_id=abc&y=2", "abc"),
        (b"%73ession_id=abc", "abc"),
        (b"session%5Fid=abc", "abc"),
        (b"session_id=a%2Eb", "a.b"),
        (b"session_id=a+b", "a b"),
        (b"session_id", ""),
        (b"session_id=", ""),
        (b"session_id=a=b", "a=b"),
        (b"session_idx=abc", None),
        (b"&&session_id=abc&&", "abc"),
    ],
)
def test_the_carrier_is_the_value_starlette_gives_the_server(query: bytes, value: str | None) -> None:
    carrier = find_query_carrier(query)
    assert (carrier.value if carrier else None) == value
    assert QueryParams(query).get("session_id") == value


@pytest.mark.parametrize(
    "query",
    [
        b"session_id=a&session_id=b",
        b"session_id=a&%73ession_id=b",
        b"session_id=token&session_id=",
        b"a=1;session_id=b",
        b"session_id=a;session_id=b",
        b"Session_ID=b",
        b"SESSION_ID=b&session_id=a",
        b"session_id%5B%5D=b",
        b"session_id[]=b",
        b"session_id[0]=b",
        b"%20session_id=b",
        b"session_id%00=b",
        b"session%255Fid=b",
        b"session_id+=b",
    ],
)
def test_anything_another_parser_could_read_as_a_session_is_ambiguous(query: bytes) -> None:
    with pytest.raises(AmbiguousCarrier):
        find_query_carrier(query)


def test_only_the_carrier_is_replaced_every_other_byte_stays() -> None:
    query = b"a=%41+b&%73ession_id=tok%2Den&z=%ZZ"
    carrier = find_query_carrier(query)
    assert carrier is not None
    assert carrier.value == "tok-en"
    assert carrier.replaced(query, INNER.encode()) == b"a=%41+b&session_id=" + INNER.encode() + b"&z=%ZZ"


# --- the four bypasses of issue 11, at the ASGI level --------------------------------------------


class InnerApp:
    """The server behind the layer: records each scope and what Starlette reads from it."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b"Accepted"})

    def sessions_read(self) -> list[str | None]:
        return [
            Headers(scope=scope).get("mcp-session-id") or QueryParams(scope["query_string"]).get("session_id")
            for scope in self.scopes
        ]


def scope_of(query: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/messages/",
        "raw_path": b"/messages/",
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8080"), *(headers or [])],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8080),
    }


async def run_layer(layer: Any, scope: dict[str, Any]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    body = [{"type": "http.request", "body": b"{}", "more_body": False}]

    async def receive() -> dict[str, Any]:
        return body.pop(0) if body else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await layer(scope, receive, send)
    return sent


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("query", "headers"),
    [
        pytest.param(b"%73ession_id=" + INNER.encode(), [], id="a name the app decodes to session_id"),
        pytest.param(b"session_id={attacker}&session_id=" + INNER.encode(), [], id="a repeated session_id"),
        pytest.param(
            b"session_id=" + INNER.encode(), [(b"mcp-session-id", b"{attacker}")], id="a header token beside the query"
        ),
        pytest.param(
            b"session_id=" + INNER.encode(),
            [(b"mcp-protocol-version", b"2026-07-28")],
            id="a 2026-07-28 protocol version",
        ),
    ],
)
async def test_a_raw_inner_id_never_reaches_the_server_whatever_rides_along(
    query: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    # The attacker holds a valid token of its own session on this machine, and the victim's inner id.
    attacker_token = CODEC.issue(HERE, ATTACKER_INNER, now=time.time()).encode()
    query = query.replace(b"{attacker}", attacker_token)
    headers = [(name, value.replace(b"{attacker}", attacker_token)) for name, value in headers]
    inner = InnerApp()
    sent = await run_layer(AffinityMiddleware(inner, settings=SETTINGS), scope_of(query, headers))
    assert INNER not in inner.sessions_read()
    assert sent[0]["status"] == 404


# --- the differential test -----------------------------------------------------------------------

# Tokens the generator plants, and what each proves to the layer at NOW.
VALUES: dict[str, SessionToken | None] = {}


def _plant(token: str, proves: SessionToken | None) -> str:
    VALUES[token] = proves
    return token


TOKEN_HERE = _plant(CODEC.issue(HERE, INNER, now=NOW - 10), SessionToken(HERE, INNER, int(NOW - 10)))
TOKEN_HERE_2 = _plant(
    CODEC.issue(HERE, ATTACKER_INNER, now=NOW - 20), SessionToken(HERE, ATTACKER_INNER, int(NOW - 20))
)
TOKEN_OTHER = _plant(CODEC.issue(OTHER, INNER, now=NOW - 30), SessionToken(OTHER, INNER, int(NOW - 30)))
TOKEN_EXPIRED = _plant(CODEC.issue(HERE, INNER, now=NOW - MAX_AGE - 5), None)
TOKEN_FOREIGN = _plant(TokenCodec(("another-key-0123456789abc",), app_name=APP).issue(HERE, INNER, now=NOW), None)
UUID_FORMS = (
    INNER,
    INNER.upper(),
    str(uuid.UUID(INNER)),
    "{" + str(uuid.UUID(INNER)) + "}",
    "urn:uuid:" + str(uuid.UUID(INNER)),
)
NAME_FORMS = ("session_id", "Session_id", "SESSION_ID", "session_id[]", " session_id", "sessionid", "session-id")
HEX = "0123456789abcdefABCDEF"


def percent_encode(inputs: Inputs, text: str) -> str:
    """``text`` with some characters percent-encoded (either hex case), some twice, maybe ``+`` for spaces."""
    out = []
    for char in text:
        roll = inputs.below(10)
        if roll == 0 and char != " ":
            encoded = "".join(f"%{byte:02X}" if inputs.flag() else f"%{byte:02x}" for byte in char.encode("utf-8"))
            out.append(encoded.replace("%", "%25") if inputs.flag(0.15) else encoded)
        elif char == " " and inputs.flag():
            out.append("+")
        else:
            out.append(char)
    return "".join(out)


def carrier_value(inputs: Inputs) -> str:
    kind = inputs.below(8)
    if kind <= 2:
        return inputs.pick((TOKEN_HERE, TOKEN_HERE_2, TOKEN_OTHER, TOKEN_EXPIRED, TOKEN_FOREIGN))
    if kind == 3:
        return inputs.pick(UUID_FORMS)
    if kind == 4:
        token = inputs.pick((TOKEN_HERE, TOKEN_OTHER))
        cut = inputs.below(len(token))
        return token[:cut] + inputs.pick(("", " ", "+", "%", "&", ";", "=", "\x00", "é")) + token[cut + 1 :]
    if kind == 5:
        return inputs.pick((TOKEN_HERE, INNER)) + inputs.pick((";session_id=" + INNER, "#x", " ", ""))
    if kind == 6:
        return ""
    return inputs.text(string.ascii_letters + string.digits + "-_.%+=&;#", 40)


def query_field(inputs: Inputs) -> str:
    kind = inputs.below(6)
    if kind <= 2:
        name = percent_encode(inputs, inputs.pick(NAME_FORMS) if inputs.flag(0.3) else "session_id")
        value = percent_encode(inputs, carrier_value(inputs))
        return name if inputs.flag(0.05) else f"{name}={value}"
    if kind == 3:
        return f"{inputs.pick(('a', 'x', 'q', 'sid'))}={percent_encode(inputs, inputs.text(HEX + ' ', 10))}"
    if kind == 4:
        return ""
    return inputs.text(string.ascii_letters + "%=&;+_" + HEX, 16)


@dataclass(frozen=True)
class CarrierCase:
    method: str
    query: bytes
    headers: list[tuple[bytes, bytes]]


def carrier_case(inputs: Inputs) -> CarrierCase:
    fields = [query_field(inputs) for _ in range(inputs.size(4))]
    header_values = [carrier_value(inputs) for _ in range(inputs.pick((0, 0, 1, 1, 2)))]
    if inputs.flag(0.4):
        # A well-formed request now and then, so that serving and routing are exercised as much as refusing.
        token = inputs.pick((TOKEN_HERE, TOKEN_HERE_2, TOKEN_OTHER))
        fields = [field for field in fields if "session" not in field.lower() and "%" not in field]
        if inputs.flag():
            fields.insert(inputs.below(len(fields) + 1), f"session_id={percent_encode(inputs, token)}")
            header_values = []
        else:
            header_values = [token]
    separators = [inputs.pick(("&", "&", "&", ";")) for _ in fields]
    query = "".join(separator + field for separator, field in zip(separators, fields, strict=True))[1:]
    headers: list[tuple[bytes, bytes]] = [(b"host", b"127.0.0.1:8080")]
    headers += [(b"mcp-session-id", value.encode("utf-8")) for value in header_values]
    if inputs.flag(0.4):
        headers.append((b"mcp-protocol-version", inputs.pick((b"2025-06-18", b"2024-11-05", b"2026-07-28", b"x"))))
    if inputs.flag(0.2):
        headers.append(inputs.pick(((b"transfer-encoding", b"chunked"), (b"content-length", b"2000000"))))
    inputs.shuffle(headers)
    return CarrierCase(inputs.pick(("POST", "POST", "GET", "DELETE")), query.encode("utf-8"), headers)


def proves(value: str) -> SessionToken | None:
    """What the value proves to a layer with SETTINGS at NOW, checked with a codec of its own."""
    try:
        return CODEC.verify(value, now=NOW, max_age=MAX_AGE)
    except InvalidToken:
        return None


def test_the_server_only_ever_reads_a_session_id_the_layer_verified(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(middleware_module, "time", FrozenClock)
    loop = asyncio.new_event_loop()
    layer_counts = {"refused": 0, "served": 0, "passed": 0, "routed": 0}

    def check(case: CarrierCase) -> None:
        inner = InnerApp()
        layer = AffinityMiddleware(inner, settings=SETTINGS)
        forwarder = RecordingForwarder()
        layer._forwarder = forwarder  # type: ignore[assignment]
        scope = {**scope_of(case.query), "method": case.method, "headers": case.headers}
        sent = loop.run_until_complete(run_layer(layer, scope))

        # What the server would read from the request as the client sent it.
        read_in_query = QueryParams(case.query).getlist("session_id")
        read_in_header = Headers(raw=case.headers).getlist("mcp-session-id")
        carried = read_in_query + read_in_header
        status = sent[0]["status"]
        if not inner.scopes:
            assert status in (307, 404), status
            if status == 404:
                layer_counts["refused"] += 1
                return
            # Routed elsewhere: only on the exact value the server would have read, proven.
            layer_counts["routed"] += 1
            assert len(carried) == 1
            session = proves(carried[0])
            assert session is not None
            assert session.owner_machine_id != HERE
            if forwarder.owners:
                assert forwarder.owners == [session.owner_machine_id]
            else:
                replay = parse_replay_header(dict(sent[0]["headers"])[b"fly-replay"].decode())
                assert replay.instance == session.owner_machine_id
            return

        [seen] = inner.scopes
        seen_in_query = QueryParams(seen["query_string"]).getlist("session_id")
        seen_in_header = Headers(scope=seen).getlist("mcp-session-id")
        if not carried:
            layer_counts["passed"] += 1
            assert (seen_in_query, seen_in_header) == ([], [])
            return
        # Served here: exactly one carrier, the token in it verified for this machine, and the
        # server now reads that token's inner id in the same carrier, nothing else.
        layer_counts["served"] += 1
        assert len(carried) == 1, carried
        session = proves(carried[0])
        assert session is not None, f"the server read {carried[0]!r}, which proves nothing"
        assert session.owner_machine_id == HERE
        expected = [session.inner_session_id]
        assert (seen_in_query, seen_in_header) == ((expected, []) if read_in_query else ([], expected))

    try:
        with quiet_layer_logs():
            assert run_fuzz(carrier_case, check) >= EXAMPLES
    finally:
        loop.close()
    # The generator must reach every branch, or the property says little.
    assert min(layer_counts.values()) > EXAMPLES // 100, layer_counts


# --- end to end: a real machine, a real legacy session ---------------------------------------------


async def open_legacy_stream(client: httpx.AsyncClient, stack: AsyncExitStack) -> tuple[str, AsyncIterator[str]]:
    """``GET /sse``: the token from the endpoint event, and the stream's remaining lines."""
    response = await stack.enter_async_context(client.stream("GET", "/sse"))
    assert response.status_code == 200
    lines = response.aiter_lines()
    async for line in lines:
        if line.startswith("data: /messages/?session_id="):
            return line.split("session_id=", 1)[1], lines
    raise AssertionError("the stream ended before its endpoint event")


@pytest.mark.anyio
async def test_a_legacy_session_is_reachable_only_through_its_token_on_a_real_machine() -> None:
    machine = start_machine("aaaaaaaaaaaaaa")
    fleet_codec = TokenCodec((SECRET,), app_name=APP_NAME)
    try:
        async with httpx.AsyncClient(base_url=machine.url, timeout=10) as client, AsyncExitStack() as stack:
            victim_token, victim_stream = await open_legacy_stream(client, stack)
            attacker_token, _ = await open_legacy_stream(client, stack)
            # Suppose the attacker learned the victim's inner id (the readable tokens of old releases
            # showed it); all it has of its own is a valid token of another session on this machine.
            victim_inner = fleet_codec.verify(victim_token, now=time.time()).inner_session_id
            assert victim_inner not in victim_token
            attacks = [
                (f"%73ession_id={victim_inner}", {}),
                (f"session_id={attacker_token}&session_id={victim_inner}", {}),
                (f"session_id={victim_inner}", {"mcp-session-id": attacker_token}),
                (f"session_id={victim_inner}", {"mcp-protocol-version": "2026-07-28"}),
                (f"session_id={victim_inner};x=1", {}),
            ]
            for number, (query, headers) in enumerate(attacks, start=101):
                ping = {"jsonrpc": "2.0", "id": number, "method": "ping"}
                response = await client.post(f"/messages/?{query}", json=ping, headers=headers)
                assert response.status_code == 404, (query, headers, response.text)
            # The victim's own token still works, and its stream carries no answer to any attack.
            control = {"jsonrpc": "2.0", "id": 200, "method": "ping"}
            response = await client.post(f"/messages/?session_id={victim_token}", json=control)
            assert response.status_code == 202
            answered = []
            async for line in victim_stream:
                if line.startswith("data: {"):
                    answered.append(json.loads(line[6:])["id"])
                    if answered[-1] == 200:
                        break
            assert answered == [200]
    finally:
        machine.stop()
