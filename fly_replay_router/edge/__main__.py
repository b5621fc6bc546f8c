"""``python -m fly_replay_router.edge`` (``fly-replay-edge``): a local fleet of machines behind a simulated Fly edge.

Starts N ``uvicorn`` machines (``app.main:app`` by default, or ``--app`` of your own; only the
``--backend`` machines when those are given alone), puts the edge in front of them on ``--port``,
prints what it started, and runs until Ctrl-C or SIGTERM. ``machine stop|start|suspend|resume|kill
ID``, ``worker kill ID PID`` and ``status`` talk to a running edge. ``arguments.py`` reads the
command line, ``launch.py`` runs the fleet, ``remote.py`` is the client of a running edge.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fly_replay_router.edge.arguments import build_parser, plan_launch
from fly_replay_router.edge.launch import run_fleet
from fly_replay_router.edge.remote import machine_verb, print_status, worker_verb


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.verb == "machine":
        return machine_verb(args.edge, args.machine_id, args.action)
    if args.verb == "worker":
        return worker_verb(args.edge, args.machine_id, args.pid, args.action)
    if args.verb == "status":
        return print_status(args.edge)
    try:
        plan = plan_launch(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_fleet(plan)


if __name__ == "__main__":
    sys.exit(main())
