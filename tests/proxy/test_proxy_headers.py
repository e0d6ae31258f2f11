"""The pure header and URL rules, without an event loop."""

from __future__ import annotations

import ipaddress

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.errors import BadRequest
from gateway.proxy.headers import (
    HOP_BY_HOP,
    PROXY_ONLY,
    downstream_response_headers,
    peer_is_trusted,
    token_rejected,
    upstream_request_headers,
    upstream_url,
)

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


def inbound(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def outgoing(
    headers: CIMultiDictProxy[str],
    *,
    peer: str = "203.0.113.7",
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (),
    preserve_host: bool = False,
    request_id: str | None = None,
) -> CIMultiDict[str]:
    return upstream_request_headers(
        headers,
        token="tok-123",
        assertion_headers=frozenset({"x-saml-assertion"}),
        peer=peer,
        scheme="https",
        host="gw.example",
        trusted_proxies=trusted,
        preserve_host=preserve_host,
        upstream_host="api.internal:8443",
        request_id=request_id,
    )


def test_hop_by_hop_and_connection_named_headers_are_dropped() -> None:
    out = outgoing(
        inbound(
            ("Connection", "keep-alive, X-Secret-Hop"),
            ("Keep-Alive", "timeout=5"),
            ("X-Secret-Hop", "1"),
            ("TE", "trailers"),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "h2c"),
            ("Proxy-Authorization", "Basic Zm9v"),
            ("Expect", "100-continue"),
            ("Accept", "text/plain"),
        )
    )
    for name in (*HOP_BY_HOP, "x-secret-hop", "expect"):
        assert name not in out
    assert out["Accept"] == "text/plain"


def test_assertion_and_client_authorization_never_forwarded_in_any_spelling() -> None:
    out = outgoing(
        inbound(
            ("X-SAML-Assertion", "PHNhbWw+"),
            ("x_saml_assertion", "PHNhbWw+"),
            ("Authorization", "SAML PHNhbWw+"),
            ("AUTHORIZATION", "Bearer stolen"),
            ("Authorization_", "x"),  # not a variant: kept
            ("authorization".replace("-", "_"), "Bearer stolen-too"),
            ("X-Other", "kept"),
        )
    )
    assert out.getall("Authorization") == ["Bearer tok-123"]
    assert not any(k.lower().replace("_", "-") == "x-saml-assertion" for k in out)
    assert out["X-Other"] == "kept"
    assert out["Authorization_"] == "x"


def test_untrusted_peer_forwarded_headers_are_replaced() -> None:
    out = outgoing(
        inbound(
            ("X-Forwarded-For", "6.6.6.6"),
            ("x-forwarded-proto", "http"),
            ("X-Forwarded-Host", "evil.example"),
            ("X_Forwarded_For", "6.6.6.6"),
            ("X-Forwarded-User", "admin"),
            ("Forwarded", "for=6.6.6.6"),
            ("Host", "gw.example"),
        )
    )
    assert out.getall("X-Forwarded-For") == ["203.0.113.7"]
    assert out.getall("X-Forwarded-Proto") == ["https"]
    assert out.getall("X-Forwarded-Host") == ["gw.example"]
    assert "X-Forwarded-User" not in out
    assert "Forwarded" not in out
    assert not any("_" in k for k in out)


def test_trusted_proxy_chain_is_appended_and_its_proto_host_kept() -> None:
    out = outgoing(
        inbound(
            ("X-Forwarded-For", "198.51.100.1"),
            ("X-Forwarded-For", "10.0.0.2"),
            ("X-Forwarded-Proto", "http"),
            ("X-Forwarded-Host", "public.example"),
            ("X_Forwarded_For", "6.6.6.6"),  # never a proxy's doing, even from a trusted peer
            ("Forwarded", "for=198.51.100.1"),
        ),
        peer="127.0.0.1",
        trusted=LOOPBACK,
    )
    assert out.getall("X-Forwarded-For") == ["198.51.100.1, 10.0.0.2, 127.0.0.1"]
    assert out["X-Forwarded-Proto"] == "http"
    assert out["X-Forwarded-Host"] == "public.example"
    assert out["Forwarded"] == "for=198.51.100.1"
    assert "X_Forwarded_For" not in out


CLIENT_CLAIMS = (
    ("X-Real-IP", "10.0.0.1"),
    ("True-Client-IP", "10.0.0.1"),
    ("X-Client-IP", "10.0.0.1"),
    ("X-Cluster-Client-IP", "10.0.0.1"),
    ("CF-Connecting-IP", "10.0.0.1"),
    ("Fastly-Client-IP", "10.0.0.1"),
    ("X-Original-URL", "/admin"),
    ("X-Rewrite-URL", "/admin"),
    ("X-Original-URI", "/admin"),
    ("x_real_ip", "10.0.0.1"),  # read as X-Real-IP by CGI/WSGI/PHP
    ("X-ORIGINAL-URL", "/admin"),
)


def test_untrusted_peer_cannot_claim_an_address_or_a_url() -> None:
    out = outgoing(inbound(*CLIENT_CLAIMS, ("X-Other", "kept")))
    assert not [k for k in out if k.lower().replace("_", "-") in PROXY_ONLY]
    assert out["X-Other"] == "kept"


