"""The verbs for a running edge: ``machine stop|start|suspend|resume|kill ID``, ``worker kill ID PID`` and ``status``.

A small HTTP client of the edge's control surface (``control.py``), standard library only, and the
part of the command line that names these verbs.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

from fly_replay_router.edge.machine import MACHINE_VERBS, WORKER_VERBS

__all__ = ["DEFAULT_EDGE", "MACHINE_VERBS", "add_verbs", "machine_verb", "print_status", "worker_verb"]

DEFAULT_EDGE = "http://127.0.0.1:8080"


def add_verbs(parser: argparse.ArgumentParser) -> None:
    """The sub-commands that talk to a running edge, on the fleet's own command line."""
    verbs = parser.add_subparsers(dest="verb", metavar="{machine,worker,status}")
    machine = verbs.add_parser(
        "machine",
        help="stop, start, suspend, resume or kill a machine of a running edge",
        description=(
            "stop: SIGTERM, memory and sessions gone; suspend: SIGSTOP, memory kept; start: boot a stopped "
            "machine fresh (same id) or resume a suspended one; resume: same as start; kill: SIGKILL (a crash). "
            "Each acts on the machine's whole process group: its supervisor and every worker."
        ),
    )
    machine.add_argument("action", choices=MACHINE_VERBS)
    machine.add_argument("machine_id", metavar="ID")
    machine.add_argument("--edge", default=DEFAULT_EDGE, help=f"the running edge (default {DEFAULT_EDGE})")
    worker = verbs.add_parser(
        "worker",
        help="kill one worker process of a machine (a crash of that worker only)",
        description=(
            "kill: SIGKILL to one worker process of the machine (its pid is in the status' worker_pids). The "
            "sessions it held end (404); its siblings' go on, and the machine's supervisor starts a new worker."
        ),
    )
    worker.add_argument("action", choices=WORKER_VERBS)
    worker.add_argument("machine_id", metavar="ID")
    worker.add_argument("pid", type=int, metavar="PID")
    worker.add_argument("--edge", default=DEFAULT_EDGE, help=f"the running edge (default {DEFAULT_EDGE})")
    status = verbs.add_parser("status", help="print a running edge's /_edge/status")
    status.add_argument("--edge", default=DEFAULT_EDGE, help=f"the running edge (default {DEFAULT_EDGE})")


def machine_verb(edge_url: str, machine_id: str, verb: str) -> int:
    """``POST /_edge/machines/<id>/<verb>``; prints the machine's new status entry. Returns the exit status."""
    return _call(f"{edge_url.rstrip('/')}/_edge/machines/{machine_id}/{verb}", method="POST")


def worker_verb(edge_url: str, machine_id: str, pid: int, verb: str) -> int:
    """``POST /_edge/machines/<id>/workers/<pid>/<verb>``; prints the machine's entry. Returns the exit status."""
    return _call(f"{edge_url.rstrip('/')}/_edge/machines/{machine_id}/workers/{pid}/{verb}", method="POST")


def print_status(edge_url: str) -> int:
    """``GET /_edge/status``, printed as indented JSON. Returns the exit status."""
    return _call(f"{edge_url.rstrip('/')}/_edge/status", method="GET")


def _call(url: str, *, method: str) -> int:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            document = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        print(f"error: {exc.code} {exc.read().decode(errors='replace').strip()}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"error: cannot reach the edge at {url}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(document, indent=2))
    return 0
