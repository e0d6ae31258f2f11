"""The pure RFC 7522 codec: request building, client authentication, response parsing."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from urllib.parse import parse_qsl

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from gateway.config import GRANT_TYPE_SAML2_BEARER
from gateway.errors import ConfigError, InvalidAssertion, Unavailable, UpstreamError
from gateway.oauth.client_auth import basic_authorization, load_signing_key
from gateway.oauth.grant import (
    SERVER_ERROR,
    build_token_request,
    parse_token_response,
    server_problems,
)

from .helpers import assertion, pem_private, profile

URL = "https://as.test/oauth2/token"
RAW = assertion("_grant1").raw


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- request building --------------------------------------------------------------------


def test_client_secret_basic_form_encodes_before_base64() -> None:
    server = profile(URL, client_id="app:1", client_secret="p@ss w%rd+:")
    request = build_token_request(server, RAW, now=0, jti="j")
    header = request.headers["Authorization"]
    assert header.startswith("Basic ")
    assert base64.b64decode(header[6:]) == b"app%3A1:p%40ss+w%25rd%2B%3A"
    assert header == basic_authorization("app:1", "p@ss w%rd+:")
    # Sent one way only: nothing credential-like in the body.
    names = [name for name, _ in request.fields]
    assert "client_secret" not in names and "client_assertion" not in names


def test_grant_fields_and_default_base64url_without_padding() -> None:
    server = profile(URL, scope="openid  api.read", extra_params={"company_id": "ACME"})
    raw = RAW + b"x"  # a length that needs padding in base64
    request = build_token_request(server, raw, now=0, jti="j")
    form = dict(parse_qsl(request.body.decode()))
    assert form["grant_type"] == GRANT_TYPE_SAML2_BEARER
    assert "=" not in form["assertion"] and "+" not in form["assertion"]
    assert _unb64url(form["assertion"]) == raw
    assert form["scope"] == "openid api.read"
    assert form["company_id"] == "ACME"
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert request.url == URL


def test_plain_base64_encoding_per_server() -> None:
    server = profile(URL, assertion_encoding="base64")
    raw = b"\xfb\xff" + RAW  # bytes whose base64 uses '+' or '/'
    request = build_token_request(server, raw, now=0, jti="j")
    encoded = request.value("assertion")
    assert encoded == base64.b64encode(raw).decode()
    assert base64.b64decode(encoded, validate=True) == raw


def test_client_secret_post_and_none() -> None:
    post = build_token_request(profile(URL, client_auth="client_secret_post"), RAW, now=0, jti="j")
    assert "Authorization" not in post.headers
    assert (post.value("client_id"), post.value("client_secret")) == ("gateway", "s3cret")

    public = profile(URL, client_auth="none", client_secret=None, client_id="public-app")
    request = build_token_request(public, RAW, now=0, jti="j")
    assert "Authorization" not in request.headers
    assert request.value("client_id") == "public-app"
    assert request.value("client_secret") is None


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_private_key_jwt_is_a_verifiable_rfc7523_assertion(
    algorithm: str,
    key_files: dict[str, Path],
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    server = profile(
        URL,
        client_auth="private_key_jwt",
        client_secret=None,
        private_key_jwt={
            "key_file": str(key_files[algorithm]),
            "algorithm": algorithm,
            "key_id": "k1",
            "lifetime": 45,
        },
    )
    key = load_signing_key(key_files[algorithm].read_bytes(), algorithm)  # type: ignore[arg-type]
    key = type(key)(key.algorithm, key.key, "k1")
    now = 1_700_000_000.0
    request = build_token_request(server, RAW, now=now, jti="unique-1", signing_key=key)
    assert "Authorization" not in request.headers
    assert request.value("client_secret") is None
    assert request.value("client_assertion_type") == (
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    )
    jwt = request.value("client_assertion")
    assert jwt is not None
    head, body, signature = jwt.split(".")
    header = json.loads(_unb64url(head))
    claims = json.loads(_unb64url(body))
    assert header == {"alg": algorithm, "typ": "JWT", "kid": "k1"}
    assert claims["iss"] == claims["sub"] == "gateway"
    assert claims["aud"] == URL
    assert claims["jti"] == "unique-1"
    assert claims["exp"] == int(now) + 45 and claims["iat"] == int(now)
    signed, sig = f"{head}.{body}".encode(), _unb64url(signature)
    if algorithm == "RS256":
        rsa_key.public_key().verify(sig, signed, padding.PKCS1v15(), hashes.SHA256())
    else:
        assert len(sig) == 64
        der = encode_dss_signature(int.from_bytes(sig[:32]), int.from_bytes(sig[32:]))
        ec_key.public_key().verify(der, signed, ec.ECDSA(hashes.SHA256()))


def test_signing_key_must_fit_the_algorithm(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    with pytest.raises(ConfigError, match="ES256 needs an EC"):
        load_signing_key(pem_private(rsa_key), "ES256")
    with pytest.raises(ConfigError, match="RS256 needs an RSA"):
        load_signing_key(pem_private(ec_key), "RS256")
    with pytest.raises(ConfigError, match="not an unencrypted PEM") as raised:
        load_signing_key(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "RS256")
    assert "AAAA" not in str(raised.value)
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ConfigError, match="1024 bits"):
        load_signing_key(pem_private(small), "RS256")


def test_extra_params_cannot_smuggle_credentials() -> None:
    server = profile(URL, extra_params={"client_secret": "x", "company_id": "ACME"})
    problems = server_problems("sf", server)
    assert problems == [
        "authorization_servers.sf.extra_params.client_secret: 'client_secret' is set by the "
        "gateway and cannot be overridden"
    ]
    # Even unchecked, the builder drops reserved names rather than sending them twice.
    request = build_token_request(server, RAW, now=0, jti="j")
    assert request.value("client_secret") is None
    assert request.value("company_id") == "ACME"


def test_request_repr_hides_secrets_and_assertion() -> None:
    request = build_token_request(
        profile(URL, client_auth="client_secret_post"), RAW, now=0, jti="j"
    )
    text = repr(request)
    assert "s3cret" not in text and request.value("assertion") not in text  # type: ignore[operator]


# --- response parsing --------------------------------------------------------------------


def _parse(status: int, document: object, **kwargs: object) -> object:
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    return parse_token_response(profile(URL, default_expires_in=1234), status, body, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("expires_in", "expected"),
    [(3600, 3600.0), ("3600", 3600.0), (" 59.5 ", 59.5), (0, 0.0), (None, 1234.0)],
)
def test_expires_in_shapes(expires_in: object, expected: float) -> None:
    document: dict[str, object] = {"access_token": "tok", "token_type": "Bearer", "scope": "a b"}
    if expires_in is not None:
        document["expires_in"] = expires_in
    token = _parse(200, document)
    assert token.expires_in == expected  # type: ignore[attr-defined]
    assert token.scope == "a b"  # type: ignore[attr-defined]
    assert token.access_token == "tok"  # type: ignore[attr-defined]


@pytest.mark.parametrize("expires_in", ["soon", -5, True, [3600], "nan", "inf"])
def test_bad_expires_in_is_an_upstream_error(expires_in: object) -> None:
    with pytest.raises(UpstreamError, match="expires_in"):
        _parse(200, {"access_token": "t", "token_type": "Bearer", "expires_in": expires_in})


@pytest.mark.parametrize("token_type", ["bearer", "BEARER", "Bearer"])
def test_token_type_is_case_insensitive(token_type: str) -> None:
    assert _parse(200, {"access_token": "t", "token_type": token_type}).token_type == "Bearer"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "document",
    [
        {"access_token": "t", "token_type": "mac"},
        {"access_token": "t"},
        {"token_type": "Bearer"},
        {"access_token": "", "token_type": "Bearer"},
        {"access_token": 42, "token_type": "Bearer"},
        {"access_token": "t\r\nX-Evil: 1", "token_type": "Bearer"},
        ["access_token"],
        b"<html><body>Please sign in</body></html>",
        b"\x00garbage",
    ],
)
def test_anything_but_a_bearer_token_is_a_502(document: object) -> None:
    with pytest.raises(UpstreamError) as raised:
        _parse(200, document, content_type="text/html")
    assert raised.value.status == 502
    assert raised.value.reason == "as_bad_response"


def test_oversized_body_is_refused() -> None:
    server = profile(URL, max_response_bytes=100)
    body = json.dumps({"access_token": "x" * 200, "token_type": "Bearer"}).encode()
    with pytest.raises(UpstreamError) as raised:
        parse_token_response(server, 200, body)
    assert raised.value.reason == "as_response_too_large"


def test_invalid_grant_is_the_callers_401() -> None:
    with pytest.raises(InvalidAssertion) as raised:
        _parse(400, {"error": "invalid_grant", "error_description": "expired\r\nassertion"})
    assert raised.value.status == 401 and raised.value.reason == "invalid_grant"
    assert "\n" not in raised.value.detail


@pytest.mark.parametrize(
    "code", ["invalid_client", "unauthorized_client", "unsupported_grant_type", "invalid_scope"]
)
def test_client_errors_are_our_502(code: str) -> None:
    with pytest.raises(UpstreamError) as raised:
        _parse(400, {"error": code})
    assert raised.value.status == 502 and raised.value.reason == code


def test_401_without_body_means_invalid_client() -> None:
    with pytest.raises(UpstreamError) as raised:
        _parse(401, b"Unauthorized")
    assert raised.value.reason == "invalid_client"


def test_rate_limit_keeps_retry_after() -> None:
    with pytest.raises(Unavailable) as raised:
        _parse(429, b"", retry_after="12")
    assert raised.value.status == 503 and dict(raised.value.headers) == {"Retry-After": "12"}
    with pytest.raises(Unavailable) as raised:
        _parse(
            503, {"error": "temporarily_unavailable"}, retry_after="Wed, 21 Oct 2015 07:28:00 GMT"
        )
    assert raised.value.headers["Retry-After"] == "Wed, 21 Oct 2015 07:28:00 GMT"
    # A header we cannot vouch for is not passed on to the client.
    with pytest.raises(Unavailable) as raised:
        _parse(429, b"", retry_after="5\r\nSet-Cookie: x=1")
    assert dict(raised.value.headers) == {}


@pytest.mark.parametrize("body", [b"<html>502 Bad Gateway</html>", b'{"error":"server_error"}'])
def test_5xx_is_the_retryable_server_error(body: bytes) -> None:
    with pytest.raises(UpstreamError) as raised:
        _parse(502, body)
    assert raised.value.reason == SERVER_ERROR


def test_error_code_in_a_200_is_still_an_error() -> None:
    with pytest.raises(InvalidAssertion):
        _parse(200, {"error": "invalid_grant"})


def test_jwt_lifetime_is_short(key_files: dict[str, Path]) -> None:
    key = load_signing_key(key_files["ES256"].read_bytes(), "ES256")
    server = profile(
        URL,
        client_auth="private_key_jwt",
        client_secret=None,
        private_key_jwt={"key_file": str(key_files["ES256"]), "algorithm": "ES256"},
    )
    now = time.time()
    jwt = build_token_request(server, RAW, now=now, jti="j", signing_key=key).value(
        "client_assertion"
    )
    claims = json.loads(_unb64url(jwt.split(".")[1]))  # type: ignore[union-attr]
    assert 0 < claims["exp"] - now <= 60


@pytest.mark.parametrize("value", [1e306, "1e306", 10**30, "99999999999999999999999999999999"])
def test_huge_expires_in_is_capped_at_a_day(value: object) -> None:
    token = _parse(200, {"access_token": "t", "token_type": "Bearer", "expires_in": value})
    assert token.expires_in == 86_400  # type: ignore[attr-defined]


def test_expires_in_beyond_any_float_is_a_bad_response() -> None:
    with pytest.raises(UpstreamError, match="expires_in"):
        _parse(200, {"access_token": "t", "token_type": "Bearer", "expires_in": 10**400})
