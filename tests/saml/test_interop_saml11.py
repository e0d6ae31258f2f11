"""SAML 1.1 documents from real AD FS / WS-Federation STSs in ../shared/interop: the manifest's
verdict and claims (``saml11_vectors``), for an IdP that opts in to SAML 1.1."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from gateway.config import AssertionSettings, AuthorizationServer, IdentityProvider
from gateway.errors import InvalidAssertion
from gateway.saml import build_trust_policy, parse_xml, validate_assertion

INTEROP = Path(__file__).resolve().parents[2] / ".." / "shared" / "interop"
_MANIFEST = INTEROP / "manifest.json"
_SAML1 = "urn:oasis:names:tc:SAML:1.0:assertion"


def _vectors() -> list[dict[str, Any]]:
    if not _MANIFEST.is_file():
        return []
    vectors: list[dict[str, Any]] = json.loads(_MANIFEST.read_text()).get("saml11_vectors", [])
    return vectors


pytestmark = pytest.mark.skipif(
    not _vectors(),
    reason="SAML 1.1 interop vectors (../shared/interop, saml11_vectors) are not present",
)


def _instant(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _policy(vector: dict[str, Any], versions: tuple[str, ...] = ("1.1",)):  # type: ignore[no-untyped-def]
    idp = IdentityProvider(
        issuers=(vector["issuer"],),
        certificates=(str(INTEROP / vector["cert"]),),
        allow_sha1=vector["sha1"],
        min_rsa_key_bits=1024 if vector["weak_key_opt_in"] else 2048,
        saml_versions=versions,  # type: ignore[arg-type]
    )
    server = AuthorizationServer(
        token_url="https://as.example/token", client_auth="none", audience=vector["audiences"][0]
    )
    return build_trust_policy(idp, server, AssertionSettings(), idp_name=vector["name"])


def _presented(vector: dict[str, Any]) -> bytes:
    """The assertion as a client sends it: a WS-Trust response's assertion taken out, bare."""
    raw = (INTEROP / vector["file"]).read_bytes()
    if vector["container"] == "assertion":
        return raw
    found = list(parse_xml(raw).iter(f"{{{_SAML1}}}Assertion"))
    assert len(found) == 1
    return etree.tostring(found[0])  # lxml keeps the in-scope namespace declarations


@pytest.mark.parametrize("vector", _vectors(), ids=lambda v: v["name"])
def test_saml11_vector_gets_the_manifest_claims(vector: dict[str, Any]) -> None:
    raw = _presented(vector)
    policy = _policy(vector)
    if vector.get("cert_expired_at_issue"):
        # No one instant lies inside both the certificate and the assertion: at the claims'
        # time the pinned certificate has expired; at the certificate's time the signature
        # holds (conditions are checked only after it verified) but the assertion is not
        # yet valid. Both refusals are right.
        with pytest.raises(InvalidAssertion) as caught:
            validate_assertion(raw, policy, _instant(vector["claims_at"]))
        assert caught.value.reason == "signature"
        assert "not valid at this time" in caught.value.detail
        with pytest.raises(InvalidAssertion) as caught:
            validate_assertion(raw, policy, _instant(vector["verify_at"]))
        assert caught.value.reason == "not_yet_valid"
        return
    result = validate_assertion(raw, policy, _instant(vector["verify_at"]))
    assert result.saml_version == "1.1"
    assert result.id == vector["assertion_id"]
    assert result.issuer == vector["issuer"]
    assert result.subject == vector["subject"]
    assert list(result.audiences) == vector["audiences"]
    assert vector["recipient"] is None and result.recipient == vector["audiences"][0]
    assert abs(result.not_on_or_after - _instant(vector["not_on_or_after"])) < timedelta(
        milliseconds=1
    )
    assert result.raw == raw


@pytest.mark.parametrize("vector", _vectors(), ids=lambda v: v["name"])
def test_saml11_vector_refused_without_the_opt_in(vector: dict[str, Any]) -> None:
    with pytest.raises(InvalidAssertion) as caught:
        validate_assertion(
            _presented(vector), _policy(vector, ("2.0",)), _instant(vector["verify_at"])
        )
    assert caught.value.reason == "version"


def test_adfs_saml11_edited_after_signing_is_refused() -> None:
    vector = next(v for v in _vectors() if v["name"] == "adfs_saml11_assertion_signed")
    raw = _presented(vector)
    edited = raw.replace(b">john@fabrikam.com<", b">admin@fabrikam.com<")
    assert edited != raw
    with pytest.raises(InvalidAssertion) as caught:
        validate_assertion(edited, _policy(vector), _instant(vector["verify_at"]))
    assert caught.value.reason == "signature"
