"""Reading fly.toml: the rules the real proxy takes from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from fly_replay_router.edge.config import DEFAULT_IDLE_TIMEOUT, EdgeConfig, FlyToml, SessionCacheRule

RULE = "[[http_service.http_options.replay_cache]]"
GOOD = """
app = "my-mcp"
primary_region = "ams"

[http_service]
  internal_port = 8080
  [http_service.http_options]
    idle_timeout = 120

  [[http_service.http_options.replay_cache]]
    path_prefix = "/"
    ttl_seconds = 300
    type = "header"
    name = "Mcp-Session-Id"

  [[http_service.http_options.replay_cache]]
    path_prefix = "/ui/"
    ttl_seconds = 60
    type = "cookie"
    name = "sid"
    allow_bypass = true
"""


def test_reads_replay_cache_rules_and_idle_timeout(tmp_path: Path) -> None:
    path = tmp_path / "fly.toml"
    path.write_text(GOOD)
    fly_toml = FlyToml.load(path)
    assert fly_toml.app == "my-mcp"
    assert fly_toml.primary_region == "ams"
    assert fly_toml.idle_timeout == 120
    assert fly_toml.replay_cache == (
        SessionCacheRule(path_prefix="/", ttl_seconds=300, type="header", name="Mcp-Session-Id"),
        SessionCacheRule(path_prefix="/ui/", ttl_seconds=60, type="cookie", name="sid", allow_bypass=True),
    )


def test_missing_file_means_fly_defaults(tmp_path: Path) -> None:
    fly_toml = FlyToml.load(tmp_path / "fly.toml")
    assert fly_toml.idle_timeout == DEFAULT_IDLE_TIMEOUT
    assert fly_toml.replay_cache == ()
    with pytest.raises(ValueError, match="no such file"):
        FlyToml.load(tmp_path / "fly.toml", required=True)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("app = ", "not valid TOML"),
        ("[http_service.http_options]\nidle_timeout = -1", "idle_timeout"),
        (
            f"{RULE}\npath_prefix = '/'\nttl_seconds = 5\ntype = 'header'\nname = 'x'",
            "at least 10",
        ),
        (f"{RULE}\npath_prefix = '/'", "lacks ttl_seconds, type, name"),
        (
            f"{RULE}\npath_prefix = '/'\nttl_seconds = 60\ntype = 'query'\nname = 'x'",
            "type",
        ),
    ],
)
def test_bad_file_is_a_value_error_naming_file_and_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "fly.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as raised:
        FlyToml.load(path)
    assert str(path) in str(raised.value)


def test_edge_config_validates() -> None:
    with pytest.raises(ValueError, match="balancing policy"):
        EdgeConfig(balance="sticky")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="idle_timeout"):
        FlyToml(idle_timeout=0)


def test_env_table_is_read(tmp_path: Path) -> None:
    path = tmp_path / "fly.toml"
    path.write_text('[env]\n  AFFINITY_FAILOVER = "safe"\n  WORKERS = 2\n')
    assert FlyToml.load(path).env == (("AFFINITY_FAILOVER", "safe"), ("WORKERS", "2"))


def test_reads_the_projects_autostop_and_concurrency_settings() -> None:
    fly_toml = FlyToml.load(Path(__file__).resolve().parents[2] / "fly.toml", required=True)
    assert (fly_toml.auto_stop, fly_toml.auto_start, fly_toml.min_machines_running) == ("suspend", True, 1)
    assert (fly_toml.soft_limit, fly_toml.hard_limit) == (2500, 3000)


def test_autostop_and_concurrency_default_to_flys(tmp_path: Path) -> None:
    path = tmp_path / "fly.toml"
    path.write_text("[http_service]\n  internal_port = 8080\n  auto_stop_machines = true\n")
    fly_toml = FlyToml.load(path)
    assert fly_toml.auto_stop == "stop"  # older files say true
    assert (fly_toml.min_machines_running, fly_toml.soft_limit, fly_toml.hard_limit) == (0, 20, None)
    assert FlyToml.load(tmp_path / "missing.toml").auto_stop == "off"


@pytest.mark.parametrize(
    ("service", "message"),
    [
        ('auto_stop_machines = "sleep"', "auto_stop_machines"),
        ("min_machines_running = -1", "min_machines_running"),
        ("[http_service.concurrency]\nsoft_limit = 50\nhard_limit = 10", "hard_limit"),
        ('[http_service.concurrency]\nsoft_limit = "many"', "soft_limit"),
    ],
)
def test_bad_autostop_or_concurrency_settings_are_explained(tmp_path: Path, service: str, message: str) -> None:
    path = tmp_path / "fly.toml"
    path.write_text(f"[http_service]\n{service}\n")
    with pytest.raises(ValueError, match=message) as error:
        FlyToml.load(path)
    assert str(path) in str(error.value)
