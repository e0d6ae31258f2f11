"""The request path, in the order of DESIGN.md:

    route match → extract assertion → token cache (fast path)
        → on a miss: validate → single-flight exchange → store
        → forward upstream with the Bearer token, stream the answer back

``Runtime`` holds what one loaded configuration needs; a reload builds a new one while the
token cache lives on. Errors are raised as gateway errors; only ``gateway.app`` turns them
into HTTP responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any

from aiohttp import web
from cachetools import TTLCache

from gateway.cache import CachedToken, TokenCache
from gateway.config import AuthorizationServer, Config, Route
from gateway.errors import GatewayError, InvalidAssertion, NoRoute
from gateway.metrics import Metrics
from gateway.oauth.client import TokenClient
from gateway.proxy.forward import Forwarder, request_target, wants_websocket
from gateway.routing import Router, routable_path
from gateway.saml import (
    TrustPolicy,
    assertion_digest,
    build_trust_policy,
    extract_assertion,
    validate_assertion,
)
from gateway.saml.evidence import printable

if TYPE_CHECKING:
    from gateway.tracing import Tracing

DEFAULT_REALM = "saml-gateway"


@dataclass(slots=True)
class Trace:
    """What the access log says about one request (never the assertion or the token)."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)
    route: str = "-"
    cache: str = "-"
    assertion_id: str | None = None
    issuer: str | None = None
    # A refused assertion's ID and Issuer as read before verification: evidence, not identity.
    assertion_id_unverified: str | None = None
    issuer_unverified: str | None = None
    upstream_seconds: float | None = None
    reason: str | None = None
    detail: str | None = None  # the refusal in explain's words ("audience: expected X, ...")
    realm: str = DEFAULT_REALM  # for the 401 challenge: the route's, once it is known
    # With tracing on (gateway.tracing): the request's span, its context token, its trace.
    span: Any = None
    span_token: Any = None
    trace_id: str | None = None


