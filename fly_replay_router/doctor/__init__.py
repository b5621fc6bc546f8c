"""``fly-replay-doctor``: check a real deployment from outside, through its public MCP endpoint only.

``diagnose(DoctorOptions(url))`` runs every check and returns one ``CheckResult`` per check; the
console script (``fly_replay_router.doctor.cli``) prints them. See ``docs/deploy.md``, "Check the
deployment".
"""

from __future__ import annotations

from fly_replay_router.doctor.results import CheckResult as CheckResult
from fly_replay_router.doctor.results import Outcome as Outcome
from fly_replay_router.doctor.run import DoctorOptions as DoctorOptions
from fly_replay_router.doctor.run import diagnose as diagnose

__all__ = ["CheckResult", "DoctorOptions", "Outcome", "diagnose"]
