"""Header and URL rules of the reverse proxy: what crosses the gateway, and in which form.

Rules this module owns (pure: no I/O, no aiohttp, testable without an event loop):
- Hop-by-hop headers (RFC 9110 §7.6.1), and every header named in ``Connection``, describe
  one connection and are removed in both directions.
- Identity headers are the gateway's to set. ``Authorization`` and the headers that carried
  the assertion never reach the upstream. Headers that say who the client is or which URL
  it asked for (``X-Forwarded-*``, ``Forwarded``, ``X-Real-IP``, ``True-Client-IP``,
  ``X-Original-URL``, ``X-Rewrite-URL``, … see ``PROXY_ONLY``) are a proxy's to set: from a
  peer that is not a trusted proxy they are dropped (``X-Forwarded-*`` replaced by ours).
  ``X-Request-ID`` is always the gateway's, the one it logs and answers with. A name is
  compared case-folded and with ``_`` read as ``-``, because many upstream stacks (CGI,
  WSGI, PHP, nginx with ``underscores_in_headers``) merge ``X_Forwarded_For`` into
  ``X-Forwarded-For``.
- The request target is passed through byte-exact: no decoding, no re-encoding, no
  normalisation, so ``%2F`` stays an encoded slash.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping, Sequence
from typing import Final
from urllib.parse import unquote

from multidict import CIMultiDict
from yarl import URL

from gateway.errors import BadRequest
from gateway.routing import under_prefix

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

HOP_BY_HOP: Final[frozenset[str]] = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",  # non-standard, still sent by some clients
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# Never sent upstream, by their exact (lower-case) name: the hop-by-hop headers; ``Expect``,
# because the gateway answers ``100-continue`` itself before the body is read (passing it on
# would make the upstream wait for a continue the client already got); ``Host``, set anew.
_NOT_FORWARDED: Final[frozenset[str]] = HOP_BY_HOP | {"expect", "host"}

# Set by proxies and CDNs, read by upstreams as the client's address or as the URL to serve
# (IIS/Symfony/Laravel read X-Original-URL and X-Rewrite-URL instead of the request line):
# a client must never choose them. X-Forwarded-* and Forwarded are matched as a family.
PROXY_ONLY: Final[frozenset[str]] = frozenset(
    {
        "x-real-ip",
        "true-client-ip",
        "x-client-ip",
        "x-cluster-client-ip",
        "cf-connecting-ip",
        "fastly-client-ip",
        "client-ip",
        "x-originating-ip",
        "x-remote-ip",
        "x-remote-addr",
        "x-original-url",
        "x-rewrite-url",
        "x-original-uri",
        "x-original-host",
        "x-host",
    }
)

_FORWARDED_FOR: Final = "X-Forwarded-For"
_FORWARDED_PROTO: Final = "X-Forwarded-Proto"
_FORWARDED_HOST: Final = "X-Forwarded-Host"


def _canonical(name: str) -> str:
    """The form an upstream stack may reduce a header name to: lower-case, '_' as '-'."""
    lower = name.lower()
    return lower.replace("_", "-") if "_" in lower else lower


@functools.lru_cache(maxsize=64)  # one set per configuration: built once, not per request
def credential_headers(assertion_headers: frozenset[str]) -> frozenset[str]:
    """The headers that never reach the upstream in any spelling (canonical names): those
    that may carry the assertion, and any ``Authorization`` (the gateway sets its own)."""
    return frozenset(_canonical(name) for name in assertion_headers) | {"authorization"}


def is_utf8(value: str) -> bool:
    """Whether a parsed header value can be written out as the bytes it came as: the HTTP
    parser keeps bytes that are not UTF-8 as surrogates, which writing would drop silently."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _connection_tokens(headers: Mapping[str, str]) -> frozenset[str]:
    """Header names listed in ``Connection`` (all occurrences), canonical form."""
    names: set[str] = set()
    for value in _getall(headers, "Connection"):
        names.update(_canonical(token.strip()) for token in value.split(",") if token.strip())
    return frozenset(names)


