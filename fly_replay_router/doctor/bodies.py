"""Large bodies: a request over 1 MiB for a session owned by another machine is answered.

Fly's proxy cannot replay a body over 1 MB, so the layer forwards such a request to its owner over the
private network itself; the owner's answer says ``via=forward``. Where a request lands is the proxy's
choice: the doctor sends up to ``attempts`` large ``ping`` requests (padded in ``params._meta``) until
one lands on another machine than the owner.

References: Fly "Dynamic request routing with fly-replay", limits
(https://fly.io/docs/networking/dynamic-request-routing/); Fly "Private Networking"
(https://fly.io/docs/networking/private-networking/).
"""

from __future__ import annotations

import json

from fly_replay_router.doctor.results import CheckResult, failed, milliseconds, passed, status_counts, unknown
from fly_replay_router.doctor.sticking import close_session, open_session
from fly_replay_router.doctor.wire import Endpoint, Exchange

# Over Fly's 1 MB replay limit with a margin, and well under the official SDK's 4 MiB body cap.
LARGE_BODY_BYTES = 1024 * 1024 + 100 * 1024


def large_ping(request_id: int) -> bytes:
    """A JSON-RPC ``ping`` of about ``LARGE_BODY_BYTES``: the padding is in ``_meta``, which servers ignore."""

    def body(padding: str) -> bytes:
        meta = {"doctor/padding": padding}
        message = {"jsonrpc": "2.0", "id": request_id, "method": "ping", "params": {"_meta": meta}}
        return json.dumps(message, separators=(",", ":")).encode()

    return body("x" * (LARGE_BODY_BYTES - len(body(""))))


async def check_large_bodies(endpoint: Endpoint, attempts: int) -> CheckResult:
    """Send large pings in one session until one is forwarded to its owner, or ``attempts`` ran out."""
    run = await open_session(endpoint)
    if run.token is None or run.owner is None:
        return unknown("large_bodies", "not checked: no session with an affinity-served-by header could be opened")
    sent: list[Exchange] = []
    small: Exchange | None = None
    try:
        for _ in range(attempts):
            exchange = await endpoint.post("ping", token=run.token, body=large_ping(endpoint.next_id()))
            sent.append(exchange)
            served = exchange.served_by
            if not exchange.ok:
                # Is the session itself still there? Then only the way the large body took is broken.
                small = await endpoint.post("ping", token=run.token)
                break
            if served is not None and served.via == "forward":
                break
    finally:
        await close_session(endpoint, run)
    last = sent[-1]
    forwarded = [exchange for exchange in sent if exchange.served_by and exchange.served_by.via == "forward"]
    evidence = {
        "body_bytes": LARGE_BODY_BYTES,
        "sent": len(sent),
        "statuses": status_counts([exchange.describe() for exchange in sent]),
        "forwarded": len(forwarded),
        "median_ms": milliseconds([exchange.seconds for exchange in sent if exchange.ok]),
        "small_request_after": None if small is None else small.describe(),
    }
    if not last.ok:
        if last.status == 413:
            cause = "the server refuses bodies this large (413): raise its body limit if clients send big arguments"
        elif last.status in (404, 502, 503, 504) and small is not None and small.ok:
            cause = (
                f"the session is alive (a small request right after got {small.status}), but the machine that "
                f"received the large body could not reach the session's owner over the private network "
                f"({last.status}): the app must also listen on IPv6 (Fly's private network is IPv6: bind [::] as "
                "fly_replay_router.serve does), on the port AFFINITY_PEER_URL names"
            )
        else:
            cause = (
                f"a body over 1 MiB got {last.describe()}; Fly's proxy cannot replay it, so the layer must forward it"
            )
        return failed("large_bodies", f"a {LARGE_BODY_BYTES:,}-byte request got {last.describe()}", cause, **evidence)
    if forwarded:
        return passed(
            "large_bodies",
            f"a {LARGE_BODY_BYTES:,}-byte request landed on another machine and was forwarded to its owner",
            **evidence,
        )
    return unknown(
        "large_bodies",
        f"all {len(sent)} large requests landed on their session's owner: forwarding was not exercised "
        "(one machine, Fly's replay cache sending the session straight to its owner, or the proxy kept choosing it)",
        **evidence,
    )