class Runtime:
    """Everything one configuration generation needs to serve requests."""

    def __init__(
        self, config: Config, cache: TokenCache, metrics: Metrics, tracing: Tracing | None = None
    ) -> None:
        self.config = config
        self.tracing = tracing
        self.cache = cache
        self.metrics = metrics
        self.router = Router(config.routes)
        self.sources = config.assertion.headers
        self.max_size = config.assertion.max_size
        # Never forwarded: every header that may carry the assertion, and any Authorization.
        self.strip = frozenset({h.name.lower() for h in self.sources} | {"authorization"})
        self.policies: dict[tuple[str, str], TrustPolicy] = {}
        self.cache_keys: dict[tuple[str, str], str] = {}
        for route in config.routes:
            key = (route.identity_provider, route.authorization_server)
            if key not in self.policies:
                server = config.authorization_servers[key[1]]
                policy = build_trust_policy(
                    config.identity_providers[key[0]], server, config.assertion, idp_name=key[0]
                )
                self.policies[key] = policy
                self.cache_keys[key] = _cache_key(key, policy, server)
        self.token_client = TokenClient(
            config.authorization_servers, observer=metrics.observe_exchange, tracing=tracing
        )
        self.forwarder = Forwarder(config.proxy, config.routes)
        # (cache key, assertion ID) of tokens the upstream refused lately: a refused token is
        # dropped (and the assertion exchanged again) once per interval, not per request.
        self._refused: TTLCache[tuple[str, str], bool] = TTLCache(
            maxsize=config.cache.max_entries, ttl=config.proxy.reexchange_interval
        )
        # Requests inside this runtime: a retired one closes its sessions only when idle.
        # WebSockets are counted apart: HTTP timeouts do not bound them, so neither does
        # the wait for them after a reload.
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._websockets = 0
        self._no_websockets = asyncio.Event()
        self._no_websockets.set()

    async def start(self) -> None:
        await self.forwarder.start()

    async def close(self) -> None:
        await self.forwarder.close()
        await self.token_client.close()

    @contextlib.contextmanager
    def serving(self, *, websocket: bool = False) -> Iterator[None]:
        """Count a request (or a WebSocket, for its whole life) as inside this runtime."""
        if websocket:
            self._websockets += 1
            self._no_websockets.clear()
        else:
            self._active += 1
            self._idle.clear()
        try:
            yield
        finally:
            if websocket:
                self._websockets -= 1
                if not self._websockets:
                    self._no_websockets.set()
            else:
                self._active -= 1
                if not self._active:
                    self._idle.set()

    async def drained(self) -> None:
        """Return once nothing is inside: HTTP requests are waited for as long as the
        longest any could take; WebSockets until they end (a route's ``websocket_idle`` and
        ``websocket_lifetime`` bound them, nothing else), so a reload never cuts one."""
        config = self.config
        longest = max(route.timeouts.total for route in config.routes) + max(
            server.retries.deadline for server in config.authorization_servers.values()
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), longest)
        await self._no_websockets.wait()

    def route_for(self, host: str | None, path: str, trace: Trace) -> Route:
        route = self.router.match(host, path)
        if route is None:
            raise NoRoute("no_route", f"no route for {path!r}")
        trace.route, trace.realm = route.label, route.realm or DEFAULT_REALM
        return route

    async def authorize(
        self, route: Route, headers: Mapping[str, str], trace: Trace
    ) -> CachedToken:
        """A token for the assertion in ``headers``: from the cache, or validated and exchanged."""
        raw = extract_assertion(headers, self.sources, self.max_size)
        if raw is None:
            raise InvalidAssertion("missing", "no assertion header in the request")
        digest = assertion_digest(raw)
        key = self.cache_key(route)
        entry = self.cache.lookup(key, digest)
        if entry is None:  # the token another replica got for exactly these bytes
            entry = await self.cache.shared_lookup(key, digest)
        if entry is not None:
            trace.cache, trace.assertion_id = "hit", entry.assertion_id
            trace.issuer = entry.issuer or None
            return entry
        trace.cache = "miss"
        policy = self.policies[(route.identity_provider, route.authorization_server)]
        if self.tracing is None:
            assertion = validate_assertion(raw, policy, datetime.now(UTC), digest=digest)
        else:
            with self.tracing.span("validate assertion") as span:
                assertion = validate_assertion(raw, policy, datetime.now(UTC), digest=digest)
                span.set_attribute("gateway.assertion_id", assertion.id)
        trace.assertion_id, trace.issuer = assertion.id, assertion.issuer
        exchange = partial(self.token_client.exchange, route.authorization_server)
        return await self.cache.obtain(key, assertion, exchange)

    def cache_key(self, route: Route) -> str:
        """Whose tokens a route's requests share (see ``_cache_key``)."""
        return self.cache_keys[(route.identity_provider, route.authorization_server)]

    async def proxy(self, request: web.BaseRequest, trace: Trace) -> web.StreamResponse:
        """The whole flow for one proxied request."""
        with self.serving(websocket=wants_websocket(request)):
            return await self._proxy(request, trace)

    async def _proxy(self, request: web.BaseRequest, trace: Trace) -> web.StreamResponse:
        # The Host header as sent: aiohttp's request.host may fall back to a blocking lookup.
        path = routable_path(request_target(request))
        route = self.route_for(request.headers.get("Host"), path, trace)
        self.forwarder.admit(request, route)  # 413 before validating or exchanging anything
        entry = await self.authorize(route, request.headers, trace)
        stamp = {"X-Request-ID": trace.request_id}
        if self.tracing is None:
            result = await self.forwarder.forward(
                request, route, entry.token.access_token, self.strip, stamp
            )
        else:
            with self.tracing.span("upstream", {"http.route": route.label}, client=True) as span:
                result = await self.forwarder.forward(
                    request,
                    route,
                    entry.token.access_token,
                    self.strip,
                    stamp,
                    trace_headers=self.tracing.headers(),
                )
                span.set_attribute("http.response.status_code", result.upstream_status)
        trace.upstream_seconds = result.upstream_seconds
        self.metrics.observe_upstream(route.label, result.upstream_seconds)
        if result.token_rejected:
            # The upstream no longer accepts this token: the next request exchanges afresh,
            # but only once per interval, or a client could drive the exchange rate (by ID,
            # so byte variants of the assertion count as one).
            refused = (self.cache_key(route), entry.assertion_id)
            if refused not in self._refused:
                self._refused[refused] = True
                await self.cache.purge(entry)
        return result.response


def _cache_key(names: tuple[str, str], policy: TrustPolicy, server: AuthorizationServer) -> str:
    """Tokens are kept per (identity provider, authorization server) and per the settings
    they were obtained under: a token one IdP's assertion earned is never handed out on a
    route that trusts another (assertion IDs are unique per issuer only), and when a reload
    changes the trust (keys, issuers, audience, recipients) or the server (URL, client,
    scope), the key changes with it, so neither memory nor Redis serves the old tokens.
    Secrets are masked in the fingerprint: rotating a client secret keeps the tokens."""
    fingerprint = hashlib.sha256()
    for der in sorted(key.der for key in policy.keys):
        fingerprint.update(der)
    trust = (
        sorted(policy.issuers),
        policy.audience,
        sorted(policy.recipients),
        policy.clock_skew.total_seconds(),
        policy.allow_sha1,
        policy.min_rsa_key_bits,
    )
    fingerprint.update(repr(trust).encode())
    fingerprint.update(server.model_dump_json().encode())
    return f"{names[0]}\x1f{names[1]}\x1f{fingerprint.hexdigest()[:16]}"


def note_failure(trace: Trace, error: GatewayError, metrics: Metrics) -> None:
    """What the access line says about a failed request: the reason word (also the metric's
    label) and, for the client's mistakes, the detail an operator acts on. Server-side
    failures keep their detail to their own log lines."""
    trace.reason = error.reason
    if error.status < 500 and error.detail:
        trace.detail = error.detail
    if isinstance(error, InvalidAssertion):
        metrics.validation_failures.labels(error.reason).inc()
        if trace.assertion_id is None and error.unverified_id is not None:
            trace.assertion_id_unverified = printable(error.unverified_id)
        if trace.issuer is None and error.unverified_issuer is not None:
            trace.issuer_unverified = printable(error.unverified_issuer)
