"""The HTTP edge towards authorization servers: sends token requests, with retries.

Rules this module owns:
- One dedicated aiohttp ``ClientSession`` for authorization servers, created lazily inside
  the running loop: no cookie jar (a token endpoint must not make us stateful), no proxy
  settings from the environment, no redirects followed, its own connection limits.
- Every attempt has the server's connect and total timeouts; all attempts together fit in
  ``retries.deadline``. Only ``retryable`` errors (5xx answers, failures to connect) are
  retried, with exponential backoff and jitter. A read timeout is not retried: the server
  may already have consumed a one-time assertion, and the time budget is spent anyway.
- aiohttp's exceptions stop here and become gateway errors.
- A client or configuration error (``invalid_client``…) is logged at ERROR naming the
  server, because only an operator can fix it. Tokens, assertions and secrets are never
  logged.
- It knows assertions only as bytes and a SAML version, and tracing only as the small
  ``Tracer`` below (``gateway.tracing.Tracing`` is one): oauth sits beside saml, not on it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp

from gateway.config import AuthorizationServer
from gateway.errors import (
    ConfigError,
    GatewayError,
    InvalidAssertion,
    ServerFault,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.oauth.client_auth import SigningKey, load_signing_key
from gateway.oauth.grant import (
    CLIENT_ERRORS,
    TOO_LARGE,
    TokenRequest,
    build_token_request,
    parse_token_response,
    server_problems,
)
from gateway.values import Token

logger = logging.getLogger("gateway.oauth")

UNREACHABLE = "as_unreachable"

Observer = Callable[[str, str, float], None]
_Presented = tuple[bytes, str]  # the verified document and its SAML version


class Span(Protocol):
    def set_attribute(self, key: str, value: str | int) -> None: ...


class Tracer(Protocol):
    """What the client needs of tracing: a span around each attempt, and the headers that
    carry the current span's context (``traceparent``) to the server."""

    def span(
        self, name: str, attributes: Mapping[str, str] | None = None, *, client: bool = False
    ) -> AbstractContextManager[Span]: ...

    def headers(self) -> dict[str, str]: ...


