"""The request path, in the order of DESIGN.md:

    route match → extract assertion → token cache (fast path)
        → on a miss: validate → single-flight exchange → store
        → forward upstream with the Bearer token, stream the answer back

A ``Pipeline`` holds the parts one loaded configuration builds for that path (router, trust
policies, token client, forwarder); a reload builds a new one while the token cache lives
on. Errors are raised as gateway errors; only the server (``gateway.app``) turns them into
HTTP responses, and it owns the request's ``AccessRecord``, which the path fills in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime

from aiohttp import web
from cachetools import TTLCache

from gateway.access import DEFAULT_REALM, AccessRecord
from gateway.cache import CachedToken, TokenCache
from gateway.config import AuthorizationServer, Config, Route
from gateway.errors import InvalidAssertion, NoRoute
from gateway.metrics import Metrics
from gateway.oauth.client import TokenClient
from gateway.proxy.forward import Forwarder, ForwardResult, request_target
from gateway.routing import Router, routable_path
from gateway.saml import (
    Assertion,
    TrustPolicy,
    assertion_digest,
    build_trust_policy,
    extract_assertion,
    validate_assertion,
)
from gateway.tracing import UNTRACED, Tracer, Tracing


class Pipeline:
    """The request path as one configuration builds it."""

    def __init__(
        self, config: Config, cache: TokenCache, metrics: Metrics, tracing: Tracing | None = None
    ) -> None:
        self.config = config
        self.tracer: Tracer = tracing or UNTRACED
        self.cache = cache
        self.metrics = metrics
        self.router = Router(config.routes)
        self.sources = config.assertion.headers
        self.max_size = config.assertion.max_size
        # Never forwarded (nor any Authorization: proxy/headers.py adds that rule).
        self.strip = frozenset(h.name.lower() for h in self.sources)
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
            config.authorization_servers, observer=metrics.observe_exchange, tracer=tracing
        )
        self.forwarder = Forwarder(config.proxy, config.routes)
        # (cache key, assertion ID) of tokens the upstream refused lately: a refused token is
        # dropped (and the assertion exchanged again) once per interval, not per request.
        self._refused: TTLCache[tuple[str, str], bool] = TTLCache(
            maxsize=config.cache.max_entries, ttl=config.proxy.reexchange_interval
        )

    async def start(self) -> None:
        await self.forwarder.start()

    async def close(self) -> None:
        await self.forwarder.close()
        await self.token_client.close()

    def longest_request(self) -> float:
        """How long an HTTP request may take here at most: upstream and exchange deadlines."""
        config = self.config
        return max(route.timeouts.total for route in config.routes) + max(
            server.retries.deadline for server in config.authorization_servers.values()
        )

    # --- the flow ------------------------------------------------------------------------

    async def proxy(self, request: web.BaseRequest, record: AccessRecord) -> web.StreamResponse:
        """The whole flow for one proxied request."""
        # The Host header as sent: aiohttp's request.host may fall back to a blocking lookup.
        path = routable_path(request_target(request))
        route = self.route_for(request.headers.get("Host"), path, record)
        self.forwarder.admit(request, route)  # 413 before validating or exchanging anything
        entry = await self.authorize(route, request.headers, record)
        result = await self._forward(request, route, entry, record)
        if result.token_rejected:
            await self._token_refused(route, entry)
        return result.response

    def route_for(self, host: str | None, path: str, record: AccessRecord) -> Route:
        route = self.router.match(host, path)
        if route is None:
            raise NoRoute("no_route", f"no route for {path!r}")
        record.route, record.realm = route.label, route.realm or DEFAULT_REALM
        return route

    async def authorize(
        self, route: Route, headers: Mapping[str, str], record: AccessRecord
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
            record.cache, record.assertion_id = "hit", entry.assertion_id
            record.issuer = entry.issuer or None
            return entry
        record.cache = "miss"
        assertion = self._validate(route, raw, digest)
        record.assertion_id, record.issuer = assertion.id, assertion.issuer
        server = route.authorization_server
        return await self.cache.obtain(
            key,
            assertion,
            lambda verified: self.token_client.exchange(
                server, verified.raw, saml_version=verified.saml_version
            ),
        )

    # --- its steps -----------------------------------------------------------------------

    def cache_key(self, route: Route) -> str:
        """Whose tokens a route's requests share (see ``_cache_key``)."""
        return self.cache_keys[(route.identity_provider, route.authorization_server)]

    def ttl(self, entry: CachedToken) -> float:
        """Seconds the cache will still serve ``entry``."""
        return self.cache.ttl(entry)

    def _validate(self, route: Route, raw: bytes, digest: bytes) -> Assertion:
        policy = self.policies[(route.identity_provider, route.authorization_server)]
        with self.tracer.span("validate assertion") as span:
            assertion = validate_assertion(raw, policy, datetime.now(UTC), digest=digest)
            span.set_attribute("gateway.assertion_id", assertion.id)
        return assertion

    async def _forward(
        self, request: web.BaseRequest, route: Route, entry: CachedToken, record: AccessRecord
    ) -> ForwardResult:
        tracer = self.tracer
        with tracer.span("upstream", {"http.route": route.label}, client=True) as span:
            result = await self.forwarder.forward(
                request,
                route,
                entry.token.access_token,
                self.strip,
                {"X-Request-ID": record.request_id},
                trace_headers=tracer.headers(),
            )
            span.set_attribute("http.response.status_code", result.upstream_status)
        record.upstream_seconds = result.upstream_seconds
        self.metrics.observe_upstream(route.label, result.upstream_seconds)
        return result

    async def _token_refused(self, route: Route, entry: CachedToken) -> None:
        # The upstream no longer accepts this token: the next request exchanges afresh, but
        # only once per interval, or a client could drive the exchange rate (by ID, so byte
        # variants of the assertion count as one).
        refused = (self.cache_key(route), entry.assertion_id)
        if refused not in self._refused:
            self._refused[refused] = True
            await self.cache.purge(entry)


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
        (sorted(policy.saml_versions), policy.allow_cbc_encryption),
    )
    fingerprint.update(repr(trust).encode())
    fingerprint.update(server.model_dump_json().encode())
    return f"{names[0]}\x1f{names[1]}\x1f{fingerprint.hexdigest()[:16]}"
