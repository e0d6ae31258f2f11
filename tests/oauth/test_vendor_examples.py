"""The worked examples for SAP XSUAA, SAP NetWeaver, Okta, Google's STS and Entra ID send
what their vendors document.

Each example file runs through the real gateway (listener, validation, exchange, proxy) with
only its hosts moved to loopback; a recording token endpoint keeps the exact request. The
expectations below are written from the vendors' documents, quoted per profile, not from
the gateway's code:

- XSUAA: Cloud Foundry UAA API reference, SAML 2.0 bearer grant: ``POST
  /oauth/token/alias/<entityID>``, form parameters ``grant_type``, ``assertion`` (the UAA
  test suite encodes it base64url without padding), ``client_id``, ``client_secret``; SAP BTP
  "Token Retrieval Fails With Status Code 401": the secret goes in the POST body, or in
  Basic over the URL-encoded pair with ``X-CF-ENCODED-CREDENTIALS: true`` (the variant the
  example's comments show, tested too).
- NetWeaver: SAP's sample messages for the SAML bearer flow: ``POST
  /sap/bc/sec/oauth2/token`` (the ``sap-client`` in the query), ``Authorization: Basic`` of
  the plain ``CLIENT:password``, and ``client_id``, ``grant_type``, ``assertion``, ``scope``
  in the form.
- Okta, "Use the SAML 2.0 Assertion flow": ``POST …/v1/token``, ``Accept:
  application/json``, ``Content-Type: application/x-www-form-urlencoded``, ``Authorization:
  Basic`` of client ID and secret, ``grant_type``, ``scope`` with ``openid`` (required) and
  ``assertion`` base64url.
- Google Cloud STS, "Method: token": ``POST https://sts.googleapis.com/v1/token``, no
  ``Authorization`` header, ``grant_type`` token-exchange, ``audience`` (the provider's full
  resource name), ``scope``, ``requested_token_type`` access_token, ``subject_token`` and
  ``subject_token_type`` ``urn:ietf:params:oauth:token-type:saml2``.
- Entra ID, "Microsoft identity platform and OAuth 2.0 SAML bearer assertion flow": ``POST
  /<tenant>/oauth2/v2.0/token`` with ``grant_type`` saml1_1-bearer, ``assertion``,
  ``client_id``, ``client_secret``, ``scope``; the assertion in standard base64 as
  Microsoft's MSAL libraries send it. Its AD FS assertion is SAML 1.1, which the demo IdP
  does not issue: that example's token request is sent by the token client itself.
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.app import GatewayServer
from gateway.config import AuthorizationServer
from gateway.devkit.idp import DemoIdP
from gateway.oauth.client import TokenClient
from gateway.preflight import preflight

from .helpers import RecordingTokenEndpoint

EXAMPLES = Path(__file__).resolve().parents[2] / "config" / "examples"
SAML2_BEARER = "urn:ietf:params:oauth:grant-type:saml2-bearer"
SAML1_BEARER = "urn:ietf:params:oauth:grant-type:saml1_1-bearer"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
FORM = "application/x-www-form-urlencoded"

# Credentials with the characters that real ones have and that encodings change.
ENVIRONMENT = {
    "XSUAA_CLIENT_ID": "sb-orders!t12345",
    "XSUAA_CLIENT_SECRET": "Xs+ua/s3cret=",
    "S4_OAUTH_CLIENT_PASSWORD": "Init!Pass#2024",
    "OKTA_CLIENT_SECRET": "okta-Secret_42",
    "ENTRA_CLIENT_SECRET": "Entra~Secret.9+/=",
}


@dataclass(frozen=True)
class Documented:
    """A token request as the vendor's document shows it."""

    method: str
    path_and_query: str
    basic: str | None  # the decoded "id:secret" of Authorization: Basic, None: no header
    form: dict[str, str]  # every field but the assertion
    assertion_field: str = "assertion"  # where the assertion goes (RFC 8693: subject_token)
    assertion_encoding: str = "base64url"
    saml11: bool = False  # the IdP issues SAML 1.1 (AD FS over WS-Trust)
    headers: dict[str, str] = field(default_factory=dict)  # further headers required
    assertion_attributes: dict[str, str] = field(default_factory=dict)
    # A variant of an example: the file, and the changes its comments describe.
    example: str | None = None
    changes: dict[str, Any] = field(default_factory=dict)