class TokenClient:
    """Exchanges verified assertions for access tokens at the configured servers."""

    def __init__(
        self,
        servers: Mapping[str, AuthorizationServer],
        *,
        observer: Observer | None = None,
        max_connections: int = 100,
        max_connections_per_host: int = 32,
        rng: Callable[[], float] = random.random,
        tracer: Tracer | None = None,
    ) -> None:
        problems: list[str] = []
        keys: dict[str, SigningKey] = {}
        for name, server in servers.items():
            problems += server_problems(name, server)
            settings = server.private_key_jwt
            if server.client_auth == "private_key_jwt" and settings is not None:
                where = f"authorization_servers.{name}.private_key_jwt.key_file"
                try:
                    pem = Path(settings.key_file).read_bytes()
                    keys[name] = load_signing_key(
                        pem, settings.algorithm, key_id=settings.key_id, where=where
                    )
                except OSError as exc:
                    problems.append(f"{where}: cannot read: {exc.strerror}")
                except ConfigError as exc:
                    problems += exc.problems
        if problems:
            raise ConfigError(problems)
        self._servers = dict(servers)
        self._keys = keys
        self._observer = observer
        self._limits = (max_connections, max_connections_per_host)
        self._rng = rng
        self._tracer = tracer
        self._session: aiohttp.ClientSession | None = None

    async def exchange(self, server: str, assertion: bytes, *, saml_version: str = "2.0") -> Token:
        """A token for ``assertion`` (the verified document, a SAML ``saml_version`` one) from
        the authorization server named ``server``; raises gateway errors only."""
        settings = self._servers.get(server)
        if settings is None:
            raise UpstreamError("as_unknown_server", f"no authorization server {server!r}")
        started = time.monotonic()
        outcome: str | None = None
        try:
            token = await self._attempts(server, settings, (assertion, saml_version))
            outcome = "ok"
            return token
        except GatewayError as exc:
            outcome = _outcome(exc)
            _log(server, outcome, exc)
            raise
        finally:
            # A cancelled exchange has no outcome to report.
            if outcome is not None and self._observer is not None:
                try:
                    self._observer(server, outcome, time.monotonic() - started)
                except Exception:
                    logger.exception("token exchange observer failed")

    def build_request(
        self, server: str, assertion: bytes, *, saml_version: str = "2.0"
    ) -> TokenRequest:
        """The request an exchange of ``assertion`` (a decoded document) would send now."""
        return build_token_request(
            self._servers[server],
            assertion,
            now=time.time(),
            jti=secrets.token_urlsafe(18),
            signing_key=self._keys.get(server),
            saml_version=saml_version,
        )

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    # --- internals -----------------------------------------------------------------------

    def _client_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            limit, per_host = self._limits
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=limit, limit_per_host=per_host),
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
            )
        return self._session

    async def _attempts(
        self, name: str, server: AuthorizationServer, assertion: _Presented
    ) -> Token:
        retries = server.retries
        loop = asyncio.get_running_loop()
        deadline = loop.time() + retries.deadline
        try:
            async with asyncio.timeout_at(deadline):
                attempt = 0
                while True:
                    try:
                        return await self._attempt(name, server, assertion, deadline)
                    except GatewayError as exc:
                        attempt += 1
                        if not exc.retryable or attempt >= retries.attempts:
                            raise
                        delay = self._backoff(server, attempt)
                        if loop.time() + delay >= deadline:
                            raise
                        logger.warning(
                            "authorization server %r: attempt %d failed (%s), retrying in %.2fs",
                            name,
                            attempt,
                            exc.reason,
                            delay,
                        )
                    await asyncio.sleep(delay)
        except TimeoutError:
            raise UpstreamTimeout(
                "as_deadline", f"no answer within {retries.deadline:g}s"
            ) from None

    def _backoff(self, server: AuthorizationServer, attempt: int) -> float:
        """Exponential backoff with "equal jitter": half fixed, half random."""
        ceiling = min(server.retries.max_backoff, server.retries.backoff * 2.0 ** (attempt - 1))
        return ceiling / 2 + self._rng() * ceiling / 2

    async def _attempt(
        self, name: str, server: AuthorizationServer, assertion: _Presented, deadline: float
    ) -> Token:
        if self._tracer is None:
            return await self._post(name, server, assertion, deadline, None)
        attributes = {
            "gateway.authorization_server": name,
            "server.address": urlsplit(server.token_url).hostname or "",
        }
        with self._tracer.span("token exchange", attributes, client=True) as span:
            try:
                token = await self._post(name, server, assertion, deadline, span)
            except GatewayError as exc:
                span.set_attribute("gateway.exchange.outcome", _outcome(exc))
                raise
            span.set_attribute("gateway.exchange.outcome", "ok")
            return token

    async def _post(
        self,
        name: str,
        server: AuthorizationServer,
        assertion: _Presented,
        deadline: float,
        span: Span | None,
    ) -> Token:
        """One attempt; ``span`` (tracing on) is its span, whose ``traceparent`` it sends."""
        # Built per attempt: a private_key_jwt client assertion is good for one request.
        document, saml_version = assertion
        request = self.build_request(name, document, saml_version=saml_version)
        headers = dict(request.headers)
        if span is not None and self._tracer is not None:
            headers.update(self._tracer.headers())
        remaining = deadline - asyncio.get_running_loop().time()
        timeout = aiohttp.ClientTimeout(
            total=max(0.001, min(server.timeouts.total, remaining)),
            connect=server.timeouts.connect,
        )
        try:
            async with self._client_session().post(
                request.url,
                data=request.body,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            ) as response:
                if span is not None:
                    span.set_attribute("http.response.status_code", response.status)
                body = await _read_capped(response, server.max_response_bytes)
                return parse_token_response(
                    server,
                    response.status,
                    body,
                    content_type=response.headers.get("Content-Type", ""),
                    retry_after=response.headers.get("Retry-After"),
                )
        except aiohttp.ConnectionTimeoutError:
            # Nothing was sent yet, so another attempt is safe.
            raise ServerFault(UNREACHABLE, "connect timeout") from None
        except TimeoutError:
            raise UpstreamTimeout("as_timeout", f"no answer within {timeout.total:g}s") from None
        except aiohttp.ClientSSLError as exc:
            raise UpstreamError("as_tls", type(exc).__name__) from None
        except aiohttp.ClientConnectionError as exc:
            raise ServerFault(UNREACHABLE, type(exc).__name__) from None
        except aiohttp.ClientError as exc:
            raise UpstreamError("as_protocol", type(exc).__name__) from None


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, refusing to buffer more than ``limit`` bytes of it."""
    if response.content_length is not None and response.content_length > limit:
        raise UpstreamError(TOO_LARGE, f"response over {limit} bytes")
    body = bytearray()
    while True:
        chunk = await response.content.read(limit + 1 - len(body))
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > limit:
            raise UpstreamError(TOO_LARGE, f"response over {limit} bytes")


def _outcome(exc: GatewayError) -> str:
    if isinstance(exc, InvalidAssertion):
        return "invalid_grant"
    if isinstance(exc, Unavailable):
        return "unavailable"
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if exc.reason in CLIENT_ERRORS:
        return "client_error"
    return "error"


def _log(server: str, outcome: str, exc: GatewayError) -> None:
    if outcome == "client_error":
        logger.error(
            "authorization server %r refused the gateway's request (%s: %s); check client_id, "
            "client credentials, scope and allowed grant types of this server",
            server,
            exc.reason,
            exc.detail or "no description",
        )
    elif outcome == "invalid_grant":
        logger.info("authorization server %r rejected an assertion: %s", server, exc.detail)
    else:
        logger.warning("authorization server %r: %s (%s)", server, exc.reason, exc.detail)
