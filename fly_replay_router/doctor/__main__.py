"""``python -m fly_replay_router.doctor URL``: the same as the ``fly-replay-doctor`` console script."""

from __future__ import annotations

from fly_replay_router.doctor.cli import main

if __name__ == "__main__":
    main()