def _getall(headers: Mapping[str, str], name: str) -> list[str]:
    getall = getattr(headers, "getall", None)
    if getall is not None:
        values: list[str] = getall(name, [])
        return values
    return [value for key, value in headers.items() if key.lower() == name.lower()]


def _items(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    # A multidict's items() yields every occurrence, a plain dict's its single value.
    return list(headers.items())


def peer_is_trusted(peer: str, trusted_proxies: Sequence[IPNetwork]) -> bool:
    """Whether ``peer`` (an IP address as text) lies in one of the trusted networks."""
    if not trusted_proxies or not peer:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False  # not an IP (a unix socket peer): never trusted
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack listener reports IPv4 peers this way
    return any(address in network for network in trusted_proxies)


def upstream_request_headers(
    inbound: Mapping[str, str],
    *,
    token: str,
    assertion_headers: frozenset[str],
    peer: str,
    scheme: str,
    host: str,
    trusted_proxies: Sequence[IPNetwork],
    preserve_host: bool,
    upstream_host: str,
    request_id: str | None = None,
) -> CIMultiDict[str]:
    """The headers to send upstream for a client request with headers ``inbound``.

    ``assertion_headers`` names the headers that may carry the assertion; ``peer`` is the
    client's IP address, ``scheme`` and ``host`` what the client used to reach us;
    ``upstream_host`` is the ``host[:port]`` of the upstream, used for ``Host`` unless
    ``preserve_host``; ``request_id`` replaces any client ``X-Request-ID``.
    """
    trusted = peer_is_trusted(peer, trusted_proxies)
    connection_named = _connection_tokens(inbound)
    credentials = credential_headers(assertion_headers)

    out: CIMultiDict[str] = CIMultiDict()
    from_proxy: CIMultiDict[str] = CIMultiDict()
    for name, value in _items(inbound):
        if not is_utf8(value):
            # The upstream would see another value than any filter in front of us did.
            raise BadRequest("header_encoding", f"header {name!r} is not valid UTF-8")
        if name.lower() in _NOT_FORWARDED:
            continue
        canonical = _canonical(name)
        if canonical in connection_named:
            continue
        # The assertion and any client credential stop here, in every spelling.
        if canonical in credentials:
            continue
        if canonical == "forwarded" or canonical.startswith("x-forwarded-"):
            # Only a trusted proxy may speak for the client, and only in the exact
            # spelling: an underscore variant is never a proxy's doing.
            if trusted and "_" not in name:
                from_proxy.add(name, value)
            continue
        if canonical in PROXY_ONLY and not (trusted and "_" not in name):
            continue
        if request_id is not None and canonical == "x-request-id":
            continue
        out.add(name, value)

    out["Host"] = (host or upstream_host) if preserve_host else upstream_host
    out["Authorization"] = f"Bearer {token}"
    if request_id is not None:
        out["X-Request-ID"] = request_id

    _add_forwarded(out, from_proxy, peer=peer, scheme=scheme, host=host)
    return out


def _add_forwarded(
    out: CIMultiDict[str], from_proxy: CIMultiDict[str], *, peer: str, scheme: str, host: str
) -> None:
    """The forwarding headers: a trusted proxy's, with the peer appended to its chain."""
    prior_for = ", ".join(v.strip() for v in from_proxy.popall(_FORWARDED_FOR, []))
    out.extend(from_proxy)
    chain = [part for part in (prior_for, peer) if part]
    if chain:
        out[_FORWARDED_FOR] = ", ".join(chain)
    # A trusted proxy in front of us knows the client's original scheme and host better.
    if _FORWARDED_PROTO not in from_proxy:
        out[_FORWARDED_PROTO] = scheme
    if _FORWARDED_HOST not in from_proxy and host:
        out[_FORWARDED_HOST] = host


def downstream_response_headers(upstream: Mapping[str, str]) -> CIMultiDict[str]:
    """The upstream response's headers minus those that describe the upstream connection."""
    connection_named = _connection_tokens(upstream)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in _items(upstream):
        if name.lower() in HOP_BY_HOP:
            continue
        if connection_named and _canonical(name) in connection_named:
            continue
        out.add(name, value)
    return out


def upstream_url(upstream_base: str, raw_path: str, prefix: str, strip_prefix: bool) -> URL:
    """The upstream URL for a request target ``raw_path`` (path and query, still encoded).

    The upstream base's own path is prepended; with ``strip_prefix`` the route's ``prefix``
    is removed first (``/api`` + ``/api/users`` → ``/users``; ``/api`` → ``/``). The result
    is built with ``encoded=True`` so nothing is decoded or re-encoded on the way.
    """
    path, mark, query = raw_path.partition("?")
    path = path.split("#", 1)[0]  # a fragment is never part of a request target
    if not path.startswith("/"):
        path = "/" + path
    if strip_prefix and prefix not in ("", "/"):
        path = _strip_prefix(path, prefix)
    origin, base_path = _split_base(upstream_base)
    target = base_path + path
    if mark:
        target += "?" + query
    return URL(origin + target, encoded=True)


@functools.lru_cache(maxsize=256)
def _split_base(upstream_base: str) -> tuple[str, str]:
    """An upstream URL's origin and its path without the trailing slash (parsed once)."""
    base = URL(upstream_base)
    return str(base.origin()), base.raw_path.rstrip("/")


def _strip_prefix(path: str, prefix: str) -> str:
    """``path`` (still encoded) without the route's ``prefix`` (decoded, as routes match it).

    A client may percent-encode the prefix (``/%61pi/x`` for ``/api``): its raw form is found
    by decoding as many segments as the prefix has. Where that does not give the prefix (an
    encoded ``/`` inside it), the request is refused rather than forwarded unstripped.
    """
    bare = prefix.rstrip("/")
    if under_prefix(path, bare):
        rest = path[len(bare) :]
    elif not under_prefix(_route_form(path), bare):
        return path  # not under this prefix at all: nothing to strip
    else:
        head = "/".join(path.split("/")[: bare.count("/") + 1])
        if _route_form(head) != bare:
            raise BadRequest("path", "the route prefix cannot be found in the encoded path")
        rest = path[len(head) :]
    return rest if rest.startswith("/") else "/" + rest


def _route_form(path: str) -> str:
    """``path`` as routes match it: decoded, ``;parameters`` dropped from each segment (a
    route that allows parameters may see them inside its prefix: ``/api;v=1/x``)."""
    decoded = unquote(path)
    if ";" not in decoded:
        return decoded
    return "/".join(segment.partition(";")[0] for segment in decoded.split("/"))


_TCHARS: Final = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"  # RFC 9110 token
# One piece of a challenge list: a scheme (a bare token) or an auth-param (token=value).
_CHALLENGE_PART: Final = re.compile(
    rf"\s*(?P<name>{_TCHARS})\s*"
    r"(?:(?P<eq>=)\s*(?:\"(?P<quoted>(?:[^\"\\]|\\.)*)\"|(?P<bare>[^,\s]*)))?"
    r"\s*,?"
)


def _challenges(www_authenticate: str) -> list[tuple[str, dict[str, str]]]:
    """Parse ``WWW-Authenticate`` (RFC 9110 §11.6.1) into (scheme, params) pairs, leniently."""
    challenges: list[tuple[str, dict[str, str]]] = []
    pos = 0
    while pos < len(www_authenticate):
        match = _CHALLENGE_PART.match(www_authenticate, pos)
        if match is None or match.end() == pos:
            pos += 1  # skip a byte we cannot read rather than give up on the rest
            continue
        pos = match.end()
        name = match.group("name")
        if match.group("eq") is None:
            challenges.append((name.lower(), {}))
        elif challenges:
            quoted = match.group("quoted")
            value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else match["bare"]
            challenges[-1][1][name.lower()] = value
    return challenges


def token_rejected(status: int, www_authenticate: str | None) -> bool:
    """Whether the upstream refused our Bearer token as such (RFC 6750 §3.1 invalid_token).

    Only then is the cached token worth purging; any other 401 or 403 is the upstream's
    decision about the caller and is passed through unchanged.
    """
    if status != 401 or not www_authenticate:
        return False
    return any(
        scheme == "bearer" and params.get("error") == "invalid_token"
        for scheme, params in _challenges(www_authenticate)
    )
