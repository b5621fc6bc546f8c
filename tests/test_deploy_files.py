"""fly.toml, the Dockerfile and the app agree: ports, metrics, health path, signals, session header, pins."""

from __future__ import annotations

import re
import tomllib
from typing import Any

import pytest
from sse_starlette.sse import EventSourceResponse

from fly_replay_router.affinity.middleware import MCP_SESSION_ID
from fly_replay_router.private_metrics import DEFAULT_METRICS_PATH
from tests.conftest import IMAGE_COMMAND as IMAGE
from tests.conftest import ROOT

FLY = tomllib.loads((ROOT / "fly.toml").read_text())
SERVICE: dict[str, Any] = FLY["http_service"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def docker_instruction(name: str) -> str:
    lines = [line.split(None, 1)[1] for line in DOCKERFILE.splitlines() if line.startswith(f"{name} ")]
    assert lines, f"the Dockerfile has no {name}"
    return lines[-1].strip()


def cmd_option(name: str) -> str:
    argv = list(IMAGE.argv)
    return argv[argv.index(name) + 1]


def test_the_image_serves_the_demo_app_on_the_services_internal_port() -> None:
    assert IMAGE.argv[:3] == ("python", "-m", "fly_replay_router.serve")
    assert IMAGE.app == "app.main:app"
    assert IMAGE.port == SERVICE["internal_port"]
    assert docker_instruction("EXPOSE") == str(SERVICE["internal_port"])
    assert "--workers" not in IMAGE.argv  # more than one process per machine would split its sessions


def test_the_image_trusts_the_proxy_headers_of_flys_proxy() -> None:
    # The launcher trusts X-Forwarded-* from any peer unless told otherwise: on Fly only Fly's
    # proxy and the app's private network reach the port. The CMD must not switch that off.
    assert "--no-proxy-headers" not in IMAGE.argv
    assert "--forwarded-allow-ips" not in IMAGE.argv or cmd_option("--forwarded-allow-ips") == "*"


def test_health_check_path_is_a_route_of_the_app() -> None:
    from app.main import app

    checks = SERVICE["checks"]
    assert len(checks) == 1
    paths = {getattr(route, "path", None) for route in app.routes}
    assert checks[0]["path"] in paths
    assert checks[0]["method"] == "GET"


def test_metrics_are_scraped_from_the_images_private_metrics_port() -> None:
    assert FLY["metrics"]["port"] == IMAGE.metrics_port
    assert FLY["metrics"]["path"] == DEFAULT_METRICS_PATH
    # No service may expose it: a service's port is public at https://<app>.fly.dev.
    public = {SERVICE["internal_port"], *(service["internal_port"] for service in FLY.get("services", []))}
    assert IMAGE.metrics_port not in public


def test_the_demo_app_has_no_metrics_route_of_its_own() -> None:
    from app.main import app

    assert DEFAULT_METRICS_PATH not in {getattr(route, "path", None) for route in app.routes}


def test_graceful_stop_fits_inside_flys_kill_timeout() -> None:
    assert docker_instruction("STOPSIGNAL") == FLY["kill_signal"] == "SIGTERM"
    assert int(cmd_option("--timeout-graceful-shutdown")) < FLY["kill_timeout"]


def test_the_image_runs_as_a_non_root_user() -> None:
    user = docker_instruction("USER")
    assert user not in ("root", "0")
    assert re.search(rf"useradd .*\b{user}\b", DOCKERFILE)


def test_concurrency_counts_requests_with_a_hard_limit_above_the_soft_one() -> None:
    concurrency = SERVICE["concurrency"]
    assert concurrency["type"] == "requests"
    assert 0 < concurrency["soft_limit"] < concurrency["hard_limit"]


def test_idle_timeout_outlasts_the_sse_keep_alive_pings() -> None:
    assert SERVICE["http_options"]["idle_timeout"] >= 2 * EventSourceResponse.DEFAULT_PING_INTERVAL


def test_default_failover_uses_fallback_so_no_replay_cache_rule_is_on() -> None:
    assert FLY["env"]["AFFINITY_FAILOVER"] == "safe"
    assert "replay_cache" not in SERVICE["http_options"]


def test_the_documented_replay_cache_rule_keys_on_the_layers_session_header() -> None:
    block = re.search(
        r"^  # \[\[http_service\.http_options\.replay_cache\]\]\n((?:  #   .*\n)+)",
        (ROOT / "fly.toml").read_text(),
        re.M,
    )
    assert block, "fly.toml lost its commented replay_cache rule"
    rule = tomllib.loads("\n".join(line.split("#", 1)[1] for line in block.group(1).splitlines()))
    assert rule["type"] == "header"
    assert rule["name"].lower().encode() == MCP_SESSION_ID
    assert rule["ttl_seconds"] >= 10
    assert rule["allow_bypass"] is False


def test_suspend_keeps_sessions_and_autostart_wakes_owners() -> None:
    assert SERVICE["auto_stop_machines"] == "suspend"
    assert SERVICE["auto_start_machines"] is True
    assert SERVICE["force_https"] is True


@pytest.mark.parametrize("requirement", tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
def test_every_runtime_dependency_is_pinned_in_the_lock(requirement: str) -> None:
    name = re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
    pins = {
        line.split("==")[0].lower().replace("_", "-")
        for line in (ROOT / "requirements.lock").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    assert name in pins


def test_the_image_installs_the_pinned_set_before_the_code_and_the_code_without_deps() -> None:
    pinned = DOCKERFILE.index("pip install --requirement requirements.lock")
    code = DOCKERFILE.index("COPY fly_replay_router ./fly_replay_router")
    assert pinned < code < DOCKERFILE.index("COPY app ./app") < DOCKERFILE.index("pip install --no-deps .")
