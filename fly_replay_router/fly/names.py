"""Fly Proxy's names and limits: header names, machine ids, the replay body limit, hop-by-hop headers.

References: "Dynamic request routing with fly-replay"
(https://fly.io/docs/networking/dynamic-request-routing/), "Request headers"
(https://fly.io/docs/networking/request-headers/), "Error codes and troubleshooting"
(https://fly.io/docs/reference/error-codes/).
"""

from __future__ import annotations

import re
from typing import Literal

# Response headers an app sends to the proxy.
FLY_REPLAY = "fly-replay"
FLY_REPLAY_CACHE = "fly-replay-cache"
FLY_REPLAY_CACHE_TTL_SECS = "fly-replay-cache-ttl-secs"
REPLAY_JSON_CONTENT_TYPE = "application/vnd.fly.replay+json"

# Request headers the proxy adds.
FLY_REPLAY_SRC = "fly-replay-src"
FLY_REPLAY_FAILED = "fly-replay-failed"
FLY_PREFERRED_INSTANCE_UNAVAILABLE = "fly-preferred-instance-unavailable"
FLY_REPLAY_CACHE_STATUS = "fly-replay-cache-status"
FLY_REQUEST_ID = "fly-request-id"
FLY_CLIENT_IP = "fly-client-ip"
FLY_REGION = "fly-region"
FLY_FORWARDED_PORT = "fly-forwarded-port"

# Request headers a client may send.
FLY_FORCE_INSTANCE_ID = "fly-force-instance-id"
FLY_PREFER_INSTANCE_ID = "fly-prefer-instance-id"
FLY_REPLAY_CACHE_CONTROL = "fly-replay-cache-control"

Fallback = Literal["force_self", "prefer_self"]
FailureReason = Literal["timeout", "retries_exhausted", "no_candidate"]

MACHINE_ID_PATTERN = re.compile(r"[0-9a-z]{1,32}")
# Values the header grammar can carry unchanged: no separators, quotes or spaces.
NAME = re.compile(r"[A-Za-z0-9_-]{1,63}")
STATE = re.compile(r"[\x21\x23-\x3a\x3c-\x7e]{1,512}")
# Longer than any proxy keeps trying, and short enough to stay an exact float of milliseconds.
MAX_DURATION_SECONDS = 24 * 3600
# A header value longer than this is not a replay instruction anyone meant to send.
MAX_HEADER_VALUE = 4096
# Fly's proxy buffers at most this much of a request body for a replay; a larger body, or one of
# unknown length (chunked), cannot be replayed (error PA01).
REPLAY_BODY_LIMIT = 1024 * 1024
# RFC 9110 section 7.6.1: meaningful for one connection only, so never passed on by a proxy. Also
# "expect": whoever reads the body (the edge, or the layer forwarding it) answers 100-continue itself.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
     "trailer", "transfer-encoding", "upgrade", "expect"}
)  # fmt: skip
# The region of a machine outside Fly (the layer's logs, the local fleet): a code shaped like Fly's.
DEFAULT_REGION = "lcl"
