"""Which request bodies Fly's proxy can replay (the rest are forwarded by the layer itself)."""

from __future__ import annotations

import pytest

from app.affinity.forward import REPLAY_BODY_LIMIT, body_is_replayable


@pytest.mark.parametrize(
    ("headers", "replayable"),
    [
        ([], True),
        ([(b"content-length", b"0")], True),
        ([(b"content-length", str(REPLAY_BODY_LIMIT).encode())], True),
        ([(b"content-length", str(REPLAY_BODY_LIMIT + 1).encode())], False),
        ([(b"transfer-encoding", b"chunked")], False),
        ([(b"content-length", b"10"), (b"transfer-encoding", b"chunked")], False),
        ([(b"content-length", b"-1")], False),
        ([(b"content-length", b"garbage")], False),
    ],
)
def test_body_is_replayable(headers: list[tuple[bytes, bytes]], replayable: bool) -> None:
    assert body_is_replayable(headers) is replayable
