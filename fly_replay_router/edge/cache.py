"""Replay caches: remember where the app replayed a request, and send the next one straight there.

Two kinds, as on Fly ("Dynamic request routing with fly-replay", replay caching:
https://fly.io/docs/networking/dynamic-request-routing/):

- session rules from ``fly.toml`` (``[[http_service.http_options.replay_cache]]``): the key is the
  value of a request header or cookie; the longest matching ``path_prefix`` chooses the rule;
- path rules set by a response (``fly-replay-cache: /prefix/*`` + ``fly-replay-cache-ttl-secs``, or
  the JSON form's ``cache``): every request under the prefix goes to the target.

A cache is an optimisation, never a guarantee: an entry whose target cannot be reached, or whose
target replays the request again, is dropped, and the proxy asks the app again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie

from fly_replay_router.edge.config import MIN_CACHE_TTL_SECONDS, SessionCacheRule

# The client's opt-out, honoured only by rules with allow_bypass = true.
BYPASS_VALUE = "skip"


@dataclass(frozen=True, slots=True)
class CacheKey:
    """Where an entry lives: a session rule and its key value, or a path prefix."""

    kind: str  # "session" or "path"
    scope: str  # the rule's path_prefix, or the cached path prefix
    value: str = ""


@dataclass(frozen=True, slots=True)
class CacheLookup:
    """What the cache says about one request.

    ``session_key`` is set when a session rule applies (so a replay can be remembered under it);
    ``hit`` is the cached entry that decides the first hop, if any; ``bypass`` when the client
    skipped the cache and the rule allows it.
    """

    session_key: CacheKey | None = None
    hit: CacheKey | None = None
    target: str | None = None
    bypass: bool = False

    @property
    def involved(self) -> bool:
        """A cache rule applies, so the target gets ``fly-replay-cache-status``."""
        return self.session_key is not None or self.hit is not None


class ReplayCache:
    """Both replay caches of one edge, with TTLs measured on ``clock`` (monotonic seconds)."""

    def __init__(
        self, rules: tuple[SessionCacheRule, ...] = (), *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        # Longest prefix first, so the first match is the one Fly would pick.
        self._rules = tuple(sorted(rules, key=lambda rule: len(rule.path_prefix), reverse=True))
        self._clock = clock
        self._entries: dict[CacheKey, tuple[str, float]] = {}

    def lookup(self, path: str, headers: Mapping[str, str], *, skip_requested: bool = False) -> CacheLookup:
        """Find the entry that decides where a request to ``path`` with ``headers`` goes.

        ``headers`` maps lowercase names to values (cookies joined as one ``cookie`` value).
        """
        session_key: CacheKey | None = None
        bypass = False
        rule = next((rule for rule in self._rules if path.startswith(rule.path_prefix)), None)
        if rule is not None:
            value = _key_value(rule, headers)
            if value:
                session_key = CacheKey("session", rule.path_prefix, value)
                bypass = skip_requested and rule.allow_bypass
        if bypass:
            return CacheLookup(session_key=session_key, bypass=True)
        for key in (session_key, self._longest_path_entry(path)):
            if key is None:
                continue
            target = self._live_target(key)
            if target is not None:
                return CacheLookup(session_key=session_key, hit=key, target=target)
        return CacheLookup(session_key=session_key)

    def remember_session(self, key: CacheKey, machine_id: str) -> None:
        """Store the replay target of a request that matched a session rule."""
        rule = next(rule for rule in self._rules if rule.path_prefix == key.scope)
        self._entries[key] = (machine_id, self._clock() + rule.ttl_seconds)

    def remember_path(self, pattern: str, ttl_seconds: int, machine_id: str) -> None:
        """Store a path rule from ``fly-replay-cache: /prefix/*``; a trailing ``*`` is optional."""
        prefix = pattern.rstrip("*")
        if not prefix.startswith("/"):
            raise ValueError(f"fly-replay-cache {pattern!r} is not a path")
        ttl = max(ttl_seconds, MIN_CACHE_TTL_SECONDS)
        self._entries[CacheKey("path", prefix)] = (machine_id, self._clock() + ttl)

    def invalidate(self, key: CacheKey) -> None:
        """Forget one entry (``fly-replay-cache: invalidate``, or a target that failed)."""
        self._entries.pop(key, None)

    def __len__(self) -> int:
        now = self._clock()
        return sum(1 for _, expires in self._entries.values() if expires > now)

    def _longest_path_entry(self, path: str) -> CacheKey | None:
        best: CacheKey | None = None
        for key in self._entries:
            if key.kind == "path" and path.startswith(key.scope) and (best is None or len(key.scope) > len(best.scope)):
                best = key
        return best

    def _live_target(self, key: CacheKey) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        machine_id, expires = entry
        if expires <= self._clock():
            del self._entries[key]
            return None
        return machine_id


def _key_value(rule: SessionCacheRule, headers: Mapping[str, str]) -> str | None:
    if rule.type == "header":
        return headers.get(rule.name.lower()) or None
    raw = headers.get("cookie")
    if not raw:
        return None
    cookies: SimpleCookie = SimpleCookie()
    try:
        cookies.load(raw)
    except CookieError:
        return None
    morsel = cookies.get(rule.name)
    return morsel.value if morsel is not None and morsel.value else None
