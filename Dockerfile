# syntax=docker/dockerfile:1
# SAML → OAuth gateway. Mount the config at /etc/saml-gateway/gateway.yaml (see README).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/saml-gateway
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# The same install as the README's, with uvloop (the "speed" extra). DL3013: this installs
# the local package; its dependency ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN python -m pip install ".[speed]" \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gateway

USER 10001
# 8080: the proxy listener; 9901: admin (/healthz, /readyz, /metrics).
EXPOSE 8080 9901
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2).status != 200)"]

ENTRYPOINT ["saml-gateway"]
CMD ["run", "-c", "/etc/saml-gateway/gateway.yaml"]
