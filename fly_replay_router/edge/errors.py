"""The two ways a request can fail at the edge.

``EdgeError`` is an answer the edge gives itself (a status and a code such as ``PA01``, as Fly's
proxy logs them: https://fly.io/docs/reference/error-codes/). ``RoutingFailure`` is a replay target
that could not be reached: the reason ``fly-replay-failed`` reports when the instruction names a
``fallback`` (https://fly.io/docs/networking/dynamic-request-routing/), else it becomes an
``EdgeError``.
"""

from __future__ import annotations

from fly_replay_router import fly


class EdgeError(Exception):
    """A request the edge answers itself: ``status`` and a body naming ``code`` (``PA01`` ...)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class RoutingFailure(Exception):
    """No connection to a replay target could be opened (``fly-replay-failed``'s ``reason``)."""

    def __init__(self, reason: fly.FailureReason, target: str, detail: str, *, elapsed_ms: int | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.target = target
        self.detail = detail
        self.elapsed_ms = elapsed_ms
