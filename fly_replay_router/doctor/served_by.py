"""The layer's ``affinity-served-by`` answer header, read back: who served a request, and how it arrived.

The layer writes ``affinity-served-by: machine=<FLY_MACHINE_ID>;worker=<8 hex>;via=<hops>`` on every
answer it serves for a session. ``via`` is ``direct``, or the hops that brought the request, in order,
joined by ``+``: ``replay`` (it carried ``fly-replay-src``), ``forward`` (a peer's layer sent it over
the private network), ``handover`` (a sibling worker passed it), as in ``replay+handover``. Nothing in
it is more than a client can read in its own token; it lets a check from outside see routing.
"""

from __future__ import annotations

from dataclasses import dataclass

from fly_replay_router.affinity.rewrite import AFFINITY_SERVED_BY
from fly_replay_router.fly import parse_fields

SERVED_BY_HEADER = AFFINITY_SERVED_BY.decode("ascii")
HOPS = frozenset({"replay", "forward", "handover"})


@dataclass(frozen=True, slots=True)
class ServedBy:
    """Who served one answer: ``machine`` (a Fly machine id), ``worker`` (the worker's tag), the ``hops``."""

    machine: str
    worker: str
    hops: tuple[str, ...] = ()

    @classmethod
    def parse(cls, value: str | None) -> ServedBy | None:
        """The header's fields (Fly's ``key=value;`` grammar), or None when absent or with an unknown hop."""
        if not value:
            return None
        fields = parse_fields(value)
        machine, via = fields.get("machine", ""), fields.get("via", "")
        hops = () if via == "direct" else tuple(via.split("+"))
        if not machine or not via or not set(hops) <= HOPS:
            return None
        return cls(machine=machine, worker=fields.get("worker", ""), hops=hops)

    @property
    def owner(self) -> tuple[str, str]:
        """The process that holds the session: this machine and this worker."""
        return (self.machine, self.worker)

    @property
    def via(self) -> str:
        """How the request reached this machine: ``replay``, ``forward`` or ``direct`` (a hand-over stays on it)."""
        for hop in ("replay", "forward"):
            if hop in self.hops:
                return hop
        return "direct"
