"""Replay caches: remember where the app replayed a request, and send the next one straight there.

Two kinds, as on Fly ("Dynamic request routing with fly-replay", replay caching:
https://fly.io/docs/networking/dynamic-request-routing/):

- session rules from ``fly.toml`` (``[[http_service.http_options.replay_cache]]``): the key is the
  value of a request header or cookie; the longest matching ``path_prefix`` chooses the rule;
- path rules set by a response (``fly-replay-cache: /prefix/*`` + ``fly-replay-cache-ttl-secs``, or
  the JSON form's ``cache``): every request under the prefix goes to the target.

A pattern or a ``path_prefix`` may name the host too (``example.com/some/path/*``; "the domain may
also be set explicitly", and a ``path_prefix`` may be narrowed "by specifying a hostname"): then it
applies only to requests whose ``Host`` is that name (compared without its port, in any case). Fly
does not say which of a host's rule and a rule for any host wins when both match the same length
of path; here the host's does, and otherwise the longer path.

A cache is an optimisation, never a guarantee: an entry whose target cannot be reached, or whose
target replays the request again, is dropped, and the proxy asks the app again.

Cost per request does not grow with the number of entries: a session entry is one dict lookup;
path entries are found by trying the request path's prefixes of the lengths that are cached (a
handful), not by scanning; expired entries leave through a heap ordered by expiry, swept a few at
a time on each write, so an edge that sees many short-lived sessions does not keep them all.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie

from fly_replay_router.edge.config import MIN_CACHE_TTL_SECONDS, SessionCacheRule, split_pattern

# The client's opt-out, honoured only by rules with allow_bypass = true.
BYPASS_VALUE = "skip"


def request_host(headers: Mapping[str, str]) -> str:
    """The request's ``Host`` without its port, in lower case (``""`` without one)."""
    host = headers.get("host", "").strip().lower()
    if host.startswith("["):  # an IPv6 literal, [::1]:8080
        return host.partition("]")[0] + "]"
    return host.partition(":")[0]


@dataclass(frozen=True, slots=True)
class CacheKey:
    """Where an entry lives: a session rule and its key value, or a path prefix."""

    kind: str  # "session" or "path"
    scope: str  # the rule's path_prefix, or the cached path prefix
    value: str = ""  # the session's key value, or the host a path entry is for ("": any)


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
        # (host, path, rule), longest path first (a host's rule before one for any host), so the first
        # match wins.
        self._rules = tuple(
            sorted(
                ((rule.host, rule.path, rule) for rule in rules), key=lambda r: (len(r[1]), bool(r[0])), reverse=True
            )
        )
        self._ttls = {rule.path_prefix: rule.ttl_seconds for rule in rules}
        self._clock = clock
        self._entries: dict[CacheKey, tuple[str, float]] = {}
        # How many path entries have a prefix of each length: the lengths a lookup tries, longest first.
        self._path_lengths: dict[int, int] = {}
        # (expires, sequence, key) for every write; an item whose entry was rewritten or dropped is stale.
        self._expiry: list[tuple[float, int, CacheKey]] = []
        self._writes = 0

    def lookup(self, path: str, headers: Mapping[str, str], *, skip_requested: bool = False) -> CacheLookup:
        """Find the entry that decides where a request to ``path`` with ``headers`` goes.

        ``headers`` maps lowercase names to values (cookies joined as one ``cookie`` value).
        """
        session_key: CacheKey | None = None
        bypass = False
        host = request_host(headers)
        rule = next(
            (
                rule
                for rule_host, rule_path, rule in self._rules
                if path.startswith(rule_path) and rule_host in ("", host)
            ),
            None,
        )
        if rule is not None:
            value = _key_value(rule, headers)
            if value:
                session_key = CacheKey("session", rule.path_prefix, value)
                bypass = skip_requested and rule.allow_bypass
        if bypass:
            return CacheLookup(session_key=session_key, bypass=True)
        if not self._entries:
            return CacheLookup(session_key=session_key)
        if session_key is not None:
            target = self._live_target(session_key)
            if target is not None:
                return CacheLookup(session_key=session_key, hit=session_key, target=target)
        for length in sorted(self._path_lengths, reverse=True) if self._path_lengths else ():
            if length <= len(path):
                for key in (CacheKey("path", path[:length], host), CacheKey("path", path[:length])):
                    target = self._live_target(key)
                    if target is not None:
                        return CacheLookup(session_key=session_key, hit=key, target=target)
        return CacheLookup(session_key=session_key)

    def remember_session(self, key: CacheKey, machine_id: str) -> None:
        """Store the replay target of a request that matched a session rule."""
        self._store(key, machine_id, self._ttls[key.scope])

    def remember_path(self, pattern: str, ttl_seconds: int, machine_id: str) -> None:
        """Store a path rule from ``fly-replay-cache: [host]/prefix/*``; a trailing ``*`` is optional."""
        split = split_pattern(pattern.rstrip("*"))
        if split is None:
            raise ValueError(f"fly-replay-cache {pattern!r} is not a path")
        host, prefix = split
        self._store(CacheKey("path", prefix, host), machine_id, max(ttl_seconds, MIN_CACHE_TTL_SECONDS))

    def invalidate(self, key: CacheKey) -> None:
        """Forget one entry (``fly-replay-cache: invalidate``, or a target that failed)."""
        if self._entries.pop(key, None) is not None and key.kind == "path":
            self._forget_path_length(len(key.scope))

    def __len__(self) -> int:
        self._sweep(len(self._expiry))
        return len(self._entries)

    def _store(self, key: CacheKey, machine_id: str, ttl: float) -> None:
        now = self._clock()
        self._sweep(2, now)  # two out per write in: the heap never holds more than a bounded backlog
        if key not in self._entries and key.kind == "path":
            self._path_lengths[len(key.scope)] = self._path_lengths.get(len(key.scope), 0) + 1
        expires = now + ttl
        self._entries[key] = (machine_id, expires)
        self._writes += 1
        heapq.heappush(self._expiry, (expires, self._writes, key))
        if len(self._expiry) > 2 * len(self._entries) + 64:
            # Rewrites of the same keys left stale items behind: rebuild from the live entries.
            self._expiry = [(exp, index, k) for index, (k, (_, exp)) in enumerate(self._entries.items())]
            heapq.heapify(self._expiry)

    def _sweep(self, limit: int, now: float | None = None) -> None:
        """Drop up to ``limit`` expired entries, earliest first."""
        now = self._clock() if now is None else now
        heap = self._expiry
        while limit > 0 and heap and heap[0][0] <= now:
            expires, _, key = heapq.heappop(heap)
            entry = self._entries.get(key)
            if entry is not None and entry[1] == expires:
                self.invalidate(key)
                limit -= 1

    def _forget_path_length(self, length: int) -> None:
        left = self._path_lengths.get(length, 0) - 1
        if left > 0:
            self._path_lengths[length] = left
        else:
            self._path_lengths.pop(length, None)

    def _live_target(self, key: CacheKey) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        machine_id, expires = entry
        if expires <= self._clock():
            self.invalidate(key)
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
