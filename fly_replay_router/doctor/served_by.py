"""The layer's ``affinity-served-by`` answer header, read back: who served a request, and how it arrived.

The layer writes ``affinity-served-by: machine=<FLY_MACHINE_ID>;worker=<8 hex>;via=<how>`` on every
answer it serves for a session (``direct``, ``replay``: it carried ``fly-replay-src``, ``forward``: a
peer's layer sent it over the private network, ``handover``: a sibling worker passed it). Nothing in
it is more than a client can read in its own token; it lets a check from outside see routing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from fly_replay_router.fly import parse_fields

Via = Literal["direct", "replay", "forward", "handover"]


@dataclass(frozen=True, slots=True)
class ServedBy:
    """Who served one answer: ``machine`` (a Fly machine id), ``worker`` (the worker's tag) and ``via``."""

    machine: str
    worker: str
    via: Via

    @classmethod
    def parse(cls, value: str | None) -> ServedBy | None:
        """The header's fields (Fly's ``key=value;`` grammar), or None when absent or without a known ``via``."""
        if not value:
            return None
        fields = parse_fields(value)
        machine, via = fields.get("machine", ""), fields.get("via", "")
        if not machine or via not in get_args(Via):
            return None
        return cls(machine=machine, worker=fields.get("worker", ""), via=via)  # type: ignore[arg-type]  # checked

    @property
    def owner(self) -> tuple[str, str]:
        """The process that holds the session: this machine and this worker."""
        return (self.machine, self.worker)
