"""The edge's configuration, partly read from the project's ``fly.toml``.

The real Fly Proxy takes these things from ``fly.toml`` that the simulated edge reproduces: the
session-based replay cache rules (``[[http_service.http_options.replay_cache]]``), the idle
timeout of HTTP connections (``[http_service.http_options] idle_timeout``), autostop/autostart
(``auto_stop_machines``, ``auto_start_machines``, ``min_machines_running``) and the concurrency
limits (``[http_service.concurrency] soft_limit`` / ``hard_limit``), the path of the HTTP health
check (``[[http_service.checks]]``), and each machine's size (``[[vm]]``, read by ``vm.py``).
``primary_region`` names the fleet's one local region when present. References: Fly's "fly.toml
configuration" (https://fly.io/docs/reference/configuration/), "Fly Proxy autostop/autostart"
(https://fly.io/docs/reference/fly-proxy-autostop-autostart/) and "Load balancing"
(https://fly.io/docs/reference/load-balancing/).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fly_replay_router import fly
from fly_replay_router.edge.guard import LOOPBACK_NAMES
from fly_replay_router.edge.vm import VmSize

# Fly's documented default for HTTP connections with no traffic ([http_service.http_options] idle_timeout).
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_REGION = fly.DEFAULT_REGION
DEFAULT_APP_NAME = "local-mcp"
# Fly refuses replay cache TTLs under ten seconds.
MIN_CACHE_TTL_SECONDS = 10

# Fly's default kill_timeout: seconds between kill_signal and SIGKILL when a machine stops.
DEFAULT_KILL_TIMEOUT = 5.0
# Fly's documented defaults when [http_service.concurrency] is absent: soft 20, no hard limit.
DEFAULT_SOFT_LIMIT = 20
# Fly checks for excess capacity "every few minutes"; locally a shorter cadence shows the effect
# without waiting (``--autostop-interval``; the tests use half a second).
DEFAULT_AUTOSTOP_INTERVAL = 30.0
# Unspecified by Fly: how long a request waits when every machine is at its hard limit before the
# edge gives up with 503 (Fly's proxy retries load balancing for a few seconds, then errors).
DEFAULT_QUEUE_TIMEOUT = 5.0

# The front door (door.py): a request's head may take 64 KiB and 100 fields (431 past either), and
# must arrive within 30 s (408). Fly documents no figures; door.py says why these.
DEFAULT_MAX_HEAD_BYTES = 64 * 1024
DEFAULT_MAX_HEADER_COUNT = 100
DEFAULT_HEAD_TIMEOUT = 30.0

CacheKeyKind = Literal["header", "cookie"]
AutoStop = Literal["off", "stop", "suspend"]


@dataclass(frozen=True, slots=True)
class SessionCacheRule:
    """One ``[[http_service.http_options.replay_cache]]`` entry: cache replays per header/cookie value."""

    path_prefix: str
    ttl_seconds: int
    type: CacheKeyKind
    name: str
    allow_bypass: bool = False

    def __post_init__(self) -> None:
        if split_pattern(self.path_prefix) is None:
            raise ValueError(
                f"replay_cache path_prefix {self.path_prefix!r} must be a path ('/api') or a host and a path "
                "('api.example.com/api')"
            )
        if self.ttl_seconds < MIN_CACHE_TTL_SECONDS:
            raise ValueError(f"replay_cache ttl_seconds must be at least {MIN_CACHE_TTL_SECONDS} (Fly's minimum)")
        if self.type not in ("header", "cookie"):
            raise ValueError(f'replay_cache type {self.type!r} must be "header" or "cookie"')
        if not self.name:
            raise ValueError("replay_cache name must name a header or a cookie")

    @property
    def host(self) -> str:
        """The host the rule is narrowed to (lower case), or ``""`` for any."""
        return split_pattern(self.path_prefix)[0]  # type: ignore[index]

    @property
    def path(self) -> str:
        """The path part of ``path_prefix``."""
        return split_pattern(self.path_prefix)[1]  # type: ignore[index]


def split_pattern(pattern: str) -> tuple[str, str] | None:
    """``(host, path prefix)`` of a replay-cache pattern: ``/prefix`` (host ``""``: any) or
    ``host/prefix``, the host in lower case; None when it is neither (no ``/``, or an empty or spaced
    host)."""
    if pattern.startswith("/"):
        return "", pattern
    host, slash, path = pattern.partition("/")
    if not slash or not host or any(char.isspace() for char in host):
        return None
    return host.lower(), "/" + path


@dataclass(frozen=True, slots=True)
class FlyToml:
    """The parts of ``fly.toml`` the edge uses. Missing keys mean Fly's defaults."""

    app: str | None = None
    primary_region: str | None = None
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    replay_cache: tuple[SessionCacheRule, ...] = ()
    # [env]: Fly sets these in every machine, so the local fleet does too.
    env: tuple[tuple[str, str], ...] = ()
    auto_stop: AutoStop = "off"
    auto_start: bool = True
    min_machines_running: int = 0
    soft_limit: int = DEFAULT_SOFT_LIMIT
    hard_limit: int | None = None
    kill_timeout: float = DEFAULT_KILL_TIMEOUT
    # The path of the first [[http_service.checks]] entry: Fly keeps a Machine in rotation while
    # a GET of it answers 2xx. None: the app declares no HTTP check.
    health_path: str | None = None
    # [[vm]]: each machine's CPUs (the workers it runs) and memory (its FLY_VM_MEMORY_MB).
    vm: VmSize = field(default_factory=VmSize)

    def __post_init__(self) -> None:
        if not self.idle_timeout > 0:
            raise ValueError("idle_timeout must be a positive number of seconds")
        _check_lifecycle(self.auto_stop, self.min_machines_running, self.soft_limit, self.hard_limit)
        if self.health_path is not None and not self.health_path.startswith("/"):
            raise ValueError(f"http_service.checks path {self.health_path!r} must start with '/'")

    @classmethod
    def load(cls, path: Path, *, required: bool = False) -> FlyToml:
        """Read ``path``; a missing file gives the defaults unless ``required``.

        Raises ``ValueError`` with a sentence naming the file and the problem.
        """
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if required:
                raise ValueError(f"{path}: no such file (give --fly-toml a path to an existing fly.toml)") from None
            return cls()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read it ({exc.strerror})") from exc
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML ({exc}); fix the file or pass another with --fly-toml") from exc
        try:
            return cls._from_document(document)
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{path}: {exc}") from exc

    @classmethod
    def _from_document(cls, document: dict[str, Any]) -> FlyToml:
        service = _table(document, "http_service")
        options = _table(service, "http_options")
        idle = options.get("idle_timeout", DEFAULT_IDLE_TIMEOUT)
        if isinstance(idle, bool) or not isinstance(idle, int | float) or idle <= 0:
            raise ValueError("http_service.http_options.idle_timeout must be a positive number of seconds")
        raw_rules = options.get("replay_cache", [])
        if not isinstance(raw_rules, list):
            raise ValueError("http_service.http_options.replay_cache must be an array of tables ([[...]])")
        rules = tuple(_cache_rule(raw) for raw in raw_rules)
        app = document.get("app")
        region = document.get("primary_region")
        env = _table(document, "env")
        concurrency = _table(service, "concurrency")
        soft = _whole(concurrency.get("soft_limit", DEFAULT_SOFT_LIMIT), "http_service.concurrency.soft_limit")
        hard = concurrency.get("hard_limit")
        return cls(
            auto_stop=_auto_stop(service.get("auto_stop_machines", "off")),
            auto_start=bool(service.get("auto_start_machines", True)),
            min_machines_running=_whole(service.get("min_machines_running", 0), "http_service.min_machines_running"),
            soft_limit=soft,
            hard_limit=None if hard is None else _whole(hard, "http_service.concurrency.hard_limit"),
            app=app if isinstance(app, str) and app else None,
            primary_region=region if isinstance(region, str) and region else None,
            idle_timeout=float(idle),
            replay_cache=rules,
            env=tuple((str(key), str(value)) for key, value in env.items()),
            health_path=_health_path(service.get("checks", [])),
            kill_timeout=_seconds(document.get("kill_timeout", DEFAULT_KILL_TIMEOUT), "kill_timeout"),
            vm=VmSize.from_document(document),
        )


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    """Everything the simulated proxy needs to know besides its machines.

    ``fly_toml`` holds what the app's ``fly.toml`` sets (replay cache rules, idle timeout,
    autostop/autostart, concurrency); the rest is the edge's own. ``max_body`` is the largest
    request body buffered for replay (1 MiB, PA01 above it); ``max_replays`` the longest replay
    chain (10, PA02 on the 11th); ``default_replay_timeout`` how long a replay target is tried when
    the instruction gives no ``timeout`` (unspecified by Fly; a few seconds is the safe reading).
    """

    fly_toml: FlyToml = field(default_factory=FlyToml)
    app_name: str = DEFAULT_APP_NAME
    region: str = DEFAULT_REGION
    # Other names of the fleet's one region in a replay's region list (besides the region itself
    # and "any"), so that an app configured for a real region still routes on a laptop.
    region_aliases: tuple[str, ...] = ("local", DEFAULT_REGION)
    max_body: int = fly.REPLAY_BODY_LIMIT
    max_replays: int = 10
    default_replay_timeout: float = 5.0
    balance: Literal["random", "round-robin", "least-requests"] = "random"
    edge_port: int = 8080
    # The host names requests to /_edge/ may address the edge by (guard.py); loopback by default.
    control_names: tuple[str, ...] = LOOPBACK_NAMES
    autostop_interval: float = DEFAULT_AUTOSTOP_INTERVAL
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT
    max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES
    max_header_count: int = DEFAULT_MAX_HEADER_COUNT
    head_timeout: float = DEFAULT_HEAD_TIMEOUT

    def __post_init__(self) -> None:
        if self.max_head_bytes < 1024:
            raise ValueError("the header size limit must be at least 1024 bytes")
        if self.max_header_count < 1:
            raise ValueError("the header count limit must be at least 1")
        if not self.head_timeout > 0:
            raise ValueError("the header timeout must be a positive number of seconds")
        if not self.autostop_interval > 0:
            raise ValueError("the autostop interval must be a positive number of seconds")
        if self.queue_timeout < 0:
            raise ValueError("queue_timeout must be zero or more seconds")
        if not self.region:
            raise ValueError("the fleet needs a region name, e.g. lcl")
        if self.balance not in ("random", "round-robin", "least-requests"):
            raise ValueError(f"balancing policy {self.balance!r} is not random, round-robin or least-requests")

    def serves_region(self, region: str) -> bool:
        """Whether a replay's ``region`` entry names this fleet (``any`` names every fleet)."""
        return region == "any" or region == self.region or region in self.region_aliases


