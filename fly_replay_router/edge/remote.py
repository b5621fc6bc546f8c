"""The verbs for a running edge: ``machine stop|start|suspend|resume|kill ID`` and ``status``.

A small HTTP client of the edge's control surface (``control.py``), standard library only.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

from fly_replay_router.edge.machine import MACHINE_VERBS

__all__ = ["DEFAULT_EDGE", "MACHINE_VERBS", "machine_verb", "print_status"]

DEFAULT_EDGE = "http://127.0.0.1:8080"


def machine_verb(edge_url: str, machine_id: str, verb: str) -> int:
    """``POST /_edge/machines/<id>/<verb>``; prints the machine's new status entry. Returns the exit status."""
    return _call(f"{edge_url.rstrip('/')}/_edge/machines/{machine_id}/{verb}", method="POST")


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