DOCUMENTED = {
    "sap-xsuaa": Documented(
        method="POST",
        path_and_query="/oauth/token/alias/mysub.aws-live-eu10",
        basic=None,
        form={
            "grant_type": SAML2_BEARER,
            "client_id": "sb-orders!t12345",
            "client_secret": "Xs+ua/s3cret=",
        },
    ),
    # The other way SAP's 401 note gives: form-encoded Basic announced with the header.
    "sap-xsuaa-basic": Documented(
        method="POST",
        path_and_query="/oauth/token/alias/mysub.aws-live-eu10",
        basic="sb-orders%21t12345:Xs%2Bua%2Fs3cret%3D",
        form={"grant_type": SAML2_BEARER},
        headers={"X-CF-ENCODED-CREDENTIALS": "true"},
        example="sap-xsuaa",
        changes={
            "client_auth": "client_secret_basic",
            "headers": {"X-CF-ENCODED-CREDENTIALS": "true"},
        },
    ),
    "sap-netweaver": Documented(
        method="POST",
        path_and_query="/sap/bc/sec/oauth2/token?sap-client=100",
        basic="GATEWAY_OAUTH:Init!Pass#2024",
        form={
            "grant_type": SAML2_BEARER,
            "client_id": "GATEWAY_OAUTH",
            "scope": "ZAPI_SALES_ORDER_SRV_0001 ZAPI_BUSINESS_PARTNER_0001",
        },
        # SOAUTH2 "Requires Attribute client_id": the assertion names the same client.
        assertion_attributes={"client_id": "GATEWAY_OAUTH"},
    ),
    "okta": Documented(
        method="POST",
        path_and_query="/oauth2/aus1a2b3c4d5e6f7g8h9/v1/token",
        basic="0oa1a2b3c4d5e6f7g8h9:okta-Secret_42",
        form={"grant_type": SAML2_BEARER, "scope": "openid api.orders.read"},
        headers={"Accept": "application/json"},
    ),
    "google-sts": Documented(
        method="POST",
        path_and_query="/v1/token",
        basic=None,
        form={
            "grant_type": TOKEN_EXCHANGE,
            "audience": "//iam.googleapis.com/locations/global/workforcePools/corp-pool/"
            "providers/corp-saml",
            "scope": "https://www.googleapis.com/auth/cloud-platform",
            "requested_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "subject_token_type": "urn:ietf:params:oauth:token-type:saml2",
        },
        assertion_field="subject_token",
    ),
    "entra-id-adfs": Documented(
        method="POST",
        path_and_query="/contoso.onmicrosoft.com/oauth2/v2.0/token",
        basic=None,
        form={
            "grant_type": SAML1_BEARER,
            "client_id": "11111111-2222-3333-4444-555555555555",
            "client_secret": "Entra~Secret.9+/=",
            "scope": "https://graph.microsoft.com/.default",
        },
        assertion_encoding="base64",
        saml11=True,
    ),
}


class Upstream:
    """The API behind the gateway: answers with the Authorization it was given."""

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        return web.json_response({"authorization": request.headers.get("Authorization")})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def endpoints() -> AsyncIterator[tuple[RecordingTokenEndpoint, Upstream]]:
    token_endpoint, upstream = RecordingTokenEndpoint(), Upstream()
    await token_endpoint.start()
    await upstream.start()
    yield token_endpoint, upstream
    await upstream.stop()
    await token_endpoint.stop()


def on_loopback(
    name: str, folder: Path, idp: DemoIdP, origin: str, upstream: str, changes: dict[str, Any]
) -> Path:
    """The example, unchanged but for its hosts (and the placeholder IdP certificate)."""
    data: dict[str, Any] = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    for server in data["authorization_servers"].values():
        server.update(changes)
    (folder / "idp.pem").write_bytes(idp.certificate_pem)
    for provider in data["identity_providers"].values():
        provider["certificates"] = ["idp.pem"]
    for server in data["authorization_servers"].values():
        parts = urlsplit(server["token_url"])
        server["token_url"] = origin + parts.path + (f"?{parts.query}" if parts.query else "")
    for route in data["routes"]:
        route["upstream"] = upstream
    data["listen"] = {"host": "127.0.0.1", "port": 0}
    data["admin"] = {"enabled": False}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
