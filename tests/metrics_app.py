"""The demo app with its metrics summed across workers, for servers other than the image's launcher.

``python -m fly_replay_router.serve`` does this itself. Under ``uvicorn --workers`` or gunicorn,
each worker imports this module: it registers the layer's metrics with the directory of its
supervisor (``supervisor_directory``), and

- with ``METRICS_PORT`` (gunicorn binding the app's port and that one): ``PrivateMetrics`` answers
  scrapes on that port and keeps the worker's figures published from the lifespan;
- without (``uvicorn --workers``, one port): ``/metrics`` on the app's port, and the lifespan
  publishes. Fine on loopback in a test; on Fly that port is public, so use a port of its own.
"""

from __future__ import annotations

import os

from prometheus_client import make_asgi_app

from app.main import app as demo
from app.main import settings
from fly_replay_router.affinity.metrics import register_metrics
from fly_replay_router.affinity.worker_metrics import active, supervisor_directory
from fly_replay_router.asgi import ASGIApp, Receive, Scope, Send
from fly_replay_router.private_metrics import PrivateMetrics

WORKERS_DIR = supervisor_directory(settings.machine_id)
register_metrics(workers_dir=WORKERS_DIR)
_scrape = make_asgi_app()


async def _same_port(scope: Scope, receive: Receive, send: Send) -> None:
    publisher = active()
    if scope["type"] == "lifespan" and publisher is not None:
        async with publisher.publishing():
            await demo(scope, receive, send)
        return
    if scope["type"] == "http" and scope["path"] == "/metrics":
        await _scrape(scope, receive, send)
        return
    await demo(scope, receive, send)


app: ASGIApp = (
    PrivateMetrics(demo, metrics_port=int(os.environ["METRICS_PORT"])) if os.environ.get("METRICS_PORT") else _same_port
)
