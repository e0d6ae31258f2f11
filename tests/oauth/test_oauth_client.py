"""The token client against a fake RFC 7522 authorization server on 127.0.0.1."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.errors import (
    ConfigError,
    InvalidAssertion,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)

from .helpers import MakeClient, StartAs, assertion, pem_public, profile


def _observer() -> tuple[list[tuple[str, str]], Any]:
    seen: list[tuple[str, str]] = []

    def observe(name: str, outcome: str, seconds: float) -> None:
        assert seconds >= 0
        seen.append((name, outcome))

    return seen, observe


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post", "none"])
async def test_each_secret_method_gets_a_token(
    method: str, start_as: StartAs, make_client: MakeClient
) -> None:
    fake = await start_as(client_auth=method, client_secret=None if method == "none" else "s3cret")
    server = profile(
        fake.token_url,
        client_auth=method,
        client_secret=None if method == "none" else "s3cret",
        scope=["openid", "api"],
    )
    seen, observe = _observer()
    client = make_client({"as": server}, observer=observe)
    presented = assertion()
    token = await client.exchange("as", presented.raw)
    assert token.access_token == fake.issued[-1]
    assert token.scope == "openid api"
    assert token.expires_in == 3600
    assert fake.assertion_ids == [presented.id]
    assert fake.refusals == []
    assert seen == [("as", "ok")]


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
async def test_private_key_jwt_gets_a_token(
    algorithm: str,
    start_as: StartAs,
    make_client: MakeClient,
    key_files: dict[str, Path],
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    public = pem_public(rsa_key if algorithm == "RS256" else ec_key)
    fake = await start_as(client_auth="private_key_jwt", client_secret=None, public_key_pem=public)
    server = profile(
        fake.token_url,
        client_auth="private_key_jwt",
        client_secret=None,
        private_key_jwt={"key_file": str(key_files[algorithm]), "algorithm": algorithm},
    )
    client = make_client({"as": server})
    # Two exchanges: each carries a fresh jti, so the AS's replay check passes both.
    first = await client.exchange("as", assertion().raw)
    second = await client.exchange("as", assertion().raw)
    assert [first.access_token, second.access_token] == fake.issued
    assert fake.refusals == []


async def test_wrong_client_auth_is_a_loud_502(
    start_as: StartAs, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    fake = await start_as(client_auth="client_secret_post")
    seen, observe = _observer()
    client = make_client({"okta-prod": profile(fake.token_url)}, observer=observe)
    with caplog.at_level(logging.ERROR, logger="gateway.oauth"):
        with pytest.raises(UpstreamError) as raised:
            await client.exchange("okta-prod", assertion().raw)
    assert raised.value.status == 502 and raised.value.reason == "invalid_client"
    assert fake.calls == 1  # never retried
    errors = [r for r in caplog.records if r.name == "gateway.oauth" and r.levelno == logging.ERROR]
    assert len(errors) == 1 and "okta-prod" in errors[0].getMessage()
    assert "s3cret" not in caplog.text
    assert seen == [("okta-prod", "client_error")]


async def test_secret_with_reserved_characters_survives_basic(
    start_as: StartAs, make_client: MakeClient
) -> None:
    secret = "p@ss:w%rd +/="
    fake = await start_as(client_id="app:1", client_secret=secret)
    client = make_client({"as": profile(fake.token_url, client_id="app:1", client_secret=secret)})
    await client.exchange("as", assertion().raw)
    assert fake.refusals == [] and len(fake.issued) == 1


@pytest.mark.parametrize(
    ("mode", "error", "status", "outcome"),
    [
        ("invalid_grant", InvalidAssertion, 401, "invalid_grant"),
        ("invalid_client", UpstreamError, 502, "client_error"),
        ("unauthorized_client", UpstreamError, 502, "client_error"),
        ("unsupported_grant_type", UpstreamError, 502, "client_error"),
        ("invalid_scope", UpstreamError, 502, "client_error"),
        ("rate_limited", Unavailable, 503, "unavailable"),
        ("temporarily_unavailable", Unavailable, 503, "unavailable"),
        ("garbage", UpstreamError, 502, "error"),
        ("html", UpstreamError, 502, "error"),
        ("no_token", UpstreamError, 502, "error"),
        ("oversized", UpstreamError, 502, "error"),
    ],
)
async def test_error_mapping_without_retry(
    mode: str,
    error: type[Exception],
    status: int,
    outcome: str,
    start_as: StartAs,
    make_client: MakeClient,
) -> None:
    fake = await start_as()
    fake.mode = mode
    seen, observe = _observer()
    client = make_client({"as": profile(fake.token_url)}, observer=observe)
    with pytest.raises(error) as raised:
        await client.exchange("as", assertion().raw)
    assert raised.value.status == status  # type: ignore[attr-defined]
    assert fake.calls == 1
    assert seen == [("as", outcome)]
    # Decided by the error, not by its reason word: only the AS's own refusal is remembered.
    assert raised.value.retryable is False  # type: ignore[attr-defined]
    assert raised.value.remembered is (mode == "invalid_grant")  # type: ignore[attr-defined]
    if mode in ("rate_limited", "temporarily_unavailable"):
        assert dict(raised.value.headers) == {"Retry-After": "7"}  # type: ignore[attr-defined]


async def test_5xx_is_retried_then_succeeds(start_as: StartAs, make_client: MakeClient) -> None:
    fake = await start_as()
    fake.fail_next = 2
    seen, observe = _observer()
    client = make_client({"as": profile(fake.token_url)}, observer=observe)
    token = await client.exchange("as", assertion().raw)
    assert fake.calls == 3 and token.access_token == fake.issued[0]
    assert seen == [("as", "ok")]


async def test_5xx_retries_are_bounded(start_as: StartAs, make_client: MakeClient) -> None:
    fake = await start_as()
    fake.mode = "server_error"
    seen, observe = _observer()
    client = make_client({"as": profile(fake.token_url)}, observer=observe)
    with pytest.raises(UpstreamError) as raised:
        await client.exchange("as", assertion().raw)
    assert raised.value.status == 502 and raised.value.reason == "as_server_error"
    assert raised.value.retryable and not raised.value.remembered
    assert fake.calls == 3
    assert seen == [("as", "error")]


async def test_invalid_grant_is_never_retried(start_as: StartAs, make_client: MakeClient) -> None:
    fake = await start_as(one_time_use=True)
    client = make_client({"as": profile(fake.token_url)})
    used = assertion()
    await client.exchange("as", used.raw)
    with pytest.raises(InvalidAssertion) as raised:
        await client.exchange("as", used.raw)
    assert raised.value.reason == "invalid_grant"
    assert fake.calls == 2


async def test_hanging_server_times_out(start_as: StartAs, make_client: MakeClient) -> None:
    fake = await start_as()
    fake.mode = "hang"
    seen, observe = _observer()
    server = profile(fake.token_url, timeouts={"connect": 1, "total": 0.2})
    client = make_client({"as": server}, observer=observe)
    with pytest.raises(UpstreamTimeout) as raised:
        await client.exchange("as", assertion().raw)
    assert raised.value.status == 504
    # A read timeout is not retried: the AS may already have consumed the assertion.
    assert fake.calls == 1
    assert seen == [("as", "timeout")]


async def test_overall_deadline_bounds_retries(start_as: StartAs, make_client: MakeClient) -> None:
    fake = await start_as()
    fake.mode = "slow"
    fake.delay = 5
    server = profile(
        fake.token_url,
        timeouts={"connect": 1, "total": 10},
        retries={"attempts": 5, "backoff": 0.01, "deadline": 0.3},
    )
    client = make_client({"as": server})
    with pytest.raises(UpstreamTimeout) as raised:
        await client.exchange("as", assertion().raw)
    assert raised.value.reason in ("as_deadline", "as_timeout")


async def test_connection_refused_is_retried_then_502(make_client: MakeClient) -> None:
    with socket.socket() as probe:  # a port nobody listens on once this closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    seen, observe = _observer()
    client = make_client({"as": profile(f"http://127.0.0.1:{port}/token")}, observer=observe)
    with pytest.raises(UpstreamError) as raised:
        await client.exchange("as", assertion().raw)
    assert raised.value.status == 502 and raised.value.reason == "as_unreachable"
    assert seen == [("as", "error")]


@pytest.mark.parametrize(("given", "expected"), [(1800, 1800), ("1800", 1800), (None, 900)])
async def test_expires_in_shapes_over_the_wire(
    given: object, expected: float, start_as: StartAs, make_client: MakeClient
) -> None:
    fake = await start_as(expires_in=given)
    client = make_client({"as": profile(fake.token_url, default_expires_in=900)})
    assert (await client.exchange("as", assertion().raw)).expires_in == expected


async def test_plain_base64_option_and_mismatch(start_as: StartAs, make_client: MakeClient) -> None:
    fake = await start_as(assertion_encoding="base64")
    client = make_client(
        {
            "plain": profile(fake.token_url, assertion_encoding="base64"),
            "url": profile(fake.token_url),
        }
    )
    # Bytes whose base64 and base64url differ, so each side really checks the alphabet.
    odd = assertion(nonce="\u00ff\u00fe>?")
    await client.exchange("plain", odd.raw)
    with pytest.raises(InvalidAssertion):
        await client.exchange("url", odd.raw)
    assert fake.refusals == ["invalid_grant: assertion is not base64"]


async def test_extra_params_reach_the_server(start_as: StartAs, make_client: MakeClient) -> None:
    fake = await start_as()
    server = profile(fake.token_url, extra_params={"company_id": "ACME", "new_token": "true"})
    await make_client({"sf": server}).exchange("sf", assertion().raw)
    assert fake.last_form["company_id"] == "ACME" and fake.last_form["new_token"] == "true"


def test_misconfigured_profiles_fail_at_construction(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("not a key")
    with pytest.raises(ConfigError) as raised:
        from gateway.oauth import TokenClient

        TokenClient(
            {
                "a": profile("https://a.test/t", extra_params={"assertion": "x"}),
                "b": profile(
                    "https://b.test/t",
                    client_auth="private_key_jwt",
                    client_secret=None,
                    private_key_jwt={"key_file": str(key)},
                ),
            }
        )
    assert raised.value.problems == [
        "authorization_servers.a.extra_params.assertion: 'assertion' is set by the gateway "
        "and cannot be overridden",
        "authorization_servers.b.private_key_jwt.key_file: not an unencrypted PEM private key "
        "(PKCS#8 or traditional)",
    ]


async def test_unknown_profile_is_an_upstream_error(make_client: MakeClient) -> None:
    client = make_client({})
    with pytest.raises(UpstreamError, match="as_unknown_server"):
        await client.exchange("nope", assertion().raw)


async def test_tokens_and_assertions_never_reach_the_logs(
    start_as: StartAs, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    fake = await start_as()
    fake.fail_next = 1
    client = make_client({"as": profile(fake.token_url)})
    presented = assertion()
    with caplog.at_level(logging.DEBUG):
        token = await client.exchange("as", presented.raw)
    assert "retrying" in caplog.text  # the retry was logged…
    assert token.access_token not in caplog.text  # …but nothing secret
    assert "alice" not in caplog.text and "s3cret" not in caplog.text
    assert token.access_token not in repr(token)
