"""Example client: open MCP sessions against a fleet and show which machine answered each call.

``fly-replay-client`` (``python -m fly_replay_router.client``) runs against the local fleet
(``fly-replay-edge``) by default. Each session calls ``whoami`` and ``count`` a few times with
the official MCP client: with affinity, every call of a session is answered by one machine and
the count goes 1, 2, 3 without gaps, whichever machine the balancer picked first.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any
from urllib.parse import urlsplit, urlunsplit

try:
    import anyio
    import httpx
    import httpx2
    from mcp import Client
    from mcp.client.sse import sse_client
    from mcp.client.streamable_http import streamable_http_client
except ImportError as exc:  # the demo extra is missing, or the project is on the SDK's 1.x line
    raise SystemExit(
        f"the example client needs the official MCP SDK 2.x ({exc}): pip install 'fly-replay-router[demo]'"
    ) from None

from fly_replay_router.protocol import owner_of


def _text(result: Any) -> str:
    return str(result.content[0].text)


async def run_session(number: int, url: str, transport: str, calls: int, pause: float = 0.0) -> str:
    """One session; prints a line per call.

    Returns ``"stuck"`` (one machine answered every call, counting without gaps), ``"lost"`` (a call
    failed: the machine holding the session was stopped or replaced) or ``"moved"`` (calls reached
    different machines or the count skipped: what affinity exists to prevent).
    """
    tokens: list[str] = []

    async def record_token(response: httpx2.Response) -> None:
        if "mcp-session-id" in response.headers and not tokens:
            tokens.append(response.headers["mcp-session-id"])

    async with httpx2.AsyncClient(event_hooks={"response": [record_token]}, timeout=60) as http:
        if transport == "sse":
            connection: Any = sse_client(f"{url}/sse", on_session_created=tokens.append)
        else:
            connection = streamable_http_client(f"{url}/mcp", http_client=http)
        async with Client(connection, mode="legacy") as client:
            token = tokens[0] if tokens else "?"
            print(f"session {number}: token {token[:28]}...  (owner {owner_of(token)})")
            machines, counts = set(), []
            for call in range(1, calls + 1):
                if call > 1:
                    await anyio.sleep(pause)
                try:
                    machine = _text(await client.call_tool("whoami", {}))
                    count = int(_text(await client.call_tool("count", {})))
                except Exception as exc:  # the SDK reports a lost session as an error on the call
                    print(f"  call {call}: failed: {exc} (the session is gone: a new one starts at 1)")
                    return "lost"
                machines.add(machine)
                counts.append(count)
                print(f"  call {call}: whoami={machine} count={count}", flush=True)
    return "stuck" if len(machines) == 1 and counts == list(range(1, calls + 1)) else "moved"


async def main_async(url: str, sessions: int, calls: int, transport: str, pause: float = 0.0) -> int:
    outcomes = [await run_session(number, url, transport, calls, pause) for number in range(1, sessions + 1)]
    try:
        async with httpx.AsyncClient(timeout=5) as raw:
            status = (await raw.get(f"{url}/_edge/status")).json()
        print(f"edge: {status['replays']} replays so far, {status['replay_cache_hits']} replay-cache hits")
    except (httpx.HTTPError, ValueError, KeyError, json.JSONDecodeError):
        pass  # not behind the local edge: nothing more to show
    moved, lost = outcomes.count("moved"), outcomes.count("lost")
    if lost:
        print(f"{lost} session(s) lost: their machine was stopped or replaced, so they start over")
    if moved:
        print(f"{moved} session(s) did NOT stick to one machine")
    if not moved and not lost:
        print("every session stuck to its machine")
    return 1 if moved or lost else 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the sessions; exit status 1 if any session did not stick."""
    parser = argparse.ArgumentParser(prog="python -m fly_replay_router.client", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the fleet's base URL (default: %(default)s)")
    parser.add_argument("--sessions", type=int, default=3, help="sessions to open, one after another (default: 3)")
    parser.add_argument("--calls", type=int, default=3, help="whoami + count calls per session (default: 3)")
    parser.add_argument(
        "--pause",
        type=float,
        default=0.0,
        help="seconds to wait between calls: time to suspend or stop the session's machine (default: 0)",
    )
    parser.add_argument(
        "--transport",
        choices=("streamable", "sse"),
        default="streamable",
        help="streamable HTTP at /mcp, or legacy HTTP+SSE at /sse (default: streamable)",
    )
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.calls < 1 or args.pause < 0:
        parser.error("--sessions and --calls must be at least 1, --pause at least 0")
    parts = urlsplit(args.url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        parser.error(f"--url {args.url!r} is not an http(s) URL such as http://127.0.0.1:8080")
    base = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    unreachable: list[BaseException] = []
    try:
        return anyio.run(main_async, base, args.sessions, args.calls, args.transport, args.pause)
    except* (httpx2.HTTPError, OSError) as group:  # the SDK raises from inside task groups
        unreachable.extend(group.exceptions)
    print(
        f"cannot reach {base}: {unreachable[0]} (is the fleet running? python -m fly_replay_router.edge)",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
