"""Which machine owns which open MCP session, as far as the edge can see from the outside.

The affinity layer names a session's owner in its token: the part before the first ``.`` is the
owner machine's id (``fly_replay_router.protocol.owner_of``). The edge watches for tokens without reading
bodies, except the first bytes of a legacy ``/sse`` stream:

- a response carrying an ``Mcp-Session-Id`` the request did not carry opens a session;
- a ``DELETE`` that carried a token and got a 2xx, or any request whose token got 404 (the owner no
  longer knows it), ends one;
- the legacy ``/sse`` endpoint event (``data: /messages/?session_id=<token>``) opens a session that
  ends with that stream;
- a machine that stops (stop, kill, crash) takes all its sessions with it; suspend keeps them.

Bounded: at most ``per_machine`` tokens per machine (further ones are counted, not kept).
"""

from __future__ import annotations

from collections.abc import Mapping

from fly_replay_router.protocol import ENDPOINT_SESSION_PARAM, owner_of

# Generous: the endpoint event is the stream's first event and is short.
SSE_PEEK_BYTES = 4096
# Longer than any token the layer issues; a longer value is not one to keep.
_MAX_TOKEN = 1024


def endpoint_session(chunk: bytes) -> str | None:
    """The session token in a legacy ``/sse`` stream's first bytes, if they hold the endpoint event."""
    if b"endpoint" not in chunk:
        return None
    match = ENDPOINT_SESSION_PARAM.search(chunk)
    if match is None or len(match.group(2)) > _MAX_TOKEN:
        return None
    return match.group(2).decode("latin-1")


class SessionBook:
    """Open sessions per owner machine, for the edge page's "sessions" column."""

    def __init__(self, per_machine: int = 10_000) -> None:
        self.per_machine = per_machine
        self._tokens: dict[str, set[str]] = {}
        self._overflow: dict[str, int] = {}

    def opened(self, token: str, machines: Mapping[str, object]) -> None:
        """A new session ``token``; ignored unless its owner is one of ``machines``."""
        owner = owner_of(token)
        if owner not in machines:
            return
        tokens = self._tokens.setdefault(owner, set())
        if len(tokens) < self.per_machine:
            tokens.add(token)
        elif token not in tokens:
            self._overflow[owner] = self._overflow.get(owner, 0) + 1

    def note_exchange(
        self, method: str, sent: str | None, status: int, answered: str | None, machines: Mapping[str, object]
    ) -> None:
        """One request and its answer: ``sent`` / ``answered`` are the ``Mcp-Session-Id`` of each, if any.

        A new id in the answer opens a session; a 404 for the sent id, or a DELETE of it answered
        2xx, ends one (MCP "Session Management": the server answers 404 for a session it ended).
        """
        if answered is not None and answered != sent:
            self.opened(answered, machines)
        if sent is not None and (status == 404 or (method == "DELETE" and status < 300)):
            self.closed(sent)

    def closed(self, token: str) -> None:
        """The session ``token`` ended (DELETE, 404, or its legacy stream closed)."""
        owner = owner_of(token)
        tokens = self._tokens.get(owner)
        if tokens is not None and token in tokens:
            tokens.discard(token)
        elif self._overflow.get(owner):
            self._overflow[owner] -= 1

    def machine_gone(self, machine_id: str) -> None:
        """The machine's memory is gone (stopped, killed, crashed): so are its sessions."""
        self._tokens.pop(machine_id, None)
        self._overflow.pop(machine_id, None)

    def count(self, machine_id: str) -> int:
        """Open sessions owned by ``machine_id``."""
        return len(self._tokens.get(machine_id, ())) + self._overflow.get(machine_id, 0)
