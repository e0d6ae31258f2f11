"""Every published IdP document in ../shared/interop gets the manifest's verdict and claims."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.config import AssertionSettings, AuthorizationServer, IdentityProvider
from gateway.errors import InvalidAssertion
from gateway.saml import build_trust_policy, validate_assertion

INTEROP = Path(__file__).resolve().parents[2] / ".." / "shared" / "interop"
_MANIFEST = INTEROP / "manifest.json"


def _vectors() -> list[dict[str, Any]]:
    if not _MANIFEST.is_file():
        return []
    vectors: list[dict[str, Any]] = json.loads(_MANIFEST.read_text())["vectors"]
    return vectors


pytestmark = pytest.mark.skipif(
    not _MANIFEST.is_file(), reason="interop vectors (../shared/interop) are not present"
)


def _instant(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _policy(vector: dict[str, Any]):  # type: ignore[no-untyped-def]
    idp = IdentityProvider(
        # pyxmlsecurity_bare_assertion names no issuer: trust some other one
        issuers=(vector["issuer"] or "https://unused.example/",),
        certificates=(str(INTEROP / vector["cert"]),),
        allow_sha1=vector["sha1"],
        min_rsa_key_bits=1024 if vector["weak_key_opt_in"] else 2048,
    )
    server = AuthorizationServer(
        token_url="https://as.example/token",
        client_auth="none",
        audience=(vector["audiences"] or ["unused"])[0],
        # python3-saml vectors name the recipient "recipient": configure it as an alias
        recipient_aliases=(vector["recipient"] or "unused",),
    )
    return build_trust_policy(idp, server, AssertionSettings(), idp_name=vector["name"])


@pytest.mark.parametrize("vector", _vectors(), ids=lambda v: v["name"])
def test_vector_gets_the_manifest_verdict(vector: dict[str, Any]) -> None:
    raw = (INTEROP / vector["file"]).read_bytes()
    policy = _policy(vector)
    now = _instant(vector["verify_at"])
    if vector["expect"] != "valid_signature":
        with pytest.raises(InvalidAssertion) as caught:
            validate_assertion(raw, policy, now)
        # signature wrapping is caught by structure; a tampered, foreign-key or unsigned
        # assertion by the signature check itself
        expected = "wrapping" if vector["name"].startswith("attack_xsw") else "signature"
        assert caught.value.reason == expected, caught.value
        attacker = vector.get("attacker_subject")
        assert attacker is None or attacker not in caught.value.detail
        return
    if vector["name"] == "pyxmlsecurity_bare_assertion":
        # a valid signature from a test signer over an assertion with no SAML claims at all
        with pytest.raises(InvalidAssertion) as caught:
            validate_assertion(raw, policy, now)
        assert caught.value.reason == "issuer"
        return
    result = validate_assertion(raw, policy, now)
    assert result.id == vector["assertion_id"]
    assert result.issuer == vector["issuer"]
    assert result.subject == vector["subject"]
    assert list(result.audiences) == vector["audiences"]
    assert result.recipient == vector["recipient"]
    assert abs(result.not_on_or_after - _instant(vector["not_on_or_after"])) < timedelta(
        milliseconds=1
    )
    # What goes to the authorization server is one assertion whose signature still holds
    # on its own, whatever envelope the IdP put around it.
    alone = validate_assertion(result.raw, policy, now)
    assert (alone.id, alone.subject, alone.not_on_or_after) == (
        result.id,
        result.subject,
        result.not_on_or_after,
    )
    assert alone.raw == result.raw


def _vector(name: str) -> dict[str, Any]:
    return next(v for v in _vectors() if v["name"] == name)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        # gosaml2's OneLogin scenario 15: IssueInstant changed after signing
        (b'IssueInstant="2016-07-25T23:20:14.859Z"', b'IssueInstant="2016-07-25T23:20:15.859Z"'),
        (b'Destination="http://localhost:8080/v1/_saml_callback"', b'Destination="http://x/"'),
    ],
    ids=["issue-instant", "destination"],
)
def test_real_response_signature_altered_after_signing_is_refused(old: bytes, new: bytes) -> None:
    # Okta signs both the Response and the assertion; the assertion is left intact here.
    vector = _vector("okta_both_signed")
    raw = (INTEROP / vector["file"]).read_bytes()
    # the first occurrence is on the Response element, before the assertion begins
    assert -1 < raw.find(old) < raw.find(b"Assertion ")
    tampered = raw.replace(old, new, 1)
    with pytest.raises(InvalidAssertion) as caught:
        validate_assertion(tampered, _policy(vector), _instant(vector["verify_at"]))
    assert caught.value.reason == "signature"
    assert "Response" in caught.value.detail
