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
COPY app ./app
RUN pip install --no-deps .

RUN useradd --system --uid 10001 --no-create-home mcp
USER mcp

EXPOSE 8080
STOPSIGNAL SIGTERM

# One process per machine: a second worker would split the machine's sessions again.
# "::" accepts IPv4 and IPv6, so both Fly's proxy and peers on the private network (6PN) reach it.
# Forwarded headers come from Fly's proxy, the only thing in front of the machine.
CMD ["uvicorn", "app.main:app", "--host", "::", "--port", "8080", "--proxy-headers", "--forwarded-allow-ips", "*", "--timeout-graceful-shutdown", "25"]