def test_trusted_proxy_may_set_address_and_url_headers_in_their_exact_spelling() -> None:
    out = outgoing(inbound(*CLIENT_CLAIMS), peer="127.0.0.1", trusted=LOOPBACK)
    assert out.getall("X-Real-IP") == ["10.0.0.1"]
    assert out.getall("X-Original-URL") == ["/admin", "/admin"]
    assert "x_real_ip" not in out


def test_the_gateways_request_id_replaces_the_clients() -> None:
    headers = inbound(("X-Request-ID", "client-1"), ("x_request_id", "client-2"))
    assert outgoing(headers, request_id="gw-1").getall("X-Request-ID") == ["gw-1"]
    assert "x_request_id" not in outgoing(headers, request_id="gw-1")
    assert outgoing(headers).getall("X-Request-ID") == ["client-1"]  # none given: as sent


def test_host_is_rewritten_unless_preserved() -> None:
    headers = inbound(("Host", "gw.example"))
    assert outgoing(headers).getall("Host") == ["api.internal:8443"]
    assert outgoing(headers, preserve_host=True).getall("Host") == ["gw.example"]


@pytest.mark.parametrize(
    ("peer", "trusted"),
    [
        ("127.0.0.1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("", False),
        ("not-an-ip", False),
    ],
)
def test_peer_trust(peer: str, trusted: bool) -> None:
    assert peer_is_trusted(peer, LOOPBACK) is trusted


def test_response_headers_drop_hop_by_hop_keep_the_rest() -> None:
    upstream = inbound(
        ("Connection", "close, X-Upstream-Hop"),
        ("X-Upstream-Hop", "1"),
        ("Transfer-Encoding", "chunked"),
        ("Keep-Alive", "timeout=5"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Content-Encoding", "gzip"),
    )
    out = downstream_response_headers(upstream)
    assert out.getall("Set-Cookie") == ["a=1", "b=2"]
    assert out["Content-Encoding"] == "gzip"
    for name in ("Connection", "X-Upstream-Hop", "Transfer-Encoding", "Keep-Alive"):
        assert name not in out


@pytest.mark.parametrize(
    ("base", "raw", "prefix", "strip", "expected"),
    [
        ("http://u:8080", "/a%2Fb?x=%20", "/", False, "http://u:8080/a%2Fb?x=%20"),
        ("http://u:8080/base/", "/a%2Fb?x=%20", "/", False, "http://u:8080/base/a%2Fb?x=%20"),
        ("http://u", "/api/users?q=1", "/api", True, "http://u/users?q=1"),
        ("http://u", "/api/users", "/api/", True, "http://u/users"),
        ("http://u", "/api", "/api", True, "http://u/"),
        ("http://u", "/apix/users", "/api", True, "http://u/apix/users"),
        ("http://u", "/api/users", "/api", False, "http://u/api/users"),
        ("http://u/v2", "/api/%7Euser/", "/api", True, "http://u/v2/%7Euser/"),
        ("https://[::1]:9443", "/x?a=b&a=c", "/", False, "https://[::1]:9443/x?a=b&a=c"),
        ("http://u", "//evil.example/x", "/", False, "http://u//evil.example/x"),
    ],
)
def test_upstream_url_is_byte_exact(
    base: str, raw: str, prefix: str, strip: bool, expected: str
) -> None:
    url = upstream_url(base, raw, prefix, strip)
    assert str(url) == expected
    assert url.host in ("u", "::1")


@pytest.mark.parametrize(
    ("status", "challenge", "rejected"),
    [
        (401, 'Bearer error="invalid_token"', True),
        (401, 'Bearer realm="api", error="invalid_token", error_description="expired"', True),
        (401, "bearer error=invalid_token", True),
        (401, 'Basic realm="x", Bearer error="invalid_token"', True),
        (401, 'Bearer realm="x", Basic error="invalid_token"', False),
        (401, 'Bearer error="insufficient_scope"', False),
        (401, 'Bearer realm="error=\\"invalid_token\\""', False),
        (401, 'Basic realm="api"', False),
        (401, None, False),
        (403, 'Bearer error="invalid_token"', False),
        (200, 'Bearer error="invalid_token"', False),
    ],
)
def test_token_rejected(status: int, challenge: str | None, rejected: bool) -> None:
    assert token_rejected(status, challenge) is rejected


@pytest.mark.parametrize(
    ("raw", "prefix", "expected"),
    [
        ("/%61pi/users?x=1", "/api", "http://u/users?x=1"),  # the prefix sent percent-encoded
        ("/caf%C3%A9/x", "/café", "http://u/x"),
        ("/%61pi", "/api", "http://u/"),
    ],
)
def test_strip_prefix_finds_an_encoded_prefix(raw: str, prefix: str, expected: str) -> None:
    assert str(upstream_url("http://u", raw, prefix, True)) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/api;v=1/users", "http://u/users"),  # a route that allows ;parameters
        ("/api;v=1", "http://u/"),
        ("/api/users;v=1", "http://u/users;v=1"),  # past the prefix: kept as sent
    ],
)
def test_strip_prefix_finds_a_prefix_with_parameters(raw: str, expected: str) -> None:
    assert str(upstream_url("http://u", raw, "/api", True)) == expected


def test_strip_prefix_refuses_a_prefix_it_cannot_tell_apart() -> None:
    with pytest.raises(BadRequest):  # "/a%2Fb" decodes to the prefix's two segments
        upstream_url("http://u", "/a%2Fb/c", "/a/b", True)
