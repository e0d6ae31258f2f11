"""What both protocols share about reaching a route's upstream.

Rules this module owns:
- A route's plan (the upstream's ``Host``, its TLS context, the timeouts) is worked out
  once, and each request goes out as an ``UpstreamCall`` that carries it. TLS contexts are
  built at startup, one per distinct setting, so bad files fail then.
- aiohttp's failures to reach an upstream become the gateway's own errors here
  (``upstream_failure``) and go no further.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.config import Route, UpstreamTls
from gateway.errors import ConfigError, GatewayError, UpstreamError, UpstreamTimeout
from gateway.proxy.tls import tls_context


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """What a route needs per request, worked out once."""

    route: Route
    upstream_host: str  # host[:port] for the Host header
    ssl: ssl.SSLContext | bool
    timeout: aiohttp.ClientTimeout
    handshake_timeout: float
    websocket_idle: float | None
    websocket_lifetime: float | None


@dataclass(frozen=True, slots=True)
class UpstreamCall:
    """One client request on its way to its route's upstream, over either protocol."""

    session: aiohttp.ClientSession
    request: web.BaseRequest
    plan: RoutePlan
    url: URL
    headers: CIMultiDict[str]  # what the upstream is sent
    answer_headers: Mapping[str, str]  # what the gateway adds to the client's answer


class RoutePlans:
    """The plans of the configured routes, and of any other route a caller brings."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self._tls: dict[UpstreamTls, ssl.SSLContext] = {}
        self._plans: dict[int, RoutePlan] = {}
        for i, route in enumerate(routes):
            self._plans[id(route)] = self._make(route, f"routes[{i}].tls")

    def plan(self, route: Route) -> RoutePlan:
        plan = self._plans.get(id(route))
        if plan is None or plan.route is not route:
            try:
                plan = self._make(route, "route.tls")
            except ConfigError as exc:
                raise UpstreamError("upstream_tls_config", str(exc)) from None
            self._plans[id(route)] = plan
        return plan

    def _make(self, route: Route, where: str) -> RoutePlan:
        base = URL(route.upstream)
        tls: ssl.SSLContext | bool = True  # plain http: unused
        if base.scheme == "https":
            context = self._tls.get(route.tls)
            if context is None:
                context = self._tls[route.tls] = tls_context(route.tls, where)
            tls = context
        limits = route.timeouts
        return RoutePlan(
            route=route,
            upstream_host=base.host_port_subcomponent or base.raw_host or "",
            ssl=tls,
            timeout=aiohttp.ClientTimeout(
                total=limits.total, sock_connect=limits.connect, sock_read=limits.read
            ),
            handshake_timeout=min(limits.total, limits.connect + limits.read),
            websocket_idle=limits.websocket_idle,
            websocket_lifetime=limits.websocket_lifetime,
        )


def upstream_failure(exc: BaseException) -> GatewayError:
    """An aiohttp/OS failure to reach an upstream, as the gateway's own error."""
    detail = type(exc).__name__
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("upstream_timeout", detail)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return UpstreamError("upstream_tls", f"{detail}: {exc}")
    if isinstance(exc, aiohttp.ClientResponseError):
        # the message may quote whatever the upstream sent: keep logs short
        return UpstreamError("upstream_invalid_response", f"{detail}: {exc.message[:120]!r}")
    return UpstreamError("upstream_unreachable", f"{detail}: {str(exc)[:200]}")
