"""Per-server options for what real token endpoints need: ``basic_auth_encoding``,
``client_id_in_body`` and static ``headers``, and the combinations the config refuses."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest

from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.oauth.client import TokenClient
from gateway.oauth.grant import build_token_request

from .helpers import RecordingTokenEndpoint, assertion, profile

URL = "https://as.test/oauth2/token"
RAW = assertion("_options1").raw
CONFIG = Path(__file__).resolve().parents[2] / "config"


def decoded_basic(headers: Any) -> str:
    scheme, _, credentials = headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    return base64.b64decode(credentials, validate=True).decode()


def test_raw_basic_sends_the_pair_as_it_is() -> None:
    server = profile(
        URL, client_id="GATEWAY_OAUTH", client_secret="Init!Pass#20:24", basic_auth_encoding="raw"
    )
    request = build_token_request(server, RAW, now=0, jti="j")
    # RFC 7617: the password may hold ':'; the user-id ends at the first one.
    assert decoded_basic(request.headers) == "GATEWAY_OAUTH:Init!Pass#20:24"


def test_form_basic_is_the_default() -> None:
    server = profile(URL, client_id="sb-orders!t12345", client_secret="Init!Pass#2024")
    request = build_token_request(server, RAW, now=0, jti="j")
    assert decoded_basic(request.headers) == "sb-orders%21t12345:Init%21Pass%232024"


def test_client_id_in_body_next_to_basic() -> None:
    server = profile(URL, client_id="GATEWAY_OAUTH", client_id_in_body=True)
    request = build_token_request(server, RAW, now=0, jti="j")
    fields = parse_qsl(request.body.decode())
    assert [value for key, value in fields if key == "client_id"] == ["GATEWAY_OAUTH"]
    assert "client_secret" not in dict(fields)  # the secret still goes one way only
    assert decoded_basic(request.headers) == "GATEWAY_OAUTH:s3cret"


@pytest.fixture
async def token_endpoint() -> AsyncIterator[RecordingTokenEndpoint]:
    endpoint = RecordingTokenEndpoint()
    await endpoint.start()
    yield endpoint
    await endpoint.stop()


async def test_static_headers_reach_the_token_endpoint(
    token_endpoint: RecordingTokenEndpoint,
) -> None:
    server = profile(
        f"{token_endpoint.origin}/oauth/token",
        client_id="sb-orders!t12345",
        headers={"X-CF-ENCODED-CREDENTIALS": "true", "X-Tenant": "acme"},
    )
    client = TokenClient({"xsuaa": server})
    try:
        token = await client.exchange("xsuaa", assertion("_options2").raw)
    finally:
        await client.close()
    assert token.access_token == "vendor-token-1"
    [request] = token_endpoint.requests
    assert request.headers["X-CF-ENCODED-CREDENTIALS"] == "true"
    assert request.headers["X-Tenant"] == "acme"
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert decoded_basic(request.headers) == "sb-orders%21t12345:s3cret"


def config_with(base: Path, **server: Any) -> dict[str, Any]:
    (base / "idp.pem").write_text((CONFIG / "certs" / "example-idp.pem").read_text())
    return {
        "identity_providers": {"idp": {"issuer": "https://idp", "certificates": ["idp.pem"]}},
        "authorization_servers": {
            "as": {
                "token_url": URL,
                "client_id": "c",
                "client_secret": "s",
                "audience": "https://as",
                **server,
            }
        },
        "routes": [
            {
                "upstream": "http://127.0.0.1:9",
                "identity_provider": "idp",
                "authorization_server": "as",
            }
        ],
    }


def problems(data: dict[str, Any], base: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, base)
    return info.value.problems


def test_header_values_may_be_references_and_are_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENANT_KEY", "k-9f8e7d")
    config = parse_config(config_with(tmp_path, headers={"X-Api-Key": "${TENANT_KEY}"}), tmp_path)
    server = config.authorization_servers["as"]
    request = build_token_request(server, RAW, now=0, jti="j")
    assert request.headers["X-Api-Key"] == "k-9f8e7d"
    assert "k-9f8e7d" not in str(config.redacted())  # check-config prints it masked


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        (
            {"headers": {"authorization": "Bearer x"}},
            "authorization_servers.as.headers.authorization: the gateway sets this header itself",
        ),
        (
            {"headers": {"Content-Type": "text/plain"}},
            "authorization_servers.as.headers.Content-Type: the gateway sets this header itself",
        ),
        (
            {"headers": {"X-Split": "a\r\nInjected: yes"}},
            "authorization_servers.as.headers.X-Split: value must be visible ASCII and spaces",
        ),
        (
            {"headers": {"Bad Name": "x"}},
            "authorization_servers.as.headers.Bad Name: not a valid header name",
        ),
        (
            {"client_id": "app:1", "basic_auth_encoding": "raw"},
            "authorization_servers.as.basic_auth_encoding: 'raw' cannot carry the ':' in "
            "client_id; use 'form'",
        ),
        (
            {"client_auth": "client_secret_post", "basic_auth_encoding": "raw"},
            "authorization_servers.as.basic_auth_encoding: only applies to "
            "client_secret_basic, not 'client_secret_post'",
        ),
        (
            {"client_auth": "client_secret_post", "client_id_in_body": True},
            "authorization_servers.as.client_id_in_body: only applies to "
            "client_secret_basic, not 'client_secret_post'",
        ),
    ],
)
def test_combinations_that_cannot_work_are_refused(
    tmp_path: Path, server: dict[str, Any], expected: str
) -> None:
    assert problems(config_with(tmp_path, **server), tmp_path) == [expected]


def test_every_problem_of_one_server_at_once(tmp_path: Path) -> None:
    data = config_with(
        tmp_path,
        client_id="app:1",
        basic_auth_encoding="raw",
        headers={"Host": "elsewhere"},
        token_url="http://as.example.com/token",
        timeouts={"connect": -1},
    )
    assert sorted(problems(data, tmp_path)) == [
        "authorization_servers.as.basic_auth_encoding: 'raw' cannot carry the ':' in "
        "client_id; use 'form'",
        "authorization_servers.as.headers.Host: the gateway sets this header itself",
        "authorization_servers.as.timeouts.connect: Input should be greater than 0",
        "authorization_servers.as.token_url: http:// to 'as.example.com' would send the "
        "client credentials and the assertion in clear text; use https:// "
        "(allow_insecure_http: true is for labs)",
    ]
