# syntax=docker/dockerfile:1
#
# smtpgate in a container.
#
#   docker build -t smtpgate .
#   docker run -d --name smtpgate -p 127.0.0.1:2525:2525 -v smtpgate-state:/var/lib/smtpgate smtpgate
#
# Config: with no file the embedded defaults run (deliver direct). Mount a config file at
# /etc/smtpgate/smtpgate.toml (found as ./smtpgate.toml from the working directory) or set
# SMTPGATE_CONFIG; any key can also be set as SMTPGATE_SECTION__KEY=value.
# Shutdown waits up to 10 s for SMTP sessions and 10 s for deliveries under way, so give
# the container more than Docker's default 10 s: `docker run --stop-timeout 25` (compose:
# `stop_grace_period: 25s`).

# --- build: a virtual environment with smtpgate and its dependencies -----------------------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/smtpgate

WORKDIR /src
# Only what the package needs (see .dockerignore); README.md is optional metadata.
COPY . .
RUN /opt/smtpgate/bin/pip install --no-cache-dir . \
    && /opt/smtpgate/bin/smtpgate --version

# --- run: the venv on a clean slim image, as an unprivileged user ---------------------------
FROM python:3.11-slim

ARG SMTPGATE_UID=10025
ARG SMTPGATE_GID=10025

RUN groupadd --system --gid "${SMTPGATE_GID}" smtpgate \
    && useradd --system --uid "${SMTPGATE_UID}" --gid smtpgate \
        --home-dir /var/lib/smtpgate --no-create-home --shell /usr/sbin/nologin smtpgate \
    && install -d -o smtpgate -g smtpgate -m 0750 /var/lib/smtpgate \
    && install -d -m 0755 /etc/smtpgate

COPY --from=build /opt/smtpgate /opt/smtpgate

# Inside a container clients arrive from the bridge network, not from loopback: listen on
# every interface and trust the private networks Docker and Kubernetes use. Values are TOML.
ENV PATH=/opt/smtpgate/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SMTPGATE_STATE_DIR=/var/lib/smtpgate \
    SMTPGATE_SERVER__LISTEN='["0.0.0.0:2525"]' \
    SMTPGATE_SERVER__TRUSTED_NETWORKS='["127.0.0.0/8","::1/128","10.0.0.0/8","172.16.0.0/12","192.168.0.0/16"]' \
    SMTPGATE_LOG__FORMAT=json

# The spool lives here: keep it on a volume, or mail accepted with 250 dies with the container.
VOLUME ["/var/lib/smtpgate"]

WORKDIR /etc/smtpgate
USER ${SMTPGATE_UID}:${SMTPGATE_GID}

EXPOSE 2525

# Healthy when the listener answers with its 220 greeting (slim has no curl).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import socket,sys; s=socket.create_connection(('127.0.0.1',2525),timeout=4); g=s.recv(512); s.sendall(b'QUIT\\r\\n'); s.close(); sys.exit(0 if g.startswith(b'220') else 1)"]

ENTRYPOINT ["smtpgate"]
CMD ["serve"]
