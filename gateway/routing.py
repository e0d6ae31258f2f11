r"""Route selection: the longest matching path prefix wins; a route with a host beats one
without. Prefixes match on segment boundaries (``/api`` matches ``/api`` and ``/api/x``,
never ``/apix``) unless they end with ``/``.

One route decision, made on the path the most liberal upstream would serve. Servlet
containers and many frameworks (Tomcat, Jetty, Spring) drop ``;parameters`` from every
segment, merge empty segments, decode ``%2F`` and resolve dot segments after all of that;
so routes match the *canonical* path: percent-decoded once, parameters removed. Whatever
could still be read two ways is refused (400) rather than guessed at:

- dot segments (``/public/../admin``, ``..;``, ``%2E%2E`` — an encoded ``.`` is refused in
  any case), empty segments (``//`` anywhere, also ``/;x/`` or ``%2F%2F``), backslashes
  (raw or ``%5C``), NUL and other control characters (raw or encoded);
- an encoded ``;``, ``?`` or ``#`` (decoded before or after the split, depending on the
  stack), a path that still holds a percent-escape once decoded (double encoding), IIS's
  ``%uXXXX`` and bytes that are not UTF-8 (overlong forms of ``.`` and ``/``);
- ``;parameters`` and encoded slashes (``%2F``), unless the matched route opts in with
  ``allow_path_parameters`` / ``allow_encoded_slashes``: a strict upstream reads those as
  part of a segment name, a liberal one does not.

Host names are compared normalized: lower case, without the port and one trailing dot
(``API.test.:443`` is ``api.test``, as nginx and DNS read it); a Host that is not a plain
name or address is refused. The path itself is still forwarded byte-exact.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Final, Generic, Protocol, TypeVar
from urllib.parse import unquote

from gateway.errors import BadRequest

# C0 controls, DEL, C1 controls and the Unicode line and paragraph separators.
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPE: Final = re.compile(r"%[0-9A-Fa-f]{2}")
_IIS_ESCAPE: Final = re.compile(r"%[uU][0-9A-Fa-f]{4}")
# Escapes of what changes how a path splits when a stack decodes it before (or after) it
# parses the path: '.', '\', ';', '?', '#' and ASCII controls; never accepted. An encoded
# '/' is the one a route may allow. (Non-ASCII controls are caught once decoded.)
_REFUSED_ESCAPE: Final = re.compile(r"%(?:2[eE]|5[cC]|3[bBfF]|23|[01][0-9A-Fa-f]|7[fF])")
_ENCODED_SLASH: Final = re.compile(r"%2[fF]")
_HOST_NAME: Final = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
_HOST_IPV6: Final = re.compile(r"\[[0-9a-f:.]+\]")


class RouteRule(Protocol):
    """What the router reads of a route (``config.Route`` is one): routing needs no config."""

    @property
    def host(self) -> str | None: ...
    @property
    def path_prefix(self) -> str: ...
    @property
    def label(self) -> str: ...
    @property
    def allow_path_parameters(self) -> bool: ...
    @property
    def allow_encoded_slashes(self) -> bool: ...


_Route = TypeVar("_Route", bound=RouteRule)


class RoutablePath(str):
    """The canonical path routes match (decoded, ``;parameters`` removed), remembering
    whether the request spelled it with parameters or encoded slashes: only a route that
    opts in accepts those (``Router.match`` checks)."""

    parameters: bool
    encoded_slash: bool

    def __new__(
        cls, path: str, *, parameters: bool = False, encoded_slash: bool = False
    ) -> RoutablePath:
        self = super().__new__(cls, path)
        self.parameters = parameters
        self.encoded_slash = encoded_slash
        return self


def routable_path(raw_path: str) -> RoutablePath:
    """The canonical path of a request target (path and query, still encoded) to route on;
    ``BadRequest`` when the upstream could read it as another path."""
    raw = raw_path.partition("?")[0].partition("#")[0]
    if not raw.startswith("/"):
        raise BadRequest("path", "the path must start with '/'")
    if "\\" in raw:
        raise BadRequest("path", "a backslash in the path")  # Windows stacks read it as '/'
    encoded_slash = False
    if "%" in raw:
        encoded_slash = _check_escapes(raw)
        try:
            path = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            raise BadRequest("path", "the decoded path is not UTF-8") from None
        if _ESCAPE.search(path) or _IIS_ESCAPE.search(path):
            raise BadRequest("path", "the path is percent-encoded twice")
    else:
        path = raw
    if _CONTROL.search(path):
        raise BadRequest("path", "a control character in the path")
    parameters = ";" in path  # a raw ';' only: an encoded one was refused above
    # Dot and empty segments both start with "/." or "//" (once parameters are gone).
    if parameters or "/." in path or "//" in path:
        segments = path.split("/")
        if parameters:
            segments = [segment.partition(";")[0] for segment in segments]
        last = len(segments) - 1
        for index, segment in enumerate(segments):
            if segment in (".", ".."):
                raise BadRequest("path", "dot segments in the path")
            if not segment and 0 < index < last:
                raise BadRequest("path", "an empty segment ('//') in the path")
        if parameters:
            path = "/".join(segments)
    return RoutablePath(path, parameters=parameters, encoded_slash=encoded_slash)


def _check_escapes(raw: str) -> bool:
    """Refuse percent-escapes that split a path differently once decoded; say whether
    there is an encoded slash (which a route may accept)."""
    refused = _REFUSED_ESCAPE.search(raw)
    if refused is not None:
        char = chr(int(refused.group()[1:], 16))
        what = repr(char) if char.isprintable() else "control character"
        raise BadRequest("path", f"an encoded {what} in the path")
    if _IIS_ESCAPE.search(raw):
        raise BadRequest("path", "a %u escape in the path")
    return _ENCODED_SLASH.search(raw) is not None


@functools.lru_cache(maxsize=1024)  # a deployment sees few Host values; parsing is not free
def normalize_host(host: str | None) -> str:
    """``Host`` as names are compared: lower case, no port, one trailing dot dropped
    (``[::1]:8080`` → ``[::1]``, ``API.test.`` → ``api.test``); ``""`` when absent.
    ``BadRequest`` for anything else than a name or an address (``a..b``, ``a.test..``,
    ``user@a.test``): another reader could take it for a different host."""
    host = (host or "").strip()
    if not host:
        return ""
    if not host.isascii():  # str.lower() maps some non-ASCII letters to ASCII ones (K, ſ)
        raise BadRequest("host", "the Host header is not ASCII")
    host = host.lower()
    if host.startswith("["):
        end = host.find("]") + 1
        name, rest = (host[:end], host[end:]) if end else (host, "")
        port = rest.removeprefix(":")
        valid = _HOST_IPV6.fullmatch(name) is not None and (not rest or rest.startswith(":"))
    else:
        name, _, port = host.partition(":")
        name = name.removesuffix(".")
        valid = _HOST_NAME.fullmatch(name) is not None
    if not valid or (port and not port.isdigit()):
        raise BadRequest("host", "the Host header is not a host name or address")
    return name


def under_prefix(path: str, prefix: str) -> bool:
    """Whether ``path`` lies under ``prefix`` on segment boundaries: ``/api`` covers ``/api``
    and ``/api/x``, never ``/apix``; a prefix that ends with ``/`` (or is empty) covers every
    path that starts with it. ``path`` is compared as given: routes pass the canonical path
    (``routable_path``), so an encoded ``/`` counts as a boundary there."""
    if not prefix or prefix.endswith("/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + "/")


def _check_spelling(route: RouteRule, path: str) -> None:
    """The matched route's say on the spellings a route must opt in to."""
    if not isinstance(path, RoutablePath):
        return
    if path.parameters and not route.allow_path_parameters:
        raise BadRequest("path", f"';' parameters in the path (route {route.label!r})")
    if path.encoded_slash and not route.allow_encoded_slashes:
        raise BadRequest("path", f"an encoded '/' in the path (route {route.label!r})")


class Router(Generic[_Route]):
    def __init__(self, routes: Sequence[_Route]) -> None:
        # Most specific first: host-bound before host-less, then longer prefixes first.
        ordered = sorted(routes, key=lambda r: (r.host is None, -len(r.path_prefix)))
        self._routes = [(None if r.host is None else _configured_host(r.host), r) for r in ordered]

    def match(self, host: str | None, path: str) -> _Route | None:
        """The route for ``host`` and ``path`` (from ``routable_path``); ``BadRequest`` when
        the Host is malformed or the route does not accept how the path is spelled."""
        hostname = normalize_host(host)
        for route_host, route in self._routes:
            if route_host is not None and route_host != hostname:
                continue
            if under_prefix(path, route.path_prefix):
                _check_spelling(route, path)
                return route
        return None


def _configured_host(host: str) -> str:
    """A route's ``host`` in the form requests are compared in (no port, no final dot)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.partition(":")[0].removesuffix(".")
