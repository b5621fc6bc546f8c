"""What every compatibility client prints: one JSON line with each session's (machine, count) calls."""

import json
from importlib.metadata import version


def report(sdk: str, sessions: list[list[tuple[str, int]]], tokens: list[str]) -> None:
    print(json.dumps({"sdk": sdk, "sdk_version": version(sdk), "sessions": sessions, "tokens": tokens}))
