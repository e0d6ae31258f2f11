"""One grant per authorization server: what each sends, what the server refuses, what the
gateway accepts back, and the config rules that keep a grant to the versions it carries.

The requests are checked on the body the fake authorization server received, against the
documents: RFC 7522 §2.1 (``grant_type``, ``assertion`` base64url), Microsoft's "OAuth 2.0
SAML bearer assertion flow" (the same request with ``…:saml1_1-bearer``), RFC 8693 §2.1
(``subject_token``, ``subject_token_type`` of §3, and the optional ``requested_token_type``,
``audience``, ``resource`` once per URI, ``scope``).
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest

from gateway.config import parse_config
from gateway.errors import ConfigError, InvalidAssertion, UpstreamError

from .helpers import MakeClient, StartAs, assertion, profile
from .helpers import post_form as _post

SAML2_BEARER = "urn:ietf:params:oauth:grant-type:saml2-bearer"
SAML1_BEARER = "urn:ietf:params:oauth:grant-type:saml1_1-bearer"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
SAML2 = "urn:ietf:params:oauth:token-type:saml2"
SAML1 = "urn:ietf:params:oauth:token-type:saml1"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
JWT = "urn:ietf:params:oauth:token-type:jwt"
CONFIG = Path(__file__).resolve().parents[2] / "config"


def saml1_assertion(assertion_id: str = "_s1", nonce: str = "") -> bytes:
    """A SAML 1.1 document as AD FS shapes it (AssertionID, Issuer as an attribute)."""
    return (
        '<saml:Assertion xmlns:saml="urn:oasis:names:tc:SAML:1.0:assertion" MajorVersion="1"'
        f' MinorVersion="1" AssertionID="{assertion_id}" Issuer="http://adfs.test/adfs/services/'
        f'trust"><saml:AttributeStatement><saml:Subject><saml:NameIdentifier>bob{nonce}'
        "</saml:NameIdentifier></saml:Subject></saml:AttributeStatement></saml:Assertion>"
    ).encode()


def received(body: bytes) -> list[tuple[str, str]]:
    return parse_qsl(body.decode("ascii"), keep_blank_values=True, strict_parsing=True)


def unb64url(text: str) -> bytes:
    # RFC 7522 §2.1 / RFC 8693 §3: base64url, no padding, no line breaks.
    assert re.fullmatch(r"[A-Za-z0-9_-]+", text), "not base64url without padding"
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- exactly the documented request, for each grant ------------------------------------


async def test_saml2_bearer_sends_rfc7522(start_as: StartAs, make_client: MakeClient) -> None:
    fake = await start_as()
    raw = assertion("_g2").raw + b" "  # a length that base64 would pad
    client = make_client({"as": profile(fake.token_url, scope="openid api")})
    await client.exchange("as", raw)
    fields = received(fake.last_body)
    encoded = dict(fields)["assertion"]
    assert sorted(fields) == sorted(
        [("grant_type", SAML2_BEARER), ("assertion", encoded), ("scope", "openid api")]
    )
    assert unb64url(encoded) == raw


async def test_saml1_bearer_sends_entra_ids_request(
    start_as: StartAs, make_client: MakeClient
) -> None:
    # Microsoft's page: grant_type, assertion, client_id, client_secret, scope in the form.
    fake = await start_as(client_auth="client_secret_post", grant_types=[SAML1_BEARER])
    raw = saml1_assertion("_entra1", nonce="\u00ff>")
    server = profile(
        fake.token_url,
        grant="saml1-bearer",
        client_auth="client_secret_post",
        scope="https://graph.microsoft.com/.default",
    )
    await make_client({"entra": server}).exchange("entra", raw, saml_version="1.1")
    fields = received(fake.last_body)
    encoded = dict(fields)["assertion"]
    assert sorted(fields) == sorted(
        [
            ("grant_type", SAML1_BEARER),
            ("assertion", encoded),
            ("scope", "https://graph.microsoft.com/.default"),
            ("client_id", "gateway"),
            ("client_secret", "s3cret"),
        ]
    )
    assert unb64url(encoded) == raw
    assert fake.assertion_ids == ["_entra1"] and fake.refusals == []


async def test_token_exchange_sends_rfc8693_with_every_option(
    start_as: StartAs, make_client: MakeClient
) -> None:
    fake = await start_as(client_auth="none", client_id=None, grant_types=[TOKEN_EXCHANGE])
    raw = assertion("_te2").raw + b"  "
    server = profile(
        fake.token_url,
        grant="token-exchange",
        client_auth="none",
        client_id=None,
        client_secret=None,
        token_exchange={
            "requested_token_type": ACCESS_TOKEN,
            "audience": "//iam.googleapis.com/locations/global/workforcePools/p/providers/q",
            "resource": ["https://api.test/orders", "urn:example:ledger"],
            "scope": ["https://www.googleapis.com/auth/cloud-platform"],
        },
    )
    token = await make_client({"sts": server}).exchange("sts", raw)
    assert token.access_token == fake.issued[0]
    fields = received(fake.last_body)
    subject = dict(fields)["subject_token"]
    assert sorted(fields) == sorted(
        [
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", subject),
            ("subject_token_type", SAML2),
            ("requested_token_type", ACCESS_TOKEN),
            ("audience", "//iam.googleapis.com/locations/global/workforcePools/p/providers/q"),
            ("resource", "https://api.test/orders"),
            ("resource", "urn:example:ledger"),
            ("scope", "https://www.googleapis.com/auth/cloud-platform"),
        ]
    )
    assert unb64url(subject) == raw
    assert fake.last_headers.get("Authorization") is None  # client_auth none: no header


async def test_token_exchange_names_a_saml1_subject_and_sends_only_what_is_set(
    start_as: StartAs, make_client: MakeClient
) -> None:
    fake = await start_as(grant_types=[TOKEN_EXCHANGE])
    raw = saml1_assertion("_te1")
    server = profile(fake.token_url, grant="token-exchange")
    await make_client({"kc": server}).exchange("kc", raw, saml_version="1.1")
    fields = received(fake.last_body)
    subject = dict(fields)["subject_token"]
    assert sorted(fields) == sorted(
        [("grant_type", TOKEN_EXCHANGE), ("subject_token", subject), ("subject_token_type", SAML1)]
    )
    assert unb64url(subject) == raw and fake.assertion_ids == ["_te1"]


@pytest.mark.parametrize(("grant", "version"), [("saml2-bearer", "1.1"), ("saml1-bearer", "2.0")])
async def test_a_grant_never_carries_another_version(
    grant: str, version: str, start_as: StartAs, make_client: MakeClient
) -> None:
    fake = await start_as(grant_types=[SAML1_BEARER, SAML2_BEARER])
    client = make_client({"as": profile(fake.token_url, grant=grant)})
    with pytest.raises(UpstreamError) as raised:
        await client.exchange("as", assertion().raw, saml_version=version)
    assert raised.value.reason == "as_grant_mismatch" and not raised.value.retryable
    assert fake.calls == 0


# --- what comes back ---------------------------------------------------------------------


async def test_issued_token_type_must_be_the_one_asked_for(
    start_as: StartAs, make_client: MakeClient
) -> None:
    fake = await start_as(grant_types=[TOKEN_EXCHANGE])
    asked_jwt = profile(
        fake.token_url, grant="token-exchange", token_exchange={"requested_token_type": JWT}
    )
    default = profile(fake.token_url, grant="token-exchange")
    client = make_client({"jwt": asked_jwt, "default": default})
    assert (await client.exchange("jwt", assertion().raw)).access_token == fake.issued[-1]
    assert dict(fake.last_fields)["requested_token_type"] == JWT
    fake.issued_token_type = ACCESS_TOKEN
    with pytest.raises(UpstreamError) as raised:
        await client.exchange("jwt", assertion().raw)
    assert raised.value.reason == "as_bad_response" and "asked for" in raised.value.detail
    # Nothing asked: an access token is what the gateway can send on as Bearer.
    fake.issued_token_type = JWT
    with pytest.raises(UpstreamError):
        await client.exchange("default", assertion().raw)
    fake.issued_token_type = ACCESS_TOKEN
    assert (await client.exchange("default", assertion().raw)).access_token == fake.issued[-1]


async def test_token_type_n_a_is_not_sent_on_as_bearer(
    start_as: StartAs, make_client: MakeClient
) -> None:
    fake = await start_as(grant_types=[TOKEN_EXCHANGE], token_type="N_A")
    client = make_client({"as": profile(fake.token_url, grant="token-exchange")})
    with pytest.raises(UpstreamError) as raised:
        await client.exchange("as", assertion().raw)
    assert raised.value.status == 502 and "N_A" in raised.value.detail


async def test_issued_token_type_is_required(start_as: StartAs, make_client: MakeClient) -> None:
    # A server speaking RFC 7522 to a token-exchange profile answers without the field.
    fake = await start_as(grant_types=[TOKEN_EXCHANGE, SAML2_BEARER])
    client = make_client({"as": profile(fake.token_url, grant="token-exchange")})
    fake.issued_token_type = ""
    with pytest.raises(UpstreamError) as raised:
        await client.exchange("as", assertion().raw)
    assert raised.value.reason == "as_bad_response"


async def test_rfc8693_errors_map_like_rfc6749_ones(
    start_as: StartAs, make_client: MakeClient
) -> None:
    fake = await start_as(grant_types=[TOKEN_EXCHANGE], audiences=["//served"], one_time_use=True)
    outcomes: list[str] = []
    client = make_client(
        {
            "wrong": profile(
                fake.token_url, grant="token-exchange", token_exchange={"audience": "//other"}
            ),
            "right": profile(
                fake.token_url, grant="token-exchange", token_exchange={"audience": "//served"}
            ),
        },
        observer=lambda _server, outcome, _seconds: outcomes.append(outcome),
    )
    with pytest.raises(UpstreamError) as target:
        await client.exchange("wrong", assertion().raw)
    assert (target.value.status, target.value.reason) == (502, "invalid_target")
    assert not target.value.retryable and not target.value.remembered
    used = assertion().raw
    await client.exchange("right", used)
    with pytest.raises(InvalidAssertion) as replayed:
        await client.exchange("right", used)
    assert replayed.value.status == 401 and replayed.value.remembered
    assert outcomes == ["client_error", "ok", "invalid_grant"]
    assert fake.calls == 3  # none of them retried


# --- the fake refuses what a real token-exchange server refuses ------------------------


def _exchange_form(raw: bytes, **changes: str | None) -> dict[str, str]:
    form: dict[str, str | None] = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": base64.urlsafe_b64encode(raw).rstrip(b"=").decode(),
        "subject_token_type": SAML2,
        **changes,
    }
    return {key: value for key, value in form.items() if value is not None}


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"subject_token": None}, "invalid_request"),
        ({"subject_token_type": None}, "invalid_request"),
        ({"subject_token_type": "urn:ietf:params:oauth:token-type:jwt"}, "invalid_request"),
        ({"subject_token_type": SAML1}, "invalid_request"),  # a SAML 2.0 document
        ({"requested_token_type": "urn:ietf:params:oauth:token-type:id_token"}, "invalid_request"),
        ({"grant_type": SAML1_BEARER}, "unsupported_grant_type"),
    ],
)
async def test_fake_refuses_a_bad_token_exchange(
    changes: dict[str, str | None], error: str, start_as: StartAs
) -> None:
    fake = await start_as(client_auth="none", client_id=None, grant_types=[TOKEN_EXCHANGE])
    raw = assertion().raw
    assert (await _post(fake.token_url, _exchange_form(raw)))[0] == 200
    status, body = await _post(fake.token_url, _exchange_form(raw, **changes))
    assert (status, body["error"]) == (400, error)
    assert len(fake.issued) == 1


async def test_fake_refuses_padding_where_base64url_is_required(start_as: StartAs) -> None:
    fake = await start_as(
        client_auth="none", client_id=None, grant_types=[TOKEN_EXCHANGE, SAML1_BEARER]
    )
    raw = assertion().raw + b"x"
    padded = base64.urlsafe_b64encode(raw).decode()
    assert padded.endswith("=")
    status, body = await _post(fake.token_url, _exchange_form(raw, subject_token=padded))
    assert (status, body["error"]) == (400, "invalid_request")
    one = saml1_assertion("_pad", nonce="x")
    padded = base64.urlsafe_b64encode(one).decode()
    assert padded.endswith("=")
    status, body = await _post(fake.token_url, {"grant_type": SAML1_BEARER, "assertion": padded})
    assert (status, body["error"]) == (400, "invalid_grant")
    # A SAML 2.0 assertion on Entra ID's SAML 1.1 grant is refused too.
    status, body = await _post(
        fake.token_url,
        {"grant_type": SAML1_BEARER, "assertion": _exchange_form(raw)["subject_token"]},
    )
    assert (status, body["error"]) == (400, "invalid_grant")
    assert fake.issued == []


# --- config ------------------------------------------------------------------------------


def _config(server: dict[str, Any], idp: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "identity_providers": {
            "adfs": {"issuer": "http://adfs.test/adfs/services/trust", "certificates": ["i.pem"]}
            | (idp or {})
        },
        "authorization_servers": {
            "as": {"token_url": "https://as.test/token", "audience": "https://as.test"}
            | {"client_auth": "none"}
            | server
        },
        "routes": [
            {
                "upstream": "http://127.0.0.1:9",
                "identity_provider": "adfs",
                "authorization_server": "as",
            }
        ],
    }


@pytest.fixture
def base(tmp_path: Path) -> Path:
    (tmp_path / "i.pem").write_text((CONFIG / "certs" / "example-idp.pem").read_text())
    return tmp_path


def _problems(data: dict[str, Any], base: Path) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        parse_config(data, base)
    return raised.value.problems


def test_grant_defaults_to_saml2_bearer(base: Path) -> None:
    server = parse_config(_config({}), base).authorization_servers["as"]
    assert server.grant == "saml2-bearer" and server.token_exchange is None


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        (
            {"token_exchange": {"audience": "x"}},
            "authorization_servers.as.token_exchange: set, but grant is 'saml2-bearer'",
        ),
        (
            {"grant": "token-exchange", "scope": "a b"},
            "authorization_servers.as.scope: with grant token-exchange, use token_exchange.scope",
        ),
        (
            {"grant": "token-exchange", "assertion_encoding": "base64"},
            "authorization_servers.as.assertion_encoding: grant token-exchange sends base64url",
        ),
        (
            {"grant": "token-exchange", "token_exchange": {"resource": ["orders"]}},
            "authorization_servers.as.token_exchange.resource[0]: not an absolute URI",
        ),
        (
            {"grant": "token-exchange", "token_exchange": {"requested_token_type": "id_token"}},
            "authorization_servers.as.token_exchange.requested_token_type:",
        ),
        ({"grant": "saml3-bearer"}, "authorization_servers.as.grant:"),
        (
            # The route's IdP accepts SAML 2.0 (the default): the SAML 1.1 grant cannot carry it.
            {"grant": "saml1-bearer"},
            "authorization_servers.as.grant: 'saml1-bearer' cannot carry SAML 2.0, which "
            "identity provider 'adfs' of routes[0] accepts",
        ),
    ],
)
def test_grant_settings_that_cannot_work_name_their_key(
    server: dict[str, Any], expected: str, base: Path
) -> None:
    problems = _problems(_config(server), base)
    assert any(problem.startswith(expected) for problem in problems), problems


@pytest.mark.parametrize(
    ("versions", "grant", "refused"),
    [
        (["1.1"], "saml1-bearer", None),
        (["1.1"], "saml2-bearer", "1.1"),
        (["1.1", "2.0"], "saml1-bearer", "2.0"),
        (["1.1", "2.0"], "token-exchange", None),
        (["2.0"], "token-exchange", None),
    ],
)
def test_a_grant_must_carry_every_version_its_idps_accept(
    versions: list[str], grant: str, refused: str | None, base: Path
) -> None:
    data = _config({"grant": grant}, {"saml_versions": versions})
    if refused is None:
        assert parse_config(data, base).authorization_servers["as"].grant == grant
    else:
        (problem,) = _problems(data, base)
        assert problem.startswith(
            f"authorization_servers.as.grant: {grant!r} cannot carry SAML {refused},"
        )
        assert "token-exchange" in problem  # the grant that would
