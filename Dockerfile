# syntax=docker/dockerfile:1
#
# broadcastd container image.
#
#   docker build -t broadcastd .
#   docker run --rm -p 8765:8765 -p 8767:8767 broadcastd
#
# Configuration is by environment (BROADCASTD_*, see config/broadcastd.env) or a
# TOML file mounted into the container:
#   docker run -v "$PWD/broadcastd.toml:/etc/broadcastd/broadcastd.toml:ro" \
#     broadcastd --config /etc/broadcastd/broadcastd.toml
#
# The control (publish) port 8766 listens on the container's loopback by default,
# which is enough for the HEALTHCHECK but unreachable from other containers. To
# publish from other containers set BOTH (the daemon refuses a non-loopback
# control host without a token):
#   -e BROADCASTD_CONTROL__HOST=0.0.0.0 -e BROADCASTD_CONTROL__TOKEN=<long random secret>
# and publish with "Authorization: Bearer <token>". Never publish 8766 to the internet.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# ---------------------------------------------------------------------------
# Builder: build the wheel and install it with its dependencies into a venv.
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN python -m venv /opt/broadcastd

WORKDIR /src
# .dockerignore admits only what the wheel is built from.
COPY . .
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/broadcastd/bin/pip install /wheels/broadcastd-*.whl \
    && /opt/broadcastd/bin/pip uninstall --yes pip

# ---------------------------------------------------------------------------
# Runtime: the interpreter of the same base image plus the venv, nothing else.
FROM ${PYTHON_IMAGE}

# image.version is pyproject.toml's version (tests/test_packaging.py holds it there).
LABEL org.opencontainers.image.title="broadcastd" \
      org.opencontainers.image.description="Pub/sub broadcast daemon: HTTP publishers, WebSocket subscribers" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid, so that Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 broadcastd \
    && useradd --system --no-log-init --uid 10001 --gid broadcastd \
       --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin broadcastd

COPY --from=builder /opt/broadcastd /opt/broadcastd

ENV PATH="/opt/broadcastd/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 10001:10001

# 8765 WebSocket subscribers, 8766 control/publish (loopback unless configured,
# see above), 8767 Prometheus metrics.
EXPOSE 8765 8766 8767

# /healthz needs no token. No curl in slim images: the venv's python does it.
# Follows BROADCASTD_CONTROL__PORT if you change the control port.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('BROADCASTD_CONTROL__PORT', '8766'), timeout=2)"]

# SIGTERM drains: readiness goes false, subscribers get close code 1001, exit 0
# within drain_timeout (10 s). Give "docker stop" more than that: docker stop -t 30.
STOPSIGNAL SIGTERM

# Exec form: the daemon is PID 1 and receives SIGTERM itself (no shell in between).
ENTRYPOINT ["broadcastd", "serve"]
