"""The edge's configuration, partly read from the project's ``fly.toml``.

The real Fly Proxy takes two things from ``fly.toml`` that the simulated edge reproduces: the
session-based replay cache rules (``[[http_service.http_options.replay_cache]]``) and the idle
timeout of HTTP connections (``[http_service.http_options] idle_timeout``). ``primary_region``
names the fleet's one local region when present. Reference: Fly's fly.toml configuration page,
as summarised in ``shared/reference/fly-proxy.md``.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# Fly's documented default for HTTP connections with no traffic (fly-proxy.md, "idle_timeout").
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_REGION = "lcl"
DEFAULT_APP_NAME = "local-mcp"
# Fly refuses replay cache TTLs under ten seconds.
MIN_CACHE_TTL_SECONDS = 10

CacheKeyKind = Literal["header", "cookie"]


@dataclass(frozen=True, slots=True)
class SessionCacheRule:
    """One ``[[http_service.http_options.replay_cache]]`` entry: cache replays per header/cookie value."""

    path_prefix: str
    ttl_seconds: int
    type: CacheKeyKind
    name: str
    allow_bypass: bool = False

    def __post_init__(self) -> None:
        if not self.path_prefix.startswith("/"):
            raise ValueError(f"replay_cache path_prefix {self.path_prefix!r} must start with '/'")
        if self.ttl_seconds < MIN_CACHE_TTL_SECONDS:
            raise ValueError(f"replay_cache ttl_seconds must be at least {MIN_CACHE_TTL_SECONDS} (Fly's minimum)")
        if self.type not in ("header", "cookie"):
            raise ValueError(f'replay_cache type {self.type!r} must be "header" or "cookie"')
        if not self.name:
            raise ValueError("replay_cache name must name a header or a cookie")


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    """Everything the simulated proxy needs to know besides its machines.

    ``max_body`` is the largest request body buffered for replay (1 MiB, PA01 above it);
    ``max_replays`` the longest replay chain (10, PA02 on the 11th);
    ``default_replay_timeout`` how long a replay target is tried when the instruction gives no
    ``timeout`` (unspecified by Fly; a few seconds is the safe reading).
    """

    def serves_region(self, region: str) -> bool:
        """Whether a replay's ``region`` entry names this fleet (``any`` names every fleet)."""
        return region == "any" or region == self.region or region in self.region_aliases

    app_name: str = DEFAULT_APP_NAME
    region: str = DEFAULT_REGION
    # Other names of the fleet's one region in a replay's region list (besides the region itself
    # and "any"), so that an app configured for a real region still routes on a laptop.
    region_aliases: tuple[str, ...] = ("local", DEFAULT_REGION)
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    replay_cache: tuple[SessionCacheRule, ...] = ()
    max_body: int = 1024 * 1024
    max_replays: int = 10
    default_replay_timeout: float = 5.0
    balance: Literal["random", "round-robin", "least-requests"] = "random"
    edge_port: int = 8080

    def __post_init__(self) -> None:
        if not self.idle_timeout > 0:
            raise ValueError("idle_timeout must be a positive number of seconds")
        if not self.region:
            raise ValueError("the fleet needs a region name, e.g. lcl")
        if self.balance not in ("random", "round-robin", "least-requests"):
            raise ValueError(f"balancing policy {self.balance!r} is not random, round-robin or least-requests")


@dataclass(frozen=True, slots=True)
class FlyToml:
    """The parts of ``fly.toml`` the edge uses. Missing keys mean Fly's defaults."""

    app: str | None = None
    primary_region: str | None = None
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    replay_cache: tuple[SessionCacheRule, ...] = ()
    # [env]: Fly sets these in every machine, so the local fleet does too.
    env: tuple[tuple[str, str], ...] = ()

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
        return cls(
            app=app if isinstance(app, str) and app else None,
            primary_region=region if isinstance(region, str) and region else None,
            idle_timeout=float(idle),
            replay_cache=rules,
            env=tuple((str(key), str(value)) for key, value in env.items()),
        )


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
