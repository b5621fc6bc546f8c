"""ASGI type aliases for the layer and the edge, so that neither needs a framework to type itself.

Reference: the ASGI specification, "HTTP & WebSocket" messages (https://asgi.readthedocs.io/).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