async def test_example_sends_the_documented_request(
    name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    endpoints: tuple[RecordingTokenEndpoint, Upstream],
) -> None:
    for variable, value in ENVIRONMENT.items():
        monkeypatch.setenv(variable, value)
    token_endpoint, upstream = endpoints
    documented = DOCUMENTED[name]
    name = documented.example or name
    example = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    (idp_settings,) = example["identity_providers"].values()
    (server,) = example["authorization_servers"].values()
    idp = DemoIdP.generate(idp_settings["issuer"])
    config = preflight(
        on_loopback(name, tmp_path, idp, token_endpoint.origin, upstream.url, documented.changes)
    )
    (loaded,) = config.authorization_servers.values()
    if documented.saml11:
        raw = idp.issue_saml11(
            "alice@example.com", audience=server["audience"], now=datetime.now(UTC)
        )
    else:
        raw = idp.issue(
            "alice@example.com",
            audience=server["audience"],
            recipient=loaded.recipients[0],
            now=datetime.now(UTC),
            attributes=documented.assertion_attributes or None,
        )
    gateway = GatewayServer(config)
    await gateway.start()
    try:
        async with aiohttp.ClientSession() as session:
            path = example["routes"][0]["path_prefix"].rstrip("/") + "/orders"
            async with session.get(
                f"http://127.0.0.1:{gateway.port}{path}",
                headers={"X-SAML-Assertion": base64.b64encode(raw).decode()},
            ) as response:
                assert response.status == 200, await response.text()
                assert (await response.json()) == {"authorization": "Bearer vendor-token-1"}
    finally:
        await gateway.close()

    [request] = token_endpoint.requests
    assert request.method == documented.method
    assert request.path_and_query == documented.path_and_query
    assert request.headers["Content-Type"] == FORM
    for header, value in documented.headers.items():
        assert request.headers[header] == value
    authorization = request.headers.get("Authorization")
    if documented.basic is None:
        assert authorization is None
    else:
        assert authorization is not None
        scheme, _, credentials = authorization.partition(" ")
        assert scheme == "Basic"
        assert base64.b64decode(credentials, validate=True).decode() == documented.basic
    fields = parse_qsl(request.body.decode("ascii"), keep_blank_values=True, strict_parsing=True)
    names = [key for key, _ in fields]
    assert len(names) == len(set(names)), f"a field sent twice: {names}"
    form = dict(fields)
    assertion = form.pop(documented.assertion_field)
    assert form == documented.form
    if documented.assertion_encoding == "base64":
        assert base64.b64decode(assertion, validate=True) == raw
    else:
        # base64url without padding (RFC 7522 §2.1), of the very bytes the IdP signed
        assert re.fullmatch(r"[A-Za-z0-9_-]+", assertion)
        assert b64url_decode(assertion) == raw


async def test_entra_example_sends_microsofts_request(
    endpoints: tuple[RecordingTokenEndpoint, Upstream],
) -> None:
    token_endpoint, _ = endpoints
    example = yaml.safe_load((EXAMPLES / "entra-id-adfs.yaml").read_text())
    (settings,) = example["authorization_servers"].values()
    assert settings["client_secret"] == "${ENTRA_CLIENT_SECRET}"
    parts = urlsplit(settings["token_url"])
    server = AuthorizationServer.model_validate(
        settings
        | {
            "token_url": token_endpoint.origin + parts.path,
            "client_secret": ENVIRONMENT["ENTRA_CLIENT_SECRET"],
        }
    )
    # An AD FS SAML 1.1 assertion, as far as the token request is concerned: its bytes.
    raw = (
        b'<saml:Assertion xmlns:saml="urn:oasis:names:tc:SAML:1.0:assertion" MajorVersion="1"'
        b' MinorVersion="1" AssertionID="_d7f1" Issuer="http://adfs.contoso.com/adfs/services/'
        b'trust"><saml:Conditions><saml:AudienceRestrictionCondition><saml:Audience>'
        b"urn:federation:MicrosoftOnline</saml:Audience></saml:AudienceRestrictionCondition>"
        b"</saml:Conditions></saml:Assertion>\n"
    )
    assert len(raw) % 3, "a length whose base64 is padded, so the two spellings differ"
    client = TokenClient({"entra": server})
    try:
        token = await client.exchange("entra", raw, saml_version="1.1")
    finally:
        await client.close()
    assert token.access_token == "vendor-token-1"
    [request] = token_endpoint.requests
    assert request.method == "POST"
    assert request.path_and_query == "/contoso.onmicrosoft.com/oauth2/v2.0/token"
    assert request.headers["Content-Type"] == FORM and "Authorization" not in request.headers
    fields = parse_qsl(request.body.decode("ascii"), keep_blank_values=True, strict_parsing=True)
    form = dict(fields)
    assert len(form) == len(fields)
    assertion = form.pop("assertion")
    assert form == {
        "grant_type": SAML1_BEARER,
        "client_id": "11111111-2222-3333-4444-555555555555",
        "client_secret": ENVIRONMENT["ENTRA_CLIENT_SECRET"],
        "scope": "https://graph.microsoft.com/.default",
    }
    # Standard base64 with its padding, as MSAL sends it; base64url would have none.
    assert assertion.endswith("=")
    assert base64.b64decode(assertion, validate=True) == raw


def test_every_example_names_its_vendor_document() -> None:
    for path in sorted(EXAMPLES.glob("*.yaml")):
        header = path.read_text().split("\n\n")[0].split("\nidentity_providers:")[0]
        assert re.search(r"^# Vendor documents?\b", header, re.MULTILINE), path.name
