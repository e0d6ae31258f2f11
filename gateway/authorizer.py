"""Forward-auth's flow, beside the proxy's (``gateway.pipeline``): the front asks, the
gateway answers with a token and carries nothing.

    original request (from the front's headers) → route match → the proxy's authorize
        (cache fast path, or validate → single-flight exchange) → 200 with the token

The rules of the answer (which headers to trust, ``Cache-Control``) are
``gateway.forward_auth``'s; the steps are the pipeline's public ones (``RequestPath``), so
this flow stands beside the pipeline, not on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from aiohttp import web

from gateway.access import AccessRecord
from gateway.cache import CachedToken
from gateway.config import ForwardAuth, Route
from gateway.forward_auth import grant_headers, original_request


class RequestPath(Protocol):
    """The steps forward-auth shares with the proxy (``gateway.pipeline.Pipeline``)."""

    def route_for(self, host: str | None, path: str, record: AccessRecord) -> Route: ...

    async def authorize(
        self, route: Route, headers: Mapping[str, str], record: AccessRecord
    ) -> CachedToken: ...

    def ttl(self, entry: CachedToken) -> float: ...


async def authorize(
    pipeline: RequestPath, request: web.BaseRequest, record: AccessRecord, settings: ForwardAuth
) -> web.Response:
    """The answer to one forward-auth request; refusals are raised as gateway errors."""
    original = original_request(request.method, request.headers, request.raw_path, settings)
    route = pipeline.route_for(original.host, original.path, record)
    entry = await pipeline.authorize(route, request.headers, record)
    headers = grant_headers(settings.token_header, entry.token.access_token, pipeline.ttl(entry))
    headers["X-Request-ID"] = record.request_id
    return web.Response(status=200, headers=headers)
