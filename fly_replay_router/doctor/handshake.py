"""The first contact: is the endpoint reachable, is its ``Host`` allowed, does it open a session with a sealed token.

All three are read from one ``initialize`` request. A sealed token names its owner machine before the
first ``.`` (``<machine id>.<key>.<sealed id>``); the inner server's own id (a UUID's 32 hex digits in
the official SDK) leaving as is means the affinity layer is not in front of this route.

References: MCP "Transports", session management
(https://modelcontextprotocol.io/specification/2025-11-25/basic/transports); RFC 9110 15.5.20 (421
Misdirected Request); Fly "Error codes and troubleshooting" (https://fly.io/docs/reference/error-codes/).
"""

from __future__ import annotations

from dataclasses import dataclass

from fly_replay_router.doctor.results import CheckResult, failed, passed, unknown
from fly_replay_router.doctor.served_by import ServedBy
from fly_replay_router.doctor.wire import Exchange
from fly_replay_router.fly import MACHINE_ID_PATTERN
from fly_replay_router.protocol import owner_of


@dataclass(frozen=True, slots=True)
class FirstContact:
    """The verdicts of the first ``initialize``, and the session it opened (if it did)."""

    results: list[CheckResult]
    token: str | None
    served_by: ServedBy | None

    @property
    def usable(self) -> bool:
        """A sealed session was opened: the checks that need sessions can run."""
        return self.token is not None and all(result.outcome == "pass" for result in self.results)


def is_sealed(token: str) -> bool:
    """The token has this project's shape: an owner machine id, a key id, a sealed part."""
    parts = token.split(".")
    return len(parts) >= 3 and bool(MACHINE_ID_PATTERN.fullmatch(parts[0])) and len(parts[-1]) >= 32


def judge_first_contact(exchange: Exchange, host: str) -> FirstContact:
    """The verdicts ``reachable``, ``host_allowed`` and ``handshake`` for the answer to the first ``initialize``."""
    timing = round(exchange.seconds * 1000, 1)
    if exchange.status is None:
        reachable = failed(
            "reachable",
            f"nothing answered: {exchange.error}",
            "the URL is wrong, DNS does not resolve it, or no machine of the app is running and "
            "auto_start_machines is off",
            error=exchange.error,
            elapsed_ms=timing,
        )
        return FirstContact([reachable, _not_run("host_allowed"), _not_run("handshake")], None, None)
    served_by = exchange.served_by
    if exchange.status >= 500 and served_by is None and exchange.status not in (501, 505):
        reachable = failed(
            "reachable",
            f"the proxy answered {exchange.status} without reaching the app",
            "no machine could take the request: every machine is stopped with autostart off, crashed at start, "
            "or fails its health check (fly logs, fly status)",
            status=exchange.status,
            elapsed_ms=timing,
        )
        return FirstContact([reachable, _not_run("host_allowed"), _not_run("handshake")], None, None)
    results = [
        passed("reachable", f"answered {exchange.status} in {timing} ms", status=exchange.status, elapsed_ms=timing)
    ]
    if exchange.status == 421:
        results.append(
            failed(
                "host_allowed",
                f"421 Misdirected Request for Host {host}",
                f"the MCP server's DNS-rebinding check does not know {host}: add it to AFFINITY_ALLOWED_HOSTS "
                f"(fly secrets set AFFINITY_ALLOWED_HOSTS={host}) or to the SDK's allowed hosts",
                status=421,
                host=host,
            )
        )
        return FirstContact([*results, _not_run("handshake")], None, None)
    results.append(passed("host_allowed", f"Host {host} accepted", host=host, status=exchange.status))
    results.append(_judge_handshake(exchange, served_by))
    token = exchange.token if results[-1].outcome == "pass" else None
    return FirstContact(results, token, served_by)


def _judge_handshake(exchange: Exchange, served_by: ServedBy | None) -> CheckResult:
    status = exchange.status
    if status in (401, 403):
        return failed(
            "handshake",
            f"initialize got {status}",
            "the server wants credentials: run the doctor again with --header 'Authorization: Bearer ...'",
            status=status,
        )
    result = (exchange.message or {}).get("result")
    if not exchange.ok or not isinstance(result, dict):
        return failed(
            "handshake",
            f"initialize got {exchange.describe()} without an initialize result",
            "the URL is not the MCP endpoint (give the full path, such as https://<app>.fly.dev/mcp), or the "
            "server does not speak the handshake era (2024-11-05 to 2025-11-25)",
            status=status,
            content_type=exchange.headers.get("content-type"),
        )
    token = exchange.token
    version = result.get("protocolVersion")
    if token is None:
        return failed(
            "handshake",
            f"initialize answered (protocol {version}) without an Mcp-Session-Id",
            "the server runs stateless (no sessions), so there is nothing to keep on one machine; or a proxy "
            "in front drops the Mcp-Session-Id header",
            status=status,
            protocol_version=version,
        )
    if not is_sealed(token):
        return failed(
            "handshake",
            "the session id left the server unsealed",
            "the affinity layer does not wrap this route: the inner server's own session id reached the client",
            status=status,
            token_length=len(token),
        )
    evidence = {
        "status": status,
        "protocol_version": version,
        "owner": owner_of(token),
        "served_by": None if served_by is None else served_by.machine,
        "answered_as": exchange.headers.get("content-type", "").split(";", 1)[0],
    }
    if served_by is not None and served_by.machine != owner_of(token):
        return failed(
            "handshake",
            f"the token names machine {owner_of(token)} but machine {served_by.machine} minted it",
            "the machines' FLY_MACHINE_ID differs from what the layer was configured with (set machine_id from "
            "FLY_MACHINE_ID)",
            **evidence,
        )
    return passed("handshake", f"protocol {version}, sealed token owned by machine {owner_of(token)}", **evidence)


def _not_run(name: str) -> CheckResult:
    return unknown(name, "not checked: an earlier check failed")
