r"""Route selection: the longest matching path prefix wins; a route with a host beats one
without. Prefixes match on segment boundaries (``/api`` matches ``/api`` and ``/api/x``,
never ``/apix``) unless they end with ``/``.

Routes are chosen on the percent-decoded path, and a path the upstream (or the proxy in
front, in forward-auth mode) could resolve to another route is refused rather than guessed
at: dot segments (``/public/../admin``, ``%2E%2E``, with ``/``, ``%2F`` or ``\`` around
them), a leading ``//`` (read as an authority by URL parsers) and NUL. The path itself is
still forwarded byte-exact, encoded slashes included.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import unquote

from gateway.config import Route
from gateway.errors import BadRequest

_SEGMENT_SEPARATORS = re.compile(r"[/\\]")


def routable_path(raw_path: str) -> str:
    """The decoded path of a request target (path and query, still encoded) to route on;
    ``BadRequest`` when routing on it could disagree with what the upstream serves."""
    raw = raw_path.partition("?")[0].partition("#")[0]
    if not raw.startswith("/") or raw.startswith("//"):
        raise BadRequest("path", "the path must start with exactly one '/'")
    path = unquote(raw, errors="replace") if "%" in raw else raw
    if "\x00" in path:
        raise BadRequest("path", "NUL in the path")
    if "." in path and any(s in (".", "..") for s in _SEGMENT_SEPARATORS.split(path)):
        raise BadRequest("path", "dot segments in the path")
    return path


def _matches(prefix: str, path: str) -> bool:
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + "/")


def _hostname(host: str | None) -> str:
    """``Host`` without its port, lower-cased (``[::1]:8080`` → ``[::1]``)."""
    host = (host or "").lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.partition(":")[0]


class Router:
    def __init__(self, routes: Sequence[Route]) -> None:
        # Most specific first: host-bound before host-less, then longer prefixes first.
        self._routes = sorted(routes, key=lambda r: (r.host is None, -len(r.path_prefix)))

    def match(self, host: str | None, path: str) -> Route | None:
        hostname = _hostname(host)
        for route in self._routes:
            if route.host is not None and route.host.lower() != hostname:
                continue
            if _matches(route.path_prefix, path):
                return route
        return None
