"""The affinity layer's log lines: one ``key=value`` line per decision, escaped, rejections summarised.

Every line starts with ``affinity`` and carries ``outcome``, ``reason``, ``owner``, ``machine``,
``request_id``, ``method`` and ``path`` (the same fields are on the record as ``extra``, for
structured handlers). Values a client chooses (the path, the method, ``Fly-Request-Id``) are written
bare only when they are visible ASCII without quotes or backslashes; anything else is written as a
JSON string (``path="/a\\nb"``), so no request can start a line of its own or add a field.

Replays and forwards are ordinary traffic: one line each. A hand-over to the worker that owns the
session is how a machine with N workers serves (N - 1) / N of its requests: its line is written at
``DEBUG`` only (it cost a hand-over about a fifth of its own instructions at ``INFO``), and the
metrics count every one. Rejections are what a flood is made of:
the first ``burst`` of each ``window`` seconds are written in full, the rest only counted, and one
summary line (``outcome=rejected suppressed=<n> reasons=<reason>:<n>,...``) follows when the window
ends. The counts per reason are also in the metrics (``affinity_decisions_total``).

Reference: logfmt (https://brandur.org/logfmt); RFC 8259 section 7 (string escapes).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable

from fly_replay_router.asgi import Scope

logger = logging.getLogger("fly_replay_router.affinity")

REJECTION_WINDOW_SECONDS = 10.0
REJECTIONS_LOGGED_PER_WINDOW = 5
_BARE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_FLY_REQUEST_ID = b"fly-request-id"
# Outcomes logged below info: a hand-over is most of the traffic of a machine with several workers.
_LEVELS = {"handed_over": logging.DEBUG}


def escape(value: str) -> str:
    """``value`` as one token of a log line: bare if it is plain visible ASCII, else a JSON string."""
    if _BARE.fullmatch(value):
        return value
    return json.dumps(value, ensure_ascii=True).replace("\x7f", "\\u007f")


def format_fields(fields: dict[str, str]) -> str:
    """``key=value`` pairs separated by spaces, every value escaped."""
    return " ".join(f"{key}={escape(value)}" for key, value in fields.items())


class DecisionLog:
    """Writes the layer's decision lines for one machine, with rejections rate-limited."""

    def __init__(
        self,
        machine_id: str,
        *,
        window: float = REJECTION_WINDOW_SECONDS,
        burst: int = REJECTIONS_LOGGED_PER_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.machine_id = machine_id
        self._window = window
        self._burst = burst
        self._clock = clock
        self._window_ends = 0.0
        self._written = 0
        self._suppressed: dict[str, int] = {}
        self._summary_scheduled = False

    def decision(self, scope: Scope, outcome: str, reason: str, owner: str | None) -> None:
        """One line for a request the layer did not simply serve here (rate-limited if rejected; a
        hand-over's at debug, see the module docstring)."""
        level = _LEVELS.get(outcome, logging.INFO)
        if not logger.isEnabledFor(level):
            return
        if outcome == "rejected" and not self._admit(reason):
            return
        request_id = next((value for name, value in scope["headers"] if name == _FLY_REQUEST_ID), b"-")
        fields = {
            "outcome": outcome,
            "reason": reason or "-",
            "owner": owner or "-",
            "machine": self.machine_id,
            "request_id": request_id.decode("latin-1"),
            "method": scope["method"],
            "path": scope["path"],
        }
        logger.log(level, "affinity %s", format_fields(fields), extra=fields)

    def _admit(self, reason: str) -> bool:
        now = self._clock()
        if now >= self._window_ends:
            self.flush()
            self._window_ends = now + self._window
            self._written = 0
        if self._written < self._burst:
            self._written += 1
            return True
        self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
        if not self._summary_scheduled:
            self._schedule_summary(self._window_ends - now)
        return False

    def flush(self) -> None:
        """Write the summary of the rejections not written in full, if any."""
        self._summary_scheduled = False
        if not self._suppressed:
            return
        suppressed, self._suppressed = self._suppressed, {}
        fields = {
            "outcome": "rejected",
            "suppressed": str(sum(suppressed.values())),
            "reasons": ",".join(f"{reason}:{count}" for reason, count in sorted(suppressed.items())),
            "window_s": f"{self._window:g}",
            "machine": self.machine_id,
        }
        logger.info("affinity %s", format_fields(fields), extra={"outcome": "rejected", "suppressed": suppressed})

    def _schedule_summary(self, delay: float) -> None:
        # A flood that stops still gets its summary line, not only when the next rejection comes.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._summary_scheduled = True
        loop.call_later(max(delay, 0.0), self.flush)
