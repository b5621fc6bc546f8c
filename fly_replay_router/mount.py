"""One call that readies a user's MCP ASGI app for Fly: ``wrap_mcp_app``; and ``load_settings``.

Whatever the SDK (mcp 1.x ``FastMCP``, mcp 2.x ``MCPServer``, PrefectHQ ``fastmcp``), its
Streamable HTTP or SSE app is an ASGI app with a lifespan that runs its session manager. Mounted
inside another app (``api.mount("/notes", ...)``) that lifespan never runs by itself: Starlette sends
lifespan events to the top-level app only. ``FlyMCPApp.lifespan`` runs it from the parent's.

Reference: ASGI "Lifespan Protocol" (https://asgi.readthedocs.io/en/latest/specs/lifespan.html);
Fly "Content Encoding with the Fly Proxy" (event streams are sent uncompressed).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

from fly_replay_router.affinity.middleware import AffinityMiddleware
from fly_replay_router.asgi import ASGIApp, Message, Receive, Scope, Send
from fly_replay_router.settings import AffinitySettings
from fly_replay_router.streaming import UncompressedStreamsMiddleware


def load_settings(environ: Mapping[str, str] | None = None) -> AffinitySettings:
    """``AffinitySettings.from_env()``, or exit with one sentence that says what to fix.

    For module level in an app that uvicorn imports: on Fly without ``AFFINITY_SECRET`` the process
    stops with ``fly-replay-router cannot start: ...`` instead of a traceback.
    """
    try:
        return AffinitySettings.from_env(environ)
    except ValueError as exc:
        raise SystemExit(f"fly-replay-router cannot start: {exc}") from None


class FlyMCPApp:
    """A user's MCP app behind the affinity layer, with its event streams marked uncompressed.

    Serve it as the whole app, or mount it and pass ``lifespan`` to the parent app
    (``FastAPI(lifespan=wrapped.lifespan)``) so that the SDK's session manager runs.
    """

    def __init__(self, app: ASGIApp, *, settings: AffinitySettings) -> None:
        self.inner = app
        self.settings = settings
        self.middleware = AffinityMiddleware(app, settings=settings)
        self._app = UncompressedStreamsMiddleware(self.middleware)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(self, _parent: object = None) -> AsyncIterator[None]:
        """Run the inner app's own lifespan (start-up on enter, shutdown on exit), and this worker's
        hand-over socket (several workers per machine) with it."""
        async with run_lifespan(self.inner), self.middleware.workers.running():
            yield


def wrap_mcp_app(app: ASGIApp, *, settings: AffinitySettings | None = None) -> FlyMCPApp:
    """``app`` (an MCP server's ASGI app) ready for many Fly Machines.

    ``settings`` defaults to ``load_settings()``: the environment Fly gives each machine.
    """
    return FlyMCPApp(app, settings=load_settings() if settings is None else settings)


@contextlib.asynccontextmanager
async def run_lifespan(app: ASGIApp) -> AsyncIterator[None]:
    """Drive ``app``'s ASGI lifespan: start-up before the block, shutdown after it.

    Raises ``RuntimeError`` with the app's message if its start-up or shutdown fails.
    """
    to_app: asyncio.Queue[Message] = asyncio.Queue()
    started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    stopped: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def send(message: Message) -> None:
        kind = message["type"]
        waiter = started if kind.startswith("lifespan.startup.") else stopped
        if not waiter.done():
            if kind.endswith(".failed"):
                waiter.set_exception(RuntimeError(message.get("message") or f"the MCP app's {kind}"))
            else:
                waiter.set_result(None)

    scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
    task = asyncio.ensure_future(app(scope, to_app.get, send))

    def app_ended(done: asyncio.Future[None]) -> None:
        # An app that returns (or raises) without answering would leave us waiting forever.
        error = None if done.cancelled() else done.exception()
        for waiter in (started, stopped):
            if not waiter.done():
                waiter.set_exception(error or RuntimeError("the MCP app ended its lifespan without answering"))

    task.add_done_callback(app_ended)
    await to_app.put({"type": "lifespan.startup"})
    try:
        await started
        yield
    finally:
        await to_app.put({"type": "lifespan.shutdown"})
        try:
            await stopped
        finally:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