def _health_path(checks: object) -> str | None:
    # [[http_service.checks]] is an array of tables; a single [http_service.checks] table is read too.
    entries = [checks] if isinstance(checks, dict) else checks
    if not isinstance(entries, list):
        raise ValueError("http_service.checks must be an array of tables ([[...]])")
    for entry in entries:
        if not isinstance(entry, dict):
            raise ValueError("each http_service.checks entry must be a table")
        path = entry.get("path")
        if path is not None:
            if not isinstance(path, str):
                raise ValueError("http_service.checks path must be a string such as /healthz")
            return path
    return None


def _check_lifecycle(auto_stop: str, min_running: int, soft: int, hard: int | None) -> None:
    if auto_stop not in ("off", "stop", "suspend"):
        raise ValueError(f'auto_stop_machines {auto_stop!r} must be "off", "stop" or "suspend"')
    if min_running < 0:
        raise ValueError("min_machines_running must be 0 or more")
    if soft < 1:
        raise ValueError("concurrency soft_limit must be at least 1")
    if hard is not None and hard < soft:
        raise ValueError(f"concurrency hard_limit ({hard}) must be at least the soft_limit ({soft})")


def _auto_stop(value: object) -> AutoStop:
    # Older fly.toml files say true/false: true meant "stop".
    if value is True:
        return "stop"
    if value is False:
        return "off"
    if value == "stop":
        return "stop"
    if value == "suspend":
        return "suspend"
    if value == "off":
        return "off"
    raise ValueError(f'http_service.auto_stop_machines {value!r} must be "off", "stop" or "suspend"')


