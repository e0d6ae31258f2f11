"""Forward-auth mode: nginx ``auth_request``, Traefik ``forwardAuth``, Caddy ``forward_auth``
and Envoy ``ext_authz`` (HTTP mode) ask the gateway about a request they will carry
themselves.

The gateway reads the original request from the headers the configured front sets, picks
the route by the original URI, runs the same pipeline as the proxy (cache fast path,
validation, single-flight exchange) and answers:

- 200, with the token in ``forward_auth.token_header`` (``Authorization: Bearer …``) and
  ``Cache-Control: max-age=<seconds the token will still be served>`` (``no-store`` under
  one second, never ``max-age=0``), so a proxy that caches the answer never holds a token
  longer than the gateway would;
- otherwise the proxy mode's JSON error and status (401 refused assertion, 404 no route,
  502/503/504 authorization-server trouble).

The rule this module owns: only the front speaks. Every front passes (some or all of) the
client's headers on to the gateway, so a header is read only where the configured front is
known to set it, overwriting any client copy (``forward_auth.front`` presets, or
``forward_auth.original_request_headers``); every other header that could describe the
original request is ignored, whoever sent it. The presets, from each front's documentation:

- nginx ``auth_request`` sets nothing by itself: the shipped example sets ``X-Original-URI``,
  ``X-Original-Method`` and ``X-Forwarded-Host`` with ``proxy_set_header``, which replaces
  a client header of the same name;
- Traefik ``forwardAuth`` (``trustForwardHeader: false``) and Caddy ``forward_auth`` (no
  ``trusted_proxies``) set ``X-Forwarded-Method``, ``-Uri`` and ``-Host`` themselves;
- Envoy ``ext_authz`` sends the original method, ``Host`` and path (below its
  ``path_prefix``) as the auth request's own, and only the client headers it allows.

A header the front should have set that is missing or repeated is a 400 (a front that does
not set it is misconfigured, and two copies mean one of them came from the client). The
URI is read as a path (never as a URL with an authority) and checked like a proxied
request's path (``gateway.routing.routable_path``): the front may resolve ``..`` or ``%2F``
to another location than the route the gateway would pick.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from gateway.config import ForwardAuth, Front, OriginalRequestHeaders
from gateway.errors import BadRequest
from gateway.routing import routable_path

PRESETS: Mapping[Front, OriginalRequestHeaders] = {
    "nginx": OriginalRequestHeaders(
        method="X-Original-Method", uri="X-Original-URI", host="X-Forwarded-Host"
    ),
    "traefik": OriginalRequestHeaders(
        method="X-Forwarded-Method", uri="X-Forwarded-Uri", host="X-Forwarded-Host"
    ),
    "caddy": OriginalRequestHeaders(
        method="X-Forwarded-Method", uri="X-Forwarded-Uri", host="X-Forwarded-Host"
    ),
    "envoy": OriginalRequestHeaders(method=":method", uri=":path", host="Host"),
}


class Headers(Protocol):
    """A request's headers, repeated ones kept (aiohttp's ``CIMultiDictProxy``)."""

    def getall(self, key: str, default: list[str], /) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class OriginalRequest:
    method: str
    host: str
    path: str  # percent-decoded, as routes match it


def sources(settings: ForwardAuth) -> OriginalRequestHeaders:
    """The headers the configured front sets (the config requires one of the two)."""
    if settings.original_request_headers is not None:
        return settings.original_request_headers
    if settings.front is None:
        raise ValueError("forward_auth: neither 'front' nor 'original_request_headers' is set")
    return PRESETS[settings.front]


def _one(headers: Headers, name: str) -> str:
    values = headers.getall(name, [])
    if len(values) == 1 and values[0]:
        return values[0]
    found = {0: "none", 1: "an empty one"}.get(len(values), f"{len(values)} of them")
    raise BadRequest(
        "original_request", f"the front must send exactly one non-empty {name}, got {found}"
    )


def original_request(
    method: str, headers: Headers, raw_path: str, settings: ForwardAuth
) -> OriginalRequest:
    """The request the front asks about. ``method`` and ``raw_path`` are the auth request's
    own (``raw_path`` still encoded: Envoy's carries the original path)."""
    where = sources(settings)
    if where.uri == ":path":
        prefix = settings.path.rstrip("/")
        if not raw_path.startswith(prefix + "/"):
            raise BadRequest("original_request", f"no original path below {prefix}")
        uri = raw_path[len(prefix) :]
    else:
        uri = _one(headers, where.uri)
    original_method = method if where.method == ":method" else _one(headers, where.method)
    return OriginalRequest(original_method, _one(headers, where.host), routable_path(uri))


def grant_headers(header: str, token: str, ttl: float) -> dict[str, str]:
    """The 200 answer's headers: the token, and how long a proxy may cache the answer."""
    value = token if header.lower() != "authorization" else f"Bearer {token}"
    seconds = int(ttl)
    # Under a second left: nothing a proxy may keep (a 200 with max-age=0 invites a cache to
    # store a token it must revalidate at once, and says "expired" about a usable answer).
    return {header: value, "Cache-Control": f"max-age={seconds}" if seconds > 0 else "no-store"}
