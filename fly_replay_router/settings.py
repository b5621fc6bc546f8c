"""AffinitySettings: everything the affinity layer needs to know, read once at start-up."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args
from urllib.parse import urlsplit

from fly_replay_router.fly import DEFAULT_REGION, MACHINE_ID_PATTERN, ReplayInstruction, parse_duration

logger = logging.getLogger("fly_replay_router.settings")

Failover = Literal["safe", "cached", "prefer"]
MIN_SECRET_LENGTH = 16


def default_peer_url_template(port: int = 8080) -> str:
    """Fly's private network (6PN): every machine of an app, by id, on the port its service listens on.

    Reference: "Private Networking" (https://fly.io/docs/networking/private-networking/), the
    ``<machine_id>.vm.<app>.internal`` names. ``fly_replay_router.serve`` passes its ``--port``.
    """
    return f"http://{{machine_id}}.vm.{{app_name}}.internal:{port}"


# The Dockerfile's port, when nothing says which port the service listens on.
DEFAULT_PEER_URL_TEMPLATE = default_peer_url_template()
# Sizing (measured with ``python -m tests.bench --only session_cost_kb_handshake_stream``): a
# handshake-era session holding its GET event stream costs about 100 KB of RSS on the demo, an
# abandoned one about 40 KB, a legacy SSE stream about 13 KB; the process itself about 80 MB.
SESSION_COST_KB = 100
PROCESS_BASELINE_MB = 100
# The share of the VM's memory that sessions may fill: the rest is Python's own headroom (freed
# memory is reused, not returned, so the peak is what the VM must hold).
SESSION_MEMORY_SHARE = 0.75
DEFAULT_SESSION_IDLE_TIMEOUT = 1800.0
_SECRET_HINT = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


@dataclass(frozen=True, slots=True)
class AffinitySettings:
    """The affinity layer's configuration. Validated on construction.

    - ``machine_id``: this machine's id, the value Fly's ``instance=`` takes (``FLY_MACHINE_ID``).
    - ``secret_keys``: the key ring; the first key seals new tokens, every key opens them.
    - ``app_name``: tokens are bound to it: another app's token never verifies (``FLY_APP_NAME``).
    - ``region``: this machine's region, for logs (``FLY_REGION``).
    - ``max_token_age``: seconds after which a token is refused (404); ``None`` for no limit.
    - ``failover``: how a request for another machine's session is replayed:
      ``"safe"`` (``instance=…;timeout=…;fallback=force_self``: a dead owner brings the request back
      and it gets 404), ``"cached"`` (plain ``instance=…``, for fly.toml's replay cache rule) or
      ``"prefer"`` (``prefer_instance=…``: another machine takes it and answers 404).
    - ``replay_timeout``: seconds Fly keeps trying the owner in ``"safe"`` mode.
    - ``peer_url_template``: how to reach another machine directly, for bodies Fly cannot replay;
      ``{machine_id}`` and ``{app_name}`` are filled in (Fly's private network by default).
    - ``peer_urls``: explicit ``(machine_id, base URL)`` pairs that win over the template (the local
      fleet sets them). A peer URL is a scheme, a host and a port only: no user, path, query or fragment.
    - ``forward_connect_timeout``, ``forward_read_timeout``, ``forward_write_timeout``: seconds a
      forward to an owner may wait to connect (or for a free connection), for the next bytes of the
      owner's answer, and for the next bytes of the body (from the client, or into the owner).
    - ``forward_connections_per_owner``: connections open at once to one owner; forwards to other
      owners never wait for them.
    - ``allowed_hosts``: extra ``Host`` values the MCP server accepts (``example.com``, or
      ``example.com:*`` for any port), besides loopback and ``<app_name>.fly.dev``; see ``hosts``.
    - ``max_sessions``: handshake-era sessions this process holds at most; a request for a new session
      beyond it is sent to another machine (``None``: no cap). ``from_env`` sizes it to the VM's memory.
    - ``max_legacy_sessions``: open legacy ``GET /sse`` streams (sessions) this process holds at most.
    - ``session_idle_timeout``: seconds after which an idle session is gone (give the SDK the same).
    - ``new_session_rate`` / ``new_session_burst``: new sessions one client (``Fly-Client-IP``) may open
      per second after a burst; beyond it 429 with ``Retry-After`` (``None``: no limit).
    - ``worker_socket_dir``: the directory where the worker processes of this machine open their hand-over
      sockets (``""``: ``<temp dir>/fly-replay-router-<uid>/<machine_id>``); see ``fly_replay_router.affinity.workers``.
    - ``worker_busy_timeout``: seconds a hand-over waits for a sibling worker that is alive but does not accept
      (its socket's backlog is full: a burst, a long call holding its event loop); then 503 with ``Retry-After``
      and the session lives. A worker that is gone (no socket, nobody listening) gets 404 at once.
    - ``workers``: worker processes that share this machine (``AFFINITY_WORKERS``, else ``WEB_CONCURRENCY``):
      each sizes its session cap to its share, and, when no ASGI lifespan reaches the layer, opens its
      hand-over socket at its first session only if there are several.
    """

    machine_id: str
    secret_keys: tuple[str, ...]
    app_name: str = "local-mcp"
    region: str = DEFAULT_REGION
    max_token_age: float | None = None
    failover: Failover = "safe"
    replay_timeout: float = 5.0
    peer_url_template: str = DEFAULT_PEER_URL_TEMPLATE
    peer_urls: tuple[tuple[str, str], ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    max_sessions: int | None = None
    max_legacy_sessions: int | None = None
    session_idle_timeout: float = DEFAULT_SESSION_IDLE_TIMEOUT
    new_session_rate: float | None = 10.0
    new_session_burst: int = 100
    forward_connect_timeout: float = 5.0
    forward_read_timeout: float = 60.0
    forward_write_timeout: float = 30.0
    forward_connections_per_owner: int = 20
    worker_socket_dir: str = ""
    worker_busy_timeout: float = 5.0
    workers: int = 1

    def __post_init__(self) -> None:
        if not MACHINE_ID_PATTERN.fullmatch(self.machine_id):
            raise ValueError(
                f"machine_id {self.machine_id!r} is not a machine id: use 1 to 32 lowercase letters and "
                "digits, as Fly's FLY_MACHINE_ID (14 hex characters)"
            )
        if isinstance(self.secret_keys, str) or not self.secret_keys:
            raise ValueError("secret_keys must be a non-empty tuple of keys; the first one seals new tokens")
        if any(len(key) < MIN_SECRET_LENGTH for key in self.secret_keys):
            raise ValueError(
                f"every secret key must be at least {MIN_SECRET_LENGTH} characters; make one with: {_SECRET_HINT}"
            )
        if not self.app_name or any(char.isspace() for char in self.app_name):
            raise ValueError(f"app_name {self.app_name!r} must be a non-empty name without spaces")
        if self.max_token_age is not None and not self.max_token_age > 0:
            raise ValueError("max_token_age must be a positive number of seconds, or None for no limit")
        if self.failover not in get_args(Failover):
            raise ValueError(f"failover {self.failover!r} must be one of {', '.join(get_args(Failover))}")
        if not 0 < self.replay_timeout <= 60:
            raise ValueError("replay_timeout must be more than 0 and at most 60 seconds")
        if "{machine_id}" not in self.peer_url_template or not _is_peer_url(self._peer_template_sample()):
            raise ValueError(
                "peer_url_template must be an http(s) URL of a host and port only, containing {machine_id} "
                "(and optionally {app_name}), such as " + DEFAULT_PEER_URL_TEMPLATE
            )
        for machine_id, url in self.peer_urls:
            if not MACHINE_ID_PATTERN.fullmatch(machine_id) or not _is_peer_url(url):
                raise ValueError(
                    f"peer {machine_id}={url} must be a machine id and an http(s) URL of a host and port only"
                )
        for name in ("forward_connect_timeout", "forward_read_timeout", "forward_write_timeout"):
            if not 0 < getattr(self, name) <= 3600:
                raise ValueError(f"{name} must be more than 0 and at most 3600 seconds")
        if not 1 <= self.forward_connections_per_owner <= 10_000:
            raise ValueError("forward_connections_per_owner must be between 1 and 10000")
        if isinstance(self.allowed_hosts, str) or any(not host or "/" in host for host in self.allowed_hosts):
            raise ValueError("allowed_hosts must be a tuple of host names such as example.com or example.com:*")
        for name in ("max_sessions", "max_legacy_sessions"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number of sessions of at least 1, or None for no cap")
        if not 0 < self.session_idle_timeout <= 7 * 24 * 3600:
            raise ValueError("session_idle_timeout must be more than 0 seconds and at most a week")
        if self.new_session_rate is not None and not 0 < self.new_session_rate <= 1_000_000:
            raise ValueError("new_session_rate must be a positive number of sessions per second, or None for no limit")
        if self.new_session_burst < 1:
            raise ValueError("new_session_burst must be at least 1")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if self.worker_socket_dir and not self.worker_socket_dir.startswith("/"):
            raise ValueError("worker_socket_dir must be an absolute path, or empty for the default")
        if not 0 < self.worker_busy_timeout <= 3600:
            raise ValueError("worker_busy_timeout must be more than 0 and at most 3600 seconds")

    def replay_instruction(self, owner_machine_id: str) -> ReplayInstruction:
        """The ``fly-replay`` instruction that sends a request to its session's owner."""
        if self.failover == "cached":
            return ReplayInstruction(instance=owner_machine_id)
        if self.failover == "prefer":
            return ReplayInstruction(prefer_instance=owner_machine_id)
        return ReplayInstruction(instance=owner_machine_id, timeout=self.replay_timeout, fallback="force_self")

    def peer_url(self, machine_id: str) -> str:
        """The base URL (scheme, host, port) at which ``machine_id`` is reached directly."""
        for peer_id, url in self.peer_urls:
            if peer_id == machine_id:
                return url.rstrip("/")
        return self.peer_url_template.format(machine_id=machine_id, app_name=self.app_name).rstrip("/")

    def _peer_template_sample(self) -> str:
        try:
            return self.peer_url_template.format(machine_id="m0", app_name=self.app_name)
        except (KeyError, IndexError, ValueError):
            return ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AffinitySettings:
        """Read Fly's machine environment and the ``AFFINITY_*`` options.

        On Fly (``FLY_MACHINE_ID`` set) ``AFFINITY_SECRET`` is required. Outside Fly a missing
        machine id or secret is invented for this process, with a warning: tokens then verify only
        on this process.
        """
        env = os.environ if environ is None else environ
        machine_id = env.get("FLY_MACHINE_ID", "").strip()
        secret_keys = _comma_list(env.get("AFFINITY_SECRET", ""))
        if not secret_keys:
            if machine_id:
                raise ValueError(
                    "AFFINITY_SECRET is not set. Every machine of the app must share one token secret; set it "
                    f'once for the app with: fly secrets set AFFINITY_SECRET="$({_SECRET_HINT})"'
                )
            logger.warning("AFFINITY_SECRET is not set: using an ephemeral secret, valid for this process only")
            secret_keys = (secrets.token_urlsafe(32),)
        if not machine_id:
            machine_id = secrets.token_hex(7)
            logger.warning("FLY_MACHINE_ID is not set (not on Fly): this process is machine %s", machine_id)
        # How many worker processes share this machine: the launcher (fly_replay_router.serve --workers N)
        # says so in AFFINITY_WORKERS; WEB_CONCURRENCY is the convention uvicorn and gunicorn read.
        declared = env.get("AFFINITY_WORKERS", "") or env.get("WEB_CONCURRENCY", "")
        workers = int(_number("AFFINITY_WORKERS", declared) or 1)
        sized = sessions_for_memory(_number("FLY_VM_MEMORY_MB", env.get("FLY_VM_MEMORY_MB", "")), workers)
        rate = env.get("AFFINITY_NEW_SESSION_RATE", "").strip()
        burst = _number("AFFINITY_NEW_SESSION_BURST", env.get("AFFINITY_NEW_SESSION_BURST", ""))
        idle = env.get("AFFINITY_SESSION_IDLE_TIMEOUT", "").strip()
        max_age = env.get("AFFINITY_MAX_TOKEN_AGE", "").strip()
        timeout = env.get("AFFINITY_REPLAY_TIMEOUT", "").strip()
        timeouts = {
            field: _seconds(f"AFFINITY_{field.upper()}", value)
            for field in (
                "forward_connect_timeout",
                "forward_read_timeout",
                "forward_write_timeout",
                "worker_busy_timeout",
            )
            if (value := env.get(f"AFFINITY_{field.upper()}", "").strip())
        }
        connections = env.get("AFFINITY_FORWARD_CONNECTIONS_PER_OWNER", "").strip()
        return cls(
            machine_id=machine_id,
            secret_keys=secret_keys,
            app_name=env.get("FLY_APP_NAME", "").strip() or "local-mcp",
            region=env.get("FLY_REGION", "").strip() or DEFAULT_REGION,
            max_token_age=_seconds("AFFINITY_MAX_TOKEN_AGE", max_age) if max_age else None,
            failover=env.get("AFFINITY_FAILOVER", "safe").strip() or "safe",  # type: ignore[arg-type]  # validated
            replay_timeout=_seconds("AFFINITY_REPLAY_TIMEOUT", timeout) if timeout else 5.0,
            peer_url_template=env.get("AFFINITY_PEER_URL", "").strip() or DEFAULT_PEER_URL_TEMPLATE,
            peer_urls=tuple(_peer(item) for item in _comma_list(env.get("AFFINITY_PEERS", ""))),
            allowed_hosts=_comma_list(env.get("AFFINITY_ALLOWED_HOSTS", "")),
            max_sessions=_cap("AFFINITY_MAX_SESSIONS", env.get("AFFINITY_MAX_SESSIONS", ""), sized),
            max_legacy_sessions=_cap(
                "AFFINITY_MAX_LEGACY_SESSIONS", env.get("AFFINITY_MAX_LEGACY_SESSIONS", ""), sized
            ),
            session_idle_timeout=_seconds("AFFINITY_SESSION_IDLE_TIMEOUT", idle)
            if idle
            else DEFAULT_SESSION_IDLE_TIMEOUT,
            new_session_rate=None if rate.lower() == "off" else (_number("AFFINITY_NEW_SESSION_RATE", rate) or 10.0),
            new_session_burst=int(burst) if burst else 100,
            forward_connections_per_owner=_count("AFFINITY_FORWARD_CONNECTIONS_PER_OWNER", connections or "20"),
            **timeouts,
            worker_socket_dir=env.get("AFFINITY_WORKER_SOCKET_DIR", "").strip(),
            workers=workers,
        )


def sessions_for_memory(memory_mb: float | None, workers: int = 1) -> int | None:
    """The default session cap of one process, on a VM of ``memory_mb`` run by ``workers`` processes.

    ``(memory x SESSION_MEMORY_SHARE - workers x PROCESS_BASELINE_MB) / SESSION_COST_KB / workers``:
    with one worker, 512 MB holds 2,908 sessions that each keep an event stream open, 1 GB 6,840,
    2 GB 14,704. None if the memory is unknown (not on Fly, which sets ``FLY_VM_MEMORY_MB``).
    """
    if not memory_mb:
        return None
    budget_mb = memory_mb * SESSION_MEMORY_SHARE - workers * PROCESS_BASELINE_MB
    return max(100, int(budget_mb * 1024 / SESSION_COST_KB / workers))


def _number(name: str, text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise ValueError(f"{name}={text!r} must be a positive number")
    return value


def _cap(name: str, text: str, default: int | None) -> int | None:
    text = text.strip().lower()
    if not text:
        return default
    if text == "off":
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{name}={text!r} must be a whole number of sessions, or off for no cap")
    return int(text)


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _peer(item: str) -> tuple[str, str]:
    machine_id, separator, url = item.partition("=")
    if not separator:
        raise ValueError(f"AFFINITY_PEERS entry {item!r} is not machine_id=URL")
    return machine_id.strip(), url.strip()


def _is_peer_url(url: str) -> bool:
    """An http(s) URL naming a host (and port), nothing else: forwards build their target from its parts."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises ValueError for a port that is not a number in range
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and "@" not in parts.netloc
        and parts.path in ("", "/")
        and not parts.query
        and not parts.fragment
        and "?" not in url
        and "#" not in url
    )


def _count(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a whole number") from None


def _seconds(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return parse_duration(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a duration: give seconds (30) or a unit (800ms, 10s, 12h)") from None
