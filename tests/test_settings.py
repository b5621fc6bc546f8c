"""AffinitySettings: validation, the environment, and the replay instruction per failover mode."""

from __future__ import annotations

import logging

import pytest

from fly_replay_router.settings import AffinitySettings

KEY = "settings-test-key-0123456789"


def test_from_env_on_fly() -> None:
    settings = AffinitySettings.from_env(
        {
            "FLY_MACHINE_ID": "148e272a6d4689",
            "FLY_APP_NAME": "my-mcp",
            "FLY_REGION": "ams",
            "AFFINITY_SECRET": f" new-key-0123456789abcdef , {KEY} ",
            "AFFINITY_MAX_TOKEN_AGE": "12h",
            "AFFINITY_REPLAY_TIMEOUT": "800ms",
        }
    )
    assert settings.machine_id == "148e272a6d4689"
    assert settings.app_name == "my-mcp"
    assert settings.region == "ams"
    assert settings.secret_keys == ("new-key-0123456789abcdef", KEY)
    assert settings.max_token_age == 12 * 3600
    assert settings.replay_timeout == pytest.approx(0.8)


def test_on_fly_without_a_secret_refuses_to_start_and_says_how_to_fix_it() -> None:
    with pytest.raises(ValueError, match="AFFINITY_SECRET") as error:
        AffinitySettings.from_env({"FLY_MACHINE_ID": "148e272a6d4689", "FLY_APP_NAME": "my-mcp"})
    assert "fly secrets set AFFINITY_SECRET=" in str(error.value)


def test_outside_fly_it_invents_an_id_and_a_secret_with_warnings(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fly_replay_router.settings"):
        first = AffinitySettings.from_env({})
        second = AffinitySettings.from_env({})
    assert len(first.machine_id) == 14
    assert first.machine_id != second.machine_id
    assert first.secret_keys != second.secret_keys
    assert "AFFINITY_SECRET is not set" in caplog.text
    assert "FLY_MACHINE_ID is not set" in caplog.text


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"AFFINITY_SECRET": "short"}, "at least 16 characters"),
        ({"AFFINITY_SECRET": KEY, "FLY_MACHINE_ID": "Not-An-Id"}, "not a machine id"),
        ({"AFFINITY_SECRET": KEY, "AFFINITY_FAILOVER": "sometimes"}, "failover"),
        ({"AFFINITY_SECRET": KEY, "AFFINITY_MAX_TOKEN_AGE": "soon"}, "AFFINITY_MAX_TOKEN_AGE"),
        ({"AFFINITY_SECRET": KEY, "AFFINITY_MAX_TOKEN_AGE": "-5"}, "max_token_age"),
        ({"AFFINITY_SECRET": KEY, "AFFINITY_REPLAY_TIMEOUT": "2m"}, "replay_timeout"),
    ],
)
def test_bad_values_are_refused_with_an_actionable_sentence(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AffinitySettings.from_env(env)


def test_a_secret_of_separators_only_counts_as_unset() -> None:
    with pytest.raises(ValueError, match="AFFINITY_SECRET is not set"):
        AffinitySettings.from_env({"AFFINITY_SECRET": " , ,", "FLY_MACHINE_ID": "148e272a6d4689"})


def test_secret_keys_must_be_a_tuple_not_a_string() -> None:
    with pytest.raises(ValueError, match="tuple"):
        AffinitySettings(machine_id="abc", secret_keys=KEY)  # type: ignore[arg-type]


def test_settings_are_frozen() -> None:
    settings = AffinitySettings(machine_id="abc", secret_keys=(KEY,))
    with pytest.raises(AttributeError):
        settings.machine_id = "def"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("failover", "header"),
    [
        ("safe", "instance=148e272a6d4689;timeout=5s;fallback=force_self"),
        ("cached", "instance=148e272a6d4689"),
        ("prefer", "prefer_instance=148e272a6d4689"),
    ],
)
def test_replay_instruction_per_failover_mode(failover: str, header: str) -> None:
    settings = AffinitySettings(machine_id="abc", secret_keys=(KEY,), failover=failover)  # type: ignore[arg-type]
    assert settings.replay_instruction("148e272a6d4689").to_header() == header


@pytest.mark.parametrize(
    "url",
    ["http://user:pass@127.0.0.1:8080", "http://127.0.0.1:8080/prefix", "http://127.0.0.1:8080?x=1", "ftp://host"],
)
def test_a_peer_url_is_a_scheme_host_and_port_only(url: str) -> None:
    # Forward targets are built from a peer URL's parts: userinfo or a path would be dropped silently.
    with pytest.raises(ValueError, match="host and port only"):
        AffinitySettings(machine_id="aaaaaaaaaaaaaa", secret_keys=(KEY,), peer_urls=(("bbbbbbbbbbbbbb", url),))
    with pytest.raises(ValueError, match="host and port only"):
        AffinitySettings(machine_id="aaaaaaaaaaaaaa", secret_keys=(KEY,), peer_url_template=url + "/{machine_id}")


def test_forwarding_limits_from_the_environment_and_their_bounds() -> None:
    settings = AffinitySettings.from_env(
        {
            "AFFINITY_SECRET": KEY,
            "AFFINITY_FORWARD_READ_TIMEOUT": "2m",
            "AFFINITY_FORWARD_WRITE_TIMEOUT": "5",
            "AFFINITY_FORWARD_CONNECTIONS_PER_OWNER": "7",
        }
    )
    assert (settings.forward_connect_timeout, settings.forward_read_timeout, settings.forward_write_timeout) == (
        5.0,
        120.0,
        5.0,
    )
    assert settings.forward_connections_per_owner == 7
    with pytest.raises(ValueError, match="forward_read_timeout"):
        AffinitySettings(machine_id="aaaaaaaaaaaaaa", secret_keys=(KEY,), forward_read_timeout=0)
    with pytest.raises(ValueError, match="forward_connections_per_owner"):
        AffinitySettings(machine_id="aaaaaaaaaaaaaa", secret_keys=(KEY,), forward_connections_per_owner=0)
    with pytest.raises(ValueError, match="whole number"):
        AffinitySettings.from_env({"AFFINITY_SECRET": KEY, "AFFINITY_FORWARD_CONNECTIONS_PER_OWNER": "many"})
