"""Which request bodies Fly's proxy can replay (the rest are forwarded by the layer itself)."""

from __future__ import annotations

import pytest

from fly_replay_router.affinity.forward import body_replayable
from fly_replay_router.fly import REPLAY_BODY_LIMIT


@pytest.mark.parametrize(
    ("content_length", "chunked", "replayable"),
    [
        (None, False, True),
        (b"0", False, True),
        (str(REPLAY_BODY_LIMIT).encode(), False, True),
        (str(REPLAY_BODY_LIMIT + 1).encode(), False, False),
        (None, True, False),
        (b"10", True, False),
        (b"-1", False, False),
        (b"garbage", False, False),
    ],
)
def test_body_replayable(content_length: bytes | None, chunked: bool, replayable: bool) -> None:
    assert body_replayable(content_length, chunked) is replayable
