"""Every managed machine gets ports of its own, even when the kernel offers one port twice."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from fly_replay_router.edge import process
from fly_replay_router.edge.fleet import Fleet


def test_no_two_ports_of_a_fleet_are_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel may hand out a port it gave a moment ago (free_port closes its socket): here it does
    # so on purpose, which a real kernel does only now and then. Before, two machines (or a machine's
    # service and metrics ports) could share a port and one failed its start.
    offered: Iterator[int] = iter([9101, 9101, 9102, 9101, 9102, 9103, 9103, 9104, 9101, 9105, 9106])
    monkeypatch.setattr(process, "free_port", lambda: next(offered))
    fleet = Fleet()
    assert fleet.spec.command.serves_metrics  # the launcher, with prometheus-client: two ports each
    machines = fleet.plan(2) + fleet.plan(1)
    ports = [urlsplit(url).port for machine in machines for url in (machine.url, machine.metrics_url) if url]
    assert len(ports) == 6
    assert sorted(ports) == [9101, 9102, 9103, 9104, 9105, 9106]
