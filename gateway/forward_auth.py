"""Forward-auth mode: nginx ``auth_request``, Traefik ``forwardAuth`` and Envoy ``ext_authz``
(HTTP mode) ask the gateway about a request they will carry themselves.

The gateway reads the original request from the headers those proxies send, picks the
route by the original URI, runs the same pipeline as the proxy (cache fast path,
validation, single-flight exchange) and answers:

- 200, with the token in ``forward_auth.token_header`` (``Authorization: Bearer …``) and
  ``Cache-Control: max-age=<seconds the token will still be served>`` (``no-store`` under
  one second, never ``max-age=0``), so a proxy that caches the answer never holds a token
  longer than the gateway would;
- otherwise the proxy mode's JSON error and status (401 refused assertion, 404 no route,
  502/503/504 authorization-server trouble).

Where the original URI comes from, in order: ``X-Original-URI`` (nginx), ``X-Forwarded-Uri``
(Traefik), then the request path below the auth path (Envoy appends the original path to
its ``path_prefix``). It is read as a path (never as a URL with an authority) and checked
like a proxied request's path (``gateway.routing.routable_path``): the proxy in front may
resolve ``..`` or ``%2F`` to another location than the route the gateway would pick. The
original host: ``X-Forwarded-Host``, else ``Host``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.routing import routable_path


@dataclass(frozen=True, slots=True)
class OriginalRequest:
    host: str | None
    path: str  # percent-decoded, as routes match it


def original_request(headers: Mapping[str, str], raw_path: str, auth_path: str) -> OriginalRequest:
    """``raw_path`` is the auth request's own target, still encoded (Envoy's carries the
    original path)."""
    uri = headers.get("X-Original-URI") or headers.get("X-Forwarded-Uri")
    prefix = auth_path.rstrip("/")
    if uri:
        original = uri
    elif raw_path.startswith(prefix + "/"):
        original = raw_path[len(prefix) :]
    else:
        original = "/"
    host = headers.get("X-Forwarded-Host") or headers.get("Host")
    return OriginalRequest(host, routable_path(original))


def grant_headers(header: str, token: str, ttl: float) -> dict[str, str]:
    """The 200 answer's headers: the token, and how long a proxy may cache the answer."""
    value = token if header.lower() != "authorization" else f"Bearer {token}"
    seconds = int(ttl)
    # Under a second left: nothing a proxy may keep (a 200 with max-age=0 invites a cache to
    # store a token it must revalidate at once, and says "expired" about a usable answer).
    return {header: value, "Cache-Control": f"max-age={seconds}" if seconds > 0 else "no-store"}
