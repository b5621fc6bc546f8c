"""``fly-replay-doctor URL``: check a deployment from outside, as its clients see it.

Exit status 0 when no check failed (pass or unknown), 1 when one did, 2 for a usage error. A progress
line goes to stderr while it runs; the report (text, or ``--json``) to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import TextIO

from fly_replay_router.doctor.results import CheckResult
from fly_replay_router.doctor.run import DoctorOptions, diagnose
from fly_replay_router.doctor.streams import KEEPALIVE_LIMIT

LABELS = {"pass": "PASS", "fail": "FAIL", "unknown": "UNKNOWN"}


def parse_header(text: str) -> tuple[str, str]:
    """``'Name: value'`` as a pair; ``argparse`` reports the ValueError's message."""
    name, separator, value = text.partition(":")
    name = name.strip()
    if not separator or not name or any(char.isspace() for char in name):
        raise argparse.ArgumentTypeError(f"{text!r} is not a header: give 'Name: value'")
    return name, value.strip()


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``fly-replay-doctor``."""
    parser = argparse.ArgumentParser(
        prog="fly-replay-doctor",
        description=(
            "Check a deployed MCP server behind fly-replay-router from outside: reachable, Host allowed, sealed "
            "sessions that stick, replays, headers on replays, large bodies, event streams, refusals, private "
            "metrics. It opens its own sessions, ends them with DELETE, and changes nothing else."
        ),
        epilog="Also: python -m fly_replay_router.doctor. Exit status 1 when a check fails.",
    )
    parser.add_argument("url", metavar="URL", help="the MCP endpoint, such as https://<app>.fly.dev/mcp")
    parser.add_argument(
        "--header",
        action="append",
        type=parse_header,
        default=[],
        metavar="'NAME: VALUE'",
        help="sent on every request, such as 'Authorization: Bearer ...' (repeatable)",
    )
    parser.add_argument("--sessions", type=int, default=4, help="sessions for the stick check (default 4)")
    parser.add_argument("--requests", type=int, default=6, help="requests per session (default 6)")
    parser.add_argument(
        "--stream-wait",
        type=float,
        default=KEEPALIVE_LIMIT + 5,
        metavar="SECONDS",
        help=f"how long to wait for the event stream's first keep-alive (default {KEEPALIVE_LIMIT + 5:g})",
    )
    parser.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="per request (default 30)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON document")
    return parser


class ProgressLine:
    """One line on stderr, rewritten in place on a terminal, one line per step otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.width = 0

    def __call__(self, text: str) -> None:
        line = f"fly-replay-doctor: {text}"
        if self.tty:
            self.stream.write("\r" + line.ljust(self.width))
            self.width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self) -> None:
        """Clear the line on a terminal before the report."""
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()


def render_text(url: str, results: list[CheckResult]) -> str:
    """The report for a person: one block per check, evidence on one line, cause and fix on failures."""
    lines = [f"fly-replay-doctor {url}", ""]
    for result in results:
        lines.append(f"  {LABELS[result.outcome]:<8} {result.name.replace('_', ' '):<24} {result.summary}")
        if result.outcome == "fail":
            lines.append(f"  {'':<8} {'':<24} cause: {result.cause}")
            lines.append(f"  {'':<8} {'':<24} fix:   {result.fix}")
        if result.evidence:
            lines.append(f"  {'':<8} {'':<24} evidence: {json.dumps(result.evidence, separators=(', ', ': '))}")
    counts = {outcome: sum(1 for r in results if r.outcome == outcome) for outcome in LABELS}
    lines += ["", f"{counts['pass']} passed, {counts['fail']} failed, {counts['unknown']} unknown"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """The console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = DoctorOptions(
            url=args.url,
            headers=tuple(args.header),
            sessions=args.sessions,
            requests=args.requests,
            stream_wait=args.stream_wait,
            timeout=args.timeout,
        )
    except ValueError as exc:
        parser.error(str(exc))
    progress = ProgressLine(sys.stderr)
    try:
        results = asyncio.run(diagnose(options, progress))
    except KeyboardInterrupt:
        progress.done()
        raise SystemExit(130) from None
    progress.done()
    if args.json:
        failed = any(result.outcome == "fail" for result in results)
        document = {"url": options.url, "ok": not failed, "checks": [result.to_json() for result in results]}
        print(json.dumps(document, indent=2))
    else:
        print(render_text(options.url, results))
    raise SystemExit(1 if any(result.outcome == "fail" for result in results) else 0)
