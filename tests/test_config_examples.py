"""Every worked example in config/examples/ is a complete, loadable configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.config import load_config
from gateway.oauth.client import TokenClient

EXAMPLES = Path(__file__).resolve().parents[1] / "config" / "examples"
NAMES = [
    "okta",
    "salesforce",
    "sap-successfactors",
    "sap-netweaver",
    "sap-xsuaa",
    "wso2",
    "pingfederate",
    "google-sts",
    "entra-id-adfs",
]


@pytest.fixture
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "pf-client.pem"
    key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    for name, value in {
        "OKTA_CLIENT_SECRET": "okta-secret",
        "SALESFORCE_CONSUMER_KEY": "3MVG9example",
        "SF_API_KEY": "sf-api-key",
        "SF_COMPANY_ID": "ACMECORP",
        "S4_OAUTH_CLIENT_PASSWORD": "s4-secret",
        "XSUAA_CLIENT_ID": "sb-orders!t12345",
        "XSUAA_CLIENT_SECRET": "xsuaa-secret",
        "WSO2_CLIENT_KEY": "wso2-key",
        "WSO2_CLIENT_SECRET": "wso2-secret",
        "PF_CLIENT_KEY_FILE": str(key),
        "ENTRA_CLIENT_SECRET": "entra-secret",
    }.items():
        monkeypatch.setenv(name, value)


def test_every_example_is_listed() -> None:
    assert sorted(p.stem for p in EXAMPLES.glob("*.yaml")) == sorted(NAMES)


@pytest.mark.usefixtures("environment")
@pytest.mark.parametrize("name", NAMES)
async def test_example_loads_and_builds_a_token_request(name: str) -> None:
    config = load_config(EXAMPLES / f"{name}.yaml")
    assert len(config.authorization_servers) == 1
    ((server, settings),) = config.authorization_servers.items()
    client = TokenClient(config.authorization_servers)  # keys load, no server problems
    version = "1.1" if settings.grant == "saml1-bearer" else "2.0"
    try:
        request = client.build_request(server, b"<Assertion ID='_x'/>", saml_version=version)
    finally:
        await client.close()
    assert request.value("assertion") or request.value("subject_token")
    # Each example documents, in comments, what its server expects in the assertion.
    text = (EXAMPLES / f"{name}.yaml").read_text()
    for word in ("Audience", "Recipient", "NameID"):
        assert word in text, f"{name}.yaml does not say what {word} the server expects"


@pytest.mark.usefixtures("environment")
def test_server_specific_fields() -> None:
    sf = load_config(EXAMPLES / "sap-successfactors.yaml").authorization_servers["successfactors"]
    assert dict(sf.extra_params) == {"company_id": "ACMECORP"}
    assert sf.assertion_encoding == "base64" and sf.client_auth == "none"
    salesforce = load_config(EXAMPLES / "salesforce.yaml")
    assert salesforce.identity_providers["salesforce-signer"].issuers == ("3MVG9example",)
    s4 = load_config(EXAMPLES / "sap-netweaver.yaml").authorization_servers["s4hana"]
    assert s4.token_url.split("?")[0].endswith("/sap/bc/sec/oauth2/token") and s4.scope
    pf = load_config(EXAMPLES / "pingfederate.yaml").authorization_servers["pingfederate"]
    assert pf.private_key_jwt is not None and pf.private_key_jwt.algorithm == "ES256"


def test_no_private_key_is_shipped() -> None:
    for path in EXAMPLES.rglob("*"):
        if path.is_file():
            assert "PRIVATE KEY" not in path.read_text(), path.name
