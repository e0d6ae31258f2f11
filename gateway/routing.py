"""Route selection: the longest matching path prefix wins; a route with a host beats one
without. Prefixes match on segment boundaries (``/api`` matches ``/api`` and ``/api/x``,
never ``/apix``) unless they end with ``/``."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.config import Route


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