def _seconds(value: object, name: str) -> float:
    # Fly takes a number of seconds, or a duration such as "30s" or "1m".
    if isinstance(value, str):
        units = {"ms": 0.001, "s": 1.0, "m": 60.0}
        unit = next((u for u in units if value.endswith(u) and value[: -len(u)].replace(".", "", 1).isdigit()), None)
        if unit is not None:
            return float(value[: -len(unit)]) * units[unit]
    elif not isinstance(value, bool) and isinstance(value, int | float) and value >= 0:
        return float(value)
    raise ValueError(f'{name} must be a number of seconds or a duration such as "30s"')


def _whole(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number")
    return value


def _table(parent: dict[str, Any], key: str) -> dict[str, Any]:
    value = parent.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"[{key}] must be a table")
    return value


def _cache_rule(raw: object) -> SessionCacheRule:
    if not isinstance(raw, dict):
        raise ValueError("each replay_cache entry must be a table")
    missing = [key for key in ("path_prefix", "ttl_seconds", "type", "name") if key not in raw]
    if missing:
        raise ValueError(f"replay_cache entry lacks {', '.join(missing)}")
    ttl = raw["ttl_seconds"]
    if isinstance(ttl, bool) or not isinstance(ttl, int):
        raise ValueError("replay_cache ttl_seconds must be a whole number of seconds")
    return SessionCacheRule(
        path_prefix=str(raw["path_prefix"]),
        ttl_seconds=ttl,
        type=raw["type"],
        name=str(raw["name"]),
        allow_bypass=bool(raw.get("allow_bypass", False)),
    )
