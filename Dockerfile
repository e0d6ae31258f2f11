# syntax=docker/dockerfile:1
# SAML → OAuth gateway. The default config (config/container.yaml) takes its values from the
# environment; mount your own at /etc/saml-gateway/gateway.yaml for more (see README).

# A patch release, so two builds of one commit start from the same Python; pin a digest
# (…@sha256:…) as well for a byte-identical base.
ARG BASE_IMAGE=docker.io/library/python:3.11.14-slim-bookworm
FROM ${BASE_IMAGE}

ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=""
LABEL org.opencontainers.image.title="saml-oauth-gateway" \
      org.opencontainers.image.description="A reverse proxy that swaps SAML 2.0 assertions for OAuth access tokens (RFC 7522)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/saml-gateway/venv/bin:$PATH

WORKDIR /opt/saml-gateway
# Dependencies first, from the lock alone (exact versions, hashes checked, nothing resolved):
# this layer stays cached while only the gateway's code changes.
COPY requirements.lock ./
RUN python -m venv venv \
    && pip install --no-deps --require-hashes -r requirements.lock

COPY pyproject.toml README.md ./
COPY gateway ./gateway
# `saml-gateway init` reads its profiles through gateway/profiles, a link to these.
COPY config/examples ./config/examples
# The gateway itself, with the build backend from the lock and no index: nothing unpinned gets
# in. `pip check` fails the build if the lock no longer satisfies pyproject.toml.
# DL3013: this installs the local package; its dependencies are pinned in requirements.lock.
# hadolint ignore=DL3013
RUN pip install --no-deps --no-build-isolation --no-index . \
    && pip check \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gateway

COPY config/container.yaml /etc/saml-gateway/gateway.yaml

USER 10001
# 8080: the proxy listener; 9901: admin (/healthz, /readyz, /metrics).
EXPOSE 8080 9901
# GET /readyz on the admin listener that /etc/saml-gateway/gateway.yaml (or $GATEWAY_CONFIG)
# names, so a config with another admin port is still checked there.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["saml-gateway", "healthcheck"]

ENTRYPOINT ["saml-gateway"]
CMD ["run", "-c", "/etc/saml-gateway/gateway.yaml"]
