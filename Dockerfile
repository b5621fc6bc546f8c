# The demo MCP server behind the affinity layer, as every Fly Machine of the app runs it.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv

# Pinned dependencies first: a code change rebuilds only the layers below.
COPY requirements.lock ./
RUN pip install --requirement requirements.lock

COPY pyproject.toml README.md ./
COPY fly_replay_router ./fly_replay_router
COPY app ./app
RUN pip install --no-deps .

RUN useradd --system --uid 10001 --no-create-home mcp
USER mcp

# The service's port (fly.toml's internal_port). The metrics port, 9091, is deliberately in no
# fly.toml service: only Fly's scraper, over the private network, reaches it.
EXPOSE 8080
STOPSIGNAL SIGTERM

# One worker process per CPU of the VM (fly.toml's cpus; --workers N overrides): sessions stick to the
# worker that holds them, the others hand its requests over on the machine (a Unix socket each, under
# /tmp/fly-replay-router-<uid>/); docs/workers.md.
# fly_replay_router.serve runs uvicorn on 0.0.0.0:8080 (IPv4: Fly's proxy reaches machines that way)
# and [::]:8080 (IPv6: peers on the private network, 6PN), /metrics on 9091 (both families), trusts
# X-Forwarded-* (Fly's proxy is the only thing in front), and finishes open requests within 25 s of
# SIGTERM, inside fly.toml's kill_timeout. `python -m fly_replay_router.serve --help` explains.
CMD ["python", "-m", "fly_replay_router.serve", "app.main:app", "--port", "8080", "--metrics-port", "9091", "--timeout-graceful-shutdown", "25"]
