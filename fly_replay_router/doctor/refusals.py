"""Refusals: a forged, foreign or stale token gets 404, and a 2026-07-28 request passes without a session.

A client starts a new session only on 404; a 400 or a 5xx for a session that cannot be served leaves
it stuck. The sessionless era (2026-07-28) sends no ``Mcp-Session-Id`` at all: nothing in front may
demand one.

Reference: MCP "Transports", session management
(https://modelcontextprotocol.io/specification/2025-11-25/basic/transports).
"""

from __future__ import annotations

import json

from fly_replay_router.doctor.results import CheckResult, failed, passed, unknown
from fly_replay_router.doctor.sticking import close_session, open_session
from fly_replay_router.doctor.wire import MODERN_VERSION, Endpoint, Exchange
from fly_replay_router.protocol import SESSION_NOT_FOUND_BODY

_BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# A machine id no Fly app has: Fly's are 14 hex digits, never all zeros.
UNKNOWN_MACHINE = "00000000000000"
# JSON-RPC "Invalid Request": the code of the official SDK's (and the layer's) "Session not found".
SESSION_NOT_FOUND_CODE = json.loads(SESSION_NOT_FOUND_BODY)["error"]["code"]


def forged(token: str) -> str:
    """``token`` with one character of its sealed part changed: its seal no longer verifies."""
    middle = len(token) - 10
    replacement = _BASE64URL[(_BASE64URL.index(token[middle]) + 1) % len(_BASE64URL)]
    return token[:middle] + replacement + token[middle + 1 :]


def foreign(token: str) -> str:
    """``token``'s sealed part under a machine id that is not in the app."""
    return UNKNOWN_MACHINE + token[token.index(".") :]


async def check_refusals(endpoint: Endpoint) -> CheckResult:
    """Ping with forged, foreign, malformed and ended tokens; send one sessionless 2026-07-28 request."""
    run = await open_session(endpoint)
    if run.token is None:
        return unknown("refusals", "not checked: no session could be opened")
    token = run.token
    answers: dict[str, Exchange] = {}
    try:
        answers["forged"] = await endpoint.post("ping", token=forged(token))
        answers["foreign_machine"] = await endpoint.post("ping", token=foreign(token))
        answers["malformed"] = await endpoint.post("ping", token="not-a-session-token")
        answers["live"] = await endpoint.post("ping", token=token)
    finally:
        await close_session(endpoint, run)
    answers["ended"] = await endpoint.post("ping", token=token)
    modern = await modern_request(endpoint)
    evidence: dict[str, object] = {name: exchange.describe() for name, exchange in answers.items()}
    evidence["modern_2026_07_28"] = modern.describe()
    if not answers["live"].ok:
        return unknown("refusals", f"the live session itself got {answers['live'].describe()}", **evidence)
    wrong = {
        name: exchange.describe() for name, exchange in answers.items() if name != "live" and exchange.status != 404
    }
    if wrong:
        name, status = next(iter(wrong.items()))
        return failed(
            "refusals",
            f"a {name.replace('_', ' ')} token got {status}, not 404",
            "a client starts a new session only on 404; a 400 or 5xx leaves it stuck. Something in front of the "
            "layer (a gateway, an auth middleware) answers tokens it cannot use itself",
            **evidence,
        )
    if modern_refused(modern):
        return failed(
            "refusals",
            f"a sessionless {MODERN_VERSION} request got {modern.describe()}",
            "requests of the sessionless era carry no session id and must reach the server as they are; "
            "something in front demands a session",
            **evidence,
        )
    if not modern.ok:
        evidence["modern_note"] = f"the server does not speak {MODERN_VERSION}; the request reached it and was answered"
    return passed("refusals", "forged, foreign, malformed and ended tokens all got 404", **evidence)


def modern_refused(exchange: Exchange) -> bool:
    """The sessionless request was refused for want of a session (or never reached a server).

    A server that does not speak the revision answers a JSON-RPC error of its own (unknown method or
    version): the request got through. "Session not found" (the SDK's and the layer's 404) did not.
    """
    if exchange.status is None or exchange.status >= 500 or exchange.status == 421:
        return True
    error = (exchange.message or {}).get("error")
    return exchange.status == 404 and (not isinstance(error, dict) or error.get("code") == SESSION_NOT_FOUND_CODE)


async def modern_request(endpoint: Endpoint) -> Exchange:
    """``server/discover`` of the 2026-07-28 revision: no session; revision and method in headers and ``_meta``."""
    meta = {"io.modelcontextprotocol/protocolVersion": MODERN_VERSION, "io.modelcontextprotocol/clientCapabilities": {}}
    method = "server/discover"
    return await endpoint.post(method, {"_meta": meta}, version=MODERN_VERSION, extra_headers={"mcp-method": method})
