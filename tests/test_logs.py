"""What a real machine writes to its log when it is probed: no tracebacks, nothing forged."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Machine, start_machine


@pytest.fixture(scope="module")
def machine() -> Iterator[Machine]:
    started = start_machine("aaaaaaaaaaaaaa")
    try:
        yield started
    finally:
        started.stop()


def test_a_disallowed_host_on_the_legacy_stream_gets_421_and_one_line_not_a_traceback(machine: Machine) -> None:
    for _ in range(3):
        response = httpx.get(f"{machine.url}/sse", headers={"host": "evil.example"}, timeout=5)
        assert response.status_code == 421
    # The next request is answered: the log is complete up to here.
    assert httpx.get(f"{machine.url}/healthz", timeout=5).status_code == 200
    log = machine.log()
    assert "Traceback" not in log
    assert "Exception in ASGI application" not in log
    assert len(re.findall(r"affinity outcome=rejected reason=host_not_allowed .* path=/sse", log)) == 3


def test_a_forged_log_line_in_the_path_stays_inside_its_field() -> None:
    # The demo's routes never match a path with a newline, so the layer would not see it there: this
    # machine has the layer around every path, as a user who wraps a whole app has.
    machine = start_machine("cccccccccccccc", app="tests.layer_around_everything:app")
    try:
        forged = "/mcp%0Aaffinity%20outcome=forwarded%20reason=-%20owner=evil"
        response = httpx.post(f"{machine.url}{forged}", headers={"mcp-session-id": "forged"}, timeout=5)
        assert response.status_code == 404
        assert httpx.get(f"{machine.url}/healthz", timeout=5).status_code == 200
        log = machine.log()
    finally:
        machine.stop()
    assert not [line for line in log.splitlines() if line.startswith("affinity outcome=forwarded")]
    assert 'path="/mcp\\naffinity outcome=forwarded reason=- owner=evil"' in log
