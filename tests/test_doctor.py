"""``fly-replay-doctor`` against real fleets behind the local edge: every check passes on a healthy one,
and each check fails, naming its cause, on a fleet broken its way.

The doctor runs as users run it (``python -m fly_replay_router.doctor URL``, a real process) against
real machines (the Dockerfile's command) behind the real edge (``python -m fly_replay_router.edge``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from pathlib import Path
from secrets import token_hex
from typing import Any

import pytest

from fly_replay_router.doctor.results import FIXES
from tests.conftest import ROOT, SECRET, Machine, free_port, start_machine
from tests.edge.edge_cli import FleetProcess, running_fleet

CHECKS = [
    "reachable",
    "host_allowed",
    "handshake",
    "sessions_stick",
    "replays",
    "headers_survive_replay",
    "large_bodies",
    "event_streams",
    "refusals",
    "metrics_private",
]
# Round-robin: a session's requests land on the other machines in turn, so replays and forwards happen.
EDGE_ARGS = ["--balance", "round-robin", "--autostop-interval", "3600"]


def doctor(url: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fly_replay_router.doctor", url, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def checks_of(completed: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    document = json.loads(completed.stdout)
    assert [check["check"] for check in document["checks"]] == CHECKS
    return {check["check"]: check for check in document["checks"]}


@pytest.fixture(scope="module")
def healthy_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetProcess]:
    """Three machines of the demo behind the edge, as fly.toml deploys them."""
    log = tmp_path_factory.mktemp("doctor") / "edge.log"
    with running_fleet(["--machines", "3", *EDGE_ARGS], log) as fleet:
        yield fleet


# Fresh machine ids, as Fly's: a machine's hand-over socket is named after its id, so ids that other
# test runs on this host use (aaaaaaaaaaaaaa, ...) would meet theirs.
SECRETS_IDS = (token_hex(7), token_hex(7))
PEERS_IDS = (token_hex(7), token_hex(7))
LEAKY_ID = token_hex(7)


@pytest.fixture(scope="module")
def broken_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, subprocess.CompletedProcess[str]]]:
    """The doctor's run against each broken fleet; the doctors run side by side.

    - ``secrets``: two machines with different AFFINITY_SECRET behind the edge;
    - ``peers``: two machines whose AFFINITY_PEERS name ports where nothing listens (a broken 6PN);
    - ``leaky``: one machine of ``tests.doctor_apps:leaky_app`` (streams compressed, public /metrics),
      reached directly: an edge in front would add nothing those checks see.
    """
    log_dir = tmp_path_factory.mktemp("broken")
    wrong_peers = ",".join(f"{machine_id}=http://[::1]:{free_port()}" for machine_id in PEERS_IDS)
    plans: dict[str, dict[str, Any]] = {
        SECRETS_IDS[0]: {"secret": SECRET},
        SECRETS_IDS[1]: {"secret": SECRET[::-1]},
        PEERS_IDS[0]: {"extra_env": {"AFFINITY_PEERS": wrong_peers}},
        PEERS_IDS[1]: {"extra_env": {"AFFINITY_PEERS": wrong_peers}},
        LEAKY_ID: {"app": "tests.doctor_apps:leaky_app"},
    }
    # Two machines start at a time: on two busy cores, more only makes each slower than its start timeout.
    with ExitStack() as stack, ThreadPoolExecutor(2) as pool:
        futures = {machine_id: pool.submit(start_machine, machine_id, **plan) for machine_id, plan in plans.items()}
        machines: dict[str, Machine] = {}
        for machine_id, future in futures.items():
            with suppress(Exception):  # the first failure is raised below, once every machine is stopped
                machines[machine_id] = future.result()
                stack.callback(machines[machine_id].stop)
        for future in futures.values():
            future.result()
        urls: dict[str, str] = {}
        # Random landings for the secrets fleet: four sessions in lock-step over two machines could, under
        # round-robin, each keep landing on their own owner and never meet the other secret.
        balance = {"secrets": ["--balance", "random"], "peers": []}
        for name, ids in (("secrets", SECRETS_IDS), ("peers", PEERS_IDS)):
            args = [*_backends(machines, ids), *EDGE_ARGS, *balance[name]]
            edge = stack.enter_context(running_fleet(args, log_dir / f"{name}.log"))
            urls[name] = f"{edge.url}/mcp"
        urls["leaky"] = f"{machines[LEAKY_ID].url}/mcp"
        with ThreadPoolExecutor(len(urls)) as doctors:
            runs = {name: doctors.submit(doctor, url, "--json", "--stream-wait", "2") for name, url in urls.items()}
        yield {name: run.result() for name, run in runs.items()}


def _backends(machines: dict[str, Machine], ids: tuple[str, ...]) -> list[str]:
    return [f"--backend={machine_id}={machines[machine_id].url}" for machine_id in ids]


def test_every_check_passes_on_a_healthy_fleet(healthy_fleet: FleetProcess) -> None:
    completed = doctor(
        f"{healthy_fleet.url}/mcp", "--json", "--header", "Authorization: Bearer doctor-test", "--stream-wait", "40"
    )
    checks = checks_of(completed)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert {name: check["outcome"] for name, check in checks.items()} == dict.fromkeys(CHECKS, "pass")
    stick = checks["sessions_stick"]["evidence"]
    assert stick["requests"] == stick["answered_by_owner"] == 4 * (1 + 6)  # notifications/initialized, 6 pings
    assert len(stick["owner_machines"]) >= 2  # round-robin spreads the sessions over the machines
    replays = checks["replays"]["evidence"]
    assert replays["arrived"]["replay"] >= 8  # two of three landings are on another machine
    assert replays["replay_cache"] == "not in use"  # fly.toml's replay cache rule is commented out
    assert checks["large_bodies"]["evidence"]["forwarded"] == 1
    streams = checks["event_streams"]["evidence"]
    assert streams["post_answer_encodings"] == ["none"]
    assert streams["content_encoding"] == "none"
    assert streams["headers_s"] < 5
    assert streams["first_bytes_s"] < 30
    refusals = checks["refusals"]["evidence"]
    assert [refusals[name] for name in ("forged", "foreign_machine", "malformed", "ended")] == ["404"] * 4
    assert refusals["modern_2026_07_28"] == "200"
    # The progress line names each step on stderr; stdout is the JSON alone.
    assert "sessions stick: 4 sessions x 6 requests" in completed.stderr
    # The doctor ended every session it opened: the edge's session book is empty again.
    assert [machine["sessions"] for machine in healthy_fleet.status()["machines"]] == [0, 0, 0]


def test_a_host_that_is_not_allowed_is_named_with_the_setting_that_allows_it(healthy_fleet: FleetProcess) -> None:
    completed = doctor(f"{healthy_fleet.url}/mcp", "--header", "Host: mcp.example.com")
    assert completed.returncode == 1
    line = next(line for line in completed.stdout.splitlines() if "host allowed" in line)
    assert line.split()[0] == "FAIL"
    assert "421" in line
    assert "AFFINITY_ALLOWED_HOSTS=mcp.example.com" in completed.stdout
    assert "deploy.md#allow-your-host-names" in completed.stdout
    assert re.search(r"^\s+UNKNOWN\s+sessions stick", completed.stdout, re.MULTILINE)


def test_machines_with_different_secrets_cannot_keep_sessions(
    broken_runs: dict[str, subprocess.CompletedProcess[str]],
) -> None:
    completed = broken_runs["secrets"]
    checks = checks_of(completed)
    assert completed.returncode == 1
    stick = checks["sessions_stick"]
    assert stick["outcome"] == "fail"
    assert stick["evidence"]["statuses"].get("404", 0) >= 4  # every other landing is on the other secret
    assert "AFFINITY_SECRET" in stick["cause"]
    assert stick["fix"] == "deploy.md#one-secret-for-every-machine"


def test_peers_that_cannot_reach_each_other_fail_large_bodies(
    broken_runs: dict[str, subprocess.CompletedProcess[str]],
) -> None:
    completed = broken_runs["peers"]
    checks = checks_of(completed)
    assert completed.returncode == 1
    assert checks["sessions_stick"]["outcome"] == "pass"  # replays go through Fly's proxy, not the peers
    large = checks["large_bodies"]
    assert large["outcome"] == "fail"
    assert "private network" in large["cause"]
    assert "IPv6" in large["cause"]
    assert large["evidence"]["small_request_after"] == "200"
    assert large["fix"] == "deploy.md#the-private-network"


def test_public_metrics_and_compressed_streams_are_named(
    broken_runs: dict[str, subprocess.CompletedProcess[str]],
) -> None:
    completed = broken_runs["leaky"]
    checks = checks_of(completed)
    assert completed.returncode == 1
    streams = checks["event_streams"]
    assert streams["outcome"] == "fail"
    assert "gzip" in streams["summary"]
    assert "Content-Encoding: none" in streams["cause"]
    assert streams["fix"] == "deploy.md#event-streams"
    metrics = checks["metrics_private"]
    assert metrics["outcome"] == "fail"
    assert "public port" in metrics["cause"]
    assert metrics["fix"] == "deploy.md#keep-metrics-private"
    # The other checks still see a working single machine.
    assert checks["sessions_stick"]["outcome"] == "pass"
    assert checks["refusals"]["outcome"] == "pass"


def test_the_replay_cache_is_seen_in_use_when_fly_toml_enables_it(tmp_path: Path) -> None:
    # fly.toml's session replay cache rule with AFFINITY_FAILOVER=cached, as the deploy docs describe it.
    # Random landings: under round-robin, four sessions in lock-step over two machines can each keep
    # landing on their own owner, and then nothing is replayed for the cache to learn.
    args = ["--machines", "2", "--fly-toml", "tests/edge/fly.cached.toml", "--dockerfile", "Dockerfile"]
    args += [*EDGE_ARGS, "--balance", "random"]
    with running_fleet(args, tmp_path / "edge.log", env={"AFFINITY_FAILOVER": "cached"}) as fleet:
        completed = doctor(f"{fleet.url}/mcp", "--json", "--stream-wait", "2")
    replays = checks_of(completed)["replays"]
    assert replays["evidence"]["replay_cache"] == "in use", replays
    assert replays["evidence"]["replayed_again"] == 0
    assert replays["evidence"]["requests_after_first_replay"] >= 3
    assert checks_of(completed)["sessions_stick"]["outcome"] == "pass"


def test_every_fix_names_a_section_of_the_deploy_page() -> None:
    page = (ROOT / "docs" / "deploy.md").read_text()
    anchors = {_slug(line.lstrip("#")) for line in page.splitlines() if line.startswith("#")}
    for check, fix in FIXES.items():
        name, _, anchor = fix.partition("#")
        assert name == "deploy.md", check
        assert anchor in anchors, f"{check}: no heading for #{anchor} in docs/deploy.md"


def _slug(heading: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc extension) gives a heading."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"[-\s]+", "-", text).strip("-")


def test_an_endpoint_that_does_not_answer_fails_reachable_and_decides_nothing_else() -> None:
    completed = doctor(f"http://127.0.0.1:{free_port()}/mcp", "--json")
    checks = checks_of(completed)
    assert completed.returncode == 1
    assert checks["reachable"]["outcome"] == "fail"
    assert "ConnectError" in checks["reachable"]["evidence"]["error"]
    assert checks["reachable"]["fix"] == "deploy.md#the-endpoint-does-not-answer"
    assert {check["outcome"] for name, check in checks.items() if name != "reachable"} == {"unknown"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ftp://example.com/mcp"], "is not an http(s) URL"),
        (["http://127.0.0.1/mcp", "--header", "no colon here"], "is not a header"),
        (["http://127.0.0.1/mcp", "--sessions", "0"], "--sessions must be 1 to 100"),
    ],
)
def test_usage_errors_exit_2_with_a_sentence(args: list[str], message: str) -> None:
    completed = doctor(*args)
    assert completed.returncode == 2
    assert message in completed.stderr
