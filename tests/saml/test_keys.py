"""build_trust_policy: pinned keys from PEM files and IdP metadata, errors naming the key."""

from __future__ import annotations

import base64
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.config import AssertionSettings, AuthorizationServer, IdentityProvider
from gateway.devkit.idp import DemoIdP
from gateway.errors import ConfigError
from gateway.saml import build_trust_policy, validate_assertion

from .helpers import AUDIENCE, ISSUER, NOW, RECIPIENT

SERVER = AuthorizationServer(
    token_url=RECIPIENT,
    client_auth="none",
    audience=AUDIENCE,
    recipient_aliases=("https://alias.example.test/token",),
)


def _metadata(entity_id: str, *entries: tuple[DemoIdP, str | None]) -> bytes:
    descriptors = ""
    for idp, use in entries:
        der = idp.certificate.public_bytes(Encoding.DER)
        use_attr = f' use="{use}"' if use else ""
        descriptors += (
            f"<md:KeyDescriptor{use_attr}><ds:KeyInfo><ds:X509Data><ds:X509Certificate>"
            f"{base64.encodebytes(der).decode()}</ds:X509Certificate></ds:X509Data></ds:KeyInfo>"
            "</md:KeyDescriptor>"
        )
    return (
        '<md:EntityDescriptor xmlns:md="urn:oasis:names:tc:SAML:2.0:metadata"'
        ' xmlns:ds="http://www.w3.org/2000/09/xmldsig#"'
        f' entityID="{entity_id}"><md:IDPSSODescriptor'
        ' protocolSupportEnumeration="urn:oasis:names:tc:SAML:2.0:protocol">'
        f"{descriptors}</md:IDPSSODescriptor></md:EntityDescriptor>"
    ).encode()


def test_pem_file_with_several_certificates(tmp_path: Path, idp: DemoIdP, ec_idp: DemoIdP) -> None:
    pem = tmp_path / "idp.pem"
    pem.write_bytes(b"rollover bundle\n" + idp.certificate_pem + ec_idp.certificate_pem)
    settings = AssertionSettings(clock_skew=30)
    policy = build_trust_policy(
        IdentityProvider(issuers=(ISSUER,), certificates=(str(pem),)), SERVER, settings
    )
    assert [k.kind for k in policy.keys] == ["rsa", "ec"]
    assert policy.issuers == {ISSUER}
    assert policy.audience == AUDIENCE
    assert policy.recipients == {RECIPIENT, "https://alias.example.test/token"}
    assert policy.clock_skew == timedelta(seconds=30)
    for signer in (idp, ec_idp):
        raw = signer.issue("a", audience=AUDIENCE, recipient=RECIPIENT, now=NOW)
        assert validate_assertion(raw, policy, NOW).subject == "a"


def test_metadata_signing_keys_only(
    tmp_path: Path, idp: DemoIdP, ec_idp: DemoIdP, attacker: DemoIdP
) -> None:
    metadata = tmp_path / "md.xml"
    metadata.write_bytes(
        _metadata(ISSUER, (idp, "signing"), (ec_idp, None), (attacker, "encryption"))
    )
    policy = build_trust_policy(
        IdentityProvider(issuers=(ISSUER,), metadata=(str(metadata),)), SERVER, AssertionSettings()
    )
    assert len(policy.keys) == 2
    raw = attacker.issue("a", audience=AUDIENCE, recipient=RECIPIENT, now=NOW)
    with pytest.raises(Exception) as caught:
        validate_assertion(raw, policy, NOW)
    assert getattr(caught.value, "reason", None) == "signature"  # encryption key not trusted


def test_metadata_of_another_entity_is_refused(tmp_path: Path, idp: DemoIdP) -> None:
    metadata = tmp_path / "md.xml"
    metadata.write_bytes(_metadata("https://someone.else/", (idp, "signing")))
    with pytest.raises(ConfigError) as caught:
        build_trust_policy(
            IdentityProvider(issuers=(ISSUER,), metadata=(str(metadata),)),
            SERVER,
            AssertionSettings(),
            idp_name="corp",
        )
    assert caught.value.problems[0].startswith("identity_providers.corp.metadata[0]: ")
    assert "entityID" in caught.value.problems[0]


def test_not_a_pem_certificate_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("hello")
    with pytest.raises(ConfigError) as caught:
        build_trust_policy(
            IdentityProvider(issuers=(ISSUER,), certificates=(str(bad),)),
            SERVER,
            AssertionSettings(),
            idp_name="corp",
        )
    assert caught.value.problems == [
        f"identity_providers.corp.certificates[0]: not a PEM certificate: {str(bad)!r}"
    ]


def test_metadata_that_is_not_xml(tmp_path: Path) -> None:
    bad = tmp_path / "md.xml"
    bad.write_bytes(b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><x>&e;</x>')
    with pytest.raises(ConfigError) as caught:
        build_trust_policy(
            IdentityProvider(issuers=(ISSUER,), metadata=(str(bad),)),
            SERVER,
            AssertionSettings(),
            idp_name="corp",
        )
    assert "identity_providers.corp.metadata[0]: not readable SAML metadata" in str(caught.value)


def test_weak_rsa_key_needs_the_explicit_opt_in(tmp_path: Path) -> None:
    weak = DemoIdP.generate(ISSUER, "rsa", rsa_bits=1024)
    pem = weak.write_certificate(tmp_path / "weak.pem")
    with pytest.raises(ConfigError) as caught:
        build_trust_policy(
            IdentityProvider(issuers=(ISSUER,), certificates=(str(pem),)),
            SERVER,
            AssertionSettings(),
            idp_name="old",
        )
    assert "1024 bits is under min_rsa_key_bits (2048)" in str(caught.value)
    policy = build_trust_policy(
        IdentityProvider(issuers=(ISSUER,), certificates=(str(pem),), min_rsa_key_bits=1024),
        SERVER,
        AssertionSettings(),
    )
    assert policy.min_rsa_key_bits == 1024
    raw = weak.issue("a", audience=AUDIENCE, recipient=RECIPIENT, now=NOW)
    assert validate_assertion(raw, policy, NOW).subject == "a"
