"""Response headers the client gets back through the edge."""

from __future__ import annotations

from fly_replay_router.edge.headers import response_headers


def test_response_hop_by_hop_and_proxy_instructions_are_dropped() -> None:
    upstream = [
        (b"Content-Type", b"text/event-stream"),
        (b"Connection", b"keep-alive, X-Private"),
        (b"X-Private", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"fly-replay-cache", b"/x/*"),
        (b"fly-replay-cache-ttl-secs", b"60"),
        (b"fly-request-id", b"forged"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
    ]
    headers = response_headers(upstream, request_id="01abc-lcl")
    assert headers == [
        (b"Content-Type", b"text/event-stream"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"fly-request-id", b"01abc-lcl"),
        (b"via", b"1.1 fly.io"),
    ]
