"""Fly Proxy's header grammar, in both directions: the one floor the affinity layer and the edge share.

The affinity layer writes ``fly-replay`` and reads ``fly-replay-src`` / ``fly-replay-failed``; the
simulated edge reads ``fly-replay`` (header and JSON forms) and writes the others. Both import this
package and nothing else of each other, so the two sides cannot drift apart. ``from
fly_replay_router import fly`` then ``fly.X`` reaches every name; the parts are ``names`` (header
names and limits), ``fields`` (the ``key=value`` and duration grammar), ``replay`` (``fly-replay``)
and ``provenance`` (``fly-replay-src``, ``fly-replay-failed``). Importing it imports nothing of the
layer or the edge.

References: "Dynamic request routing with fly-replay"
(https://fly.io/docs/networking/dynamic-request-routing/), "Error codes and troubleshooting"
(https://fly.io/docs/reference/error-codes/), "Request headers" (https://fly.io/docs/networking/request-headers/).
"""

from __future__ import annotations

from fly_replay_router.fly.fields import (
    InvalidReplay as InvalidReplay,
)
from fly_replay_router.fly.fields import (
    ascii_decimal as ascii_decimal,
)
from fly_replay_router.fly.fields import (
    format_duration as format_duration,
)
from fly_replay_router.fly.fields import (
    parse_duration as parse_duration,
)
from fly_replay_router.fly.fields import (
    parse_fields as parse_fields,
)
from fly_replay_router.fly.names import (
    DEFAULT_REGION as DEFAULT_REGION,
)
from fly_replay_router.fly.names import (
    FLY_CLIENT_IP as FLY_CLIENT_IP,
)
from fly_replay_router.fly.names import (
    FLY_FORCE_INSTANCE_ID as FLY_FORCE_INSTANCE_ID,
)
from fly_replay_router.fly.names import (
    FLY_FORWARDED_PORT as FLY_FORWARDED_PORT,
)
from fly_replay_router.fly.names import (
    FLY_PREFER_INSTANCE_ID as FLY_PREFER_INSTANCE_ID,
)
from fly_replay_router.fly.names import (
    FLY_PREFERRED_INSTANCE_UNAVAILABLE as FLY_PREFERRED_INSTANCE_UNAVAILABLE,
)
from fly_replay_router.fly.names import (
    FLY_REGION as FLY_REGION,
)
from fly_replay_router.fly.names import (
    FLY_REPLAY as FLY_REPLAY,
)
from fly_replay_router.fly.names import (
    FLY_REPLAY_CACHE as FLY_REPLAY_CACHE,
)
from fly_replay_router.fly.names import (
    FLY_REPLAY_CACHE_CONTROL as FLY_REPLAY_CACHE_CONTROL,
)
from fly_replay_router.fly.names import (
    FLY_REPLAY_CACHE_STATUS as FLY_REPLAY_CACHE_STATUS,
)
from fly_replay_router.fly.names import (
    FLY_REPLAY_CACHE_TTL_SECS as FLY_REPLAY_CACHE_TTL_SECS,
)
from fly_replay_router.fly.names import (
    FLY_REPLAY_FAILED as FLY_REPLAY_FAILED,
)
from fly_replay_router.fly.names import (
    FLY_REPLAY_SRC as FLY_REPLAY_SRC,
)
from fly_replay_router.fly.names import (
    FLY_REQUEST_ID as FLY_REQUEST_ID,
)
from fly_replay_router.fly.names import (
    HOP_BY_HOP as HOP_BY_HOP,
)
from fly_replay_router.fly.names import (
    MACHINE_ID_PATTERN as MACHINE_ID_PATTERN,
)
from fly_replay_router.fly.names import (
    MAX_DURATION_SECONDS as MAX_DURATION_SECONDS,
)
from fly_replay_router.fly.names import (
    MAX_HEADER_VALUE as MAX_HEADER_VALUE,
)
from fly_replay_router.fly.names import (
    REPLAY_BODY_LIMIT as REPLAY_BODY_LIMIT,
)
from fly_replay_router.fly.names import (
    REPLAY_JSON_CONTENT_TYPE as REPLAY_JSON_CONTENT_TYPE,
)
from fly_replay_router.fly.names import (
    FailureReason as FailureReason,
)
from fly_replay_router.fly.names import (
    Fallback as Fallback,
)
from fly_replay_router.fly.provenance import (
    ReplayFailure as ReplayFailure,
)
from fly_replay_router.fly.provenance import (
    ReplaySource as ReplaySource,
)
from fly_replay_router.fly.provenance import (
    parse_replay_failed as parse_replay_failed,
)
from fly_replay_router.fly.provenance import (
    parse_replay_src as parse_replay_src,
)
from fly_replay_router.fly.replay import (
    ReplayCacheDirective as ReplayCacheDirective,
)
from fly_replay_router.fly.replay import (
    ReplayInstruction as ReplayInstruction,
)
from fly_replay_router.fly.replay import (
    ReplayTransform as ReplayTransform,
)
from fly_replay_router.fly.replay import (
    parse_replay_header as parse_replay_header,
)
from fly_replay_router.fly.replay import (
    parse_replay_json as parse_replay_json,
)

__all__ = [
    "DEFAULT_REGION",
    "FLY_CLIENT_IP",
    "FLY_FORCE_INSTANCE_ID",
    "FLY_FORWARDED_PORT",
    "FLY_PREFERRED_INSTANCE_UNAVAILABLE",
    "FLY_PREFER_INSTANCE_ID",
    "FLY_REGION",
    "FLY_REPLAY",
    "FLY_REPLAY_CACHE",
    "FLY_REPLAY_CACHE_CONTROL",
    "FLY_REPLAY_CACHE_STATUS",
    "FLY_REPLAY_CACHE_TTL_SECS",
    "FLY_REPLAY_FAILED",
    "FLY_REPLAY_SRC",
    "FLY_REQUEST_ID",
    "HOP_BY_HOP",
    "MACHINE_ID_PATTERN",
    "MAX_DURATION_SECONDS",
    "MAX_HEADER_VALUE",
    "REPLAY_BODY_LIMIT",
    "REPLAY_JSON_CONTENT_TYPE",
    "FailureReason",
    "Fallback",
    "InvalidReplay",
    "ReplayCacheDirective",
    "ReplayFailure",
    "ReplayInstruction",
    "ReplaySource",
    "ReplayTransform",
    "ascii_decimal",
    "format_duration",
    "parse_duration",
    "parse_fields",
    "parse_replay_failed",
    "parse_replay_header",
    "parse_replay_json",
    "parse_replay_src",
]
