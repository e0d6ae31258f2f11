"""Every signature in the document verifies, and each follows the one transform profile.

A signed Response must hold its own signature even though the gateway reads nothing that
only it covers; a Reference's transforms are exactly [enveloped-signature, exclusive c14n].
Transform lists are re-signed here with the IdP's real key, so signxml on its own accepts
them: what refuses them is the profile check, before any verification.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from lxml import etree
from signxml.verifier import SignatureConfiguration, XMLVerifier

from gateway.devkit.idp import DS_NS, SAML_NS, SAMLP_NS, DemoIdP
from gateway.errors import InvalidAssertion
from gateway.saml import TrustPolicy, parse_xml, validate_assertion
from gateway.saml.xml import hardened_parser

from .helpers import AUDIENCE, NOW, RECIPIENT

DS = f"{{{DS_NS}}}"
SAMLP = f"{{{SAMLP_NS}}}"
ENVELOPED = "http://www.w3.org/2000/09/xmldsig#enveloped-signature"
EXC = "http://www.w3.org/2001/10/xml-exc-c14n#"
EXC_COMMENTS = "http://www.w3.org/2001/10/xml-exc-c14n#WithComments"
XPATH = "http://www.w3.org/TR/1999/REC-xpath-19991116"


def reason_of(raw: bytes, policy: TrustPolicy) -> str:
    with pytest.raises(InvalidAssertion) as caught:
        validate_assertion(raw, policy, NOW)
    return caught.value.reason


def signed_response(idp: DemoIdP, subject: str = "carol@example.test") -> etree._Element:
    """A signed Response around a signed assertion, parsed as the gateway parses it."""
    raw = idp.issue_response(
        subject, audience=AUDIENCE, recipient=RECIPIENT, now=NOW, sign_response=True
    )
    return parse_xml(raw)


def signed_assertion(idp: DemoIdP) -> etree._Element:
    raw = idp.issue("alice@example.test", audience=AUDIENCE, recipient=RECIPIENT, now=NOW)
    return parse_xml(raw)


def resign(idp: DemoIdP, signature: etree._Element) -> None:
    """A fresh SignatureValue over the (edited) SignedInfo, with the IdP's own RSA key."""
    key = idp.private_key
    if not isinstance(key, rsa.RSAPrivateKey):
        raise TypeError("resign() signs with RSA-SHA256")
    signed_info = signature.find(f"{DS}SignedInfo")
    data = etree.tostring(signed_info, method="c14n", exclusive=True)
    value = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    signature.find(f"{DS}SignatureValue").text = base64.b64encode(value).decode()


def set_transforms(
    idp: DemoIdP, signature: etree._Element, edit: Callable[[etree._Element], None]
) -> None:
    """Let ``edit`` rewrite the Reference (its Transforms), then re-sign SignedInfo."""
    edit(signature.find(f"{DS}SignedInfo/{DS}Reference"))
    resign(idp, signature)


def transforms(*algorithms: str) -> Callable[[etree._Element], None]:
    def edit(reference: etree._Element) -> None:
        container = reference.find(f"{DS}Transforms")
        for step in list(container):
            container.remove(step)
        for algorithm in algorithms:
            etree.SubElement(container, f"{DS}Transform", Algorithm=algorithm)

    return edit


def signxml_alone_accepts(raw: bytes, idp: DemoIdP) -> bool:
    """signxml's own verdict on the root's direct-child signature, with the pinned key."""
    try:
        XMLVerifier().verify(
            raw,
            x509_cert=idp.certificate,
            parser=hardened_parser(),
            expect_config=SignatureConfiguration(location="./", expect_references=1),
        )
    except Exception:  # any signxml refusal
        return False
    return True


# --- the Response's own signature -------------------------------------------------------


def test_untampered_signed_response_is_accepted(idp: DemoIdP, policy: TrustPolicy) -> None:
    raw = etree.tostring(signed_response(idp))
    assert signxml_alone_accepts(raw, idp)
    assert validate_assertion(raw, policy, NOW).subject == "carol@example.test"


def _set_issue_instant(response: etree._Element) -> None:
    response.set("IssueInstant", "2001-01-01T00:00:00.000Z")  # gosaml2 OneLogin scenario 15


def _set_destination(response: etree._Element) -> None:
    response.set("Destination", "https://elsewhere.example.test/acs")


def _add_attribute(response: etree._Element) -> None:
    response.set("Consent", "urn:oasis:names:tc:SAML:2.0:consent:obtained")


def _add_child(response: etree._Element) -> None:
    response.insert(2, etree.Element(f"{SAMLP}Extensions"))


def _edit_child(response: etree._Element) -> None:
    response.find(f"{{{SAML_NS}}}Issuer").text = "https://other-idp.example.test/"


def _remove_child(response: etree._Element) -> None:
    response.remove(response.find(f"{SAMLP}Status"))


@pytest.mark.parametrize(
    "tamper",
    [
        _set_issue_instant,
        _set_destination,
        _add_attribute,
        _add_child,
        _edit_child,
        _remove_child,
    ],
)
def test_response_altered_after_signing_is_refused(
    idp: DemoIdP, policy: TrustPolicy, tamper: Callable[[etree._Element], None]
) -> None:
    response = signed_response(idp)
    tamper(response)
    raw = etree.tostring(response)
    # The assertion inside is untouched and still verifies on its own…
    assertion = response.find(f"{{{SAML_NS}}}Assertion")
    assert validate_assertion(etree.tostring(assertion), policy, NOW).id
    # …but the Response's broken signature is evidence of tampering.
    with pytest.raises(InvalidAssertion) as caught:
        validate_assertion(raw, policy, NOW)
    assert caught.value.reason == "signature"
    assert "Response" in caught.value.detail


def test_valid_response_signature_does_not_cover_a_tampered_assertion(
    idp: DemoIdP, policy: TrustPolicy
) -> None:
    # The IdP (or an attacker holding nothing) edits the assertion, then the Response is
    # signed afresh: the assertion must still carry its own valid signature.
    assertion = signed_assertion(idp)
    name_id = assertion.find(f"{{{SAML_NS}}}Subject/{{{SAML_NS}}}NameID")
    name_id.text = "admin@example.test"
    envelope = idp.build_response([assertion], destination=RECIPIENT, now=NOW, placeholder=True)
    raw = etree.tostring(idp.sign(envelope))
    assert signxml_alone_accepts(raw, idp)  # the Response's signature is genuine
    assert reason_of(raw, policy) == "signature"


def test_response_signed_by_another_key_is_refused(
    idp: DemoIdP, attacker: DemoIdP, policy: TrustPolicy
) -> None:
    inner = signed_assertion(idp)
    envelope = idp.build_response([inner], destination=RECIPIENT, now=NOW, placeholder=True)
    raw = etree.tostring(attacker.sign(envelope))  # its own certificate in KeyInfo
    assert reason_of(raw, policy) == "signature"


def test_sha1_response_signature_needs_the_opt_in(
    idp: DemoIdP, make_policy: Callable[..., TrustPolicy]
) -> None:
    inner = signed_assertion(idp)  # RSA-SHA256
    envelope = idp.build_response([inner], destination=RECIPIENT, now=NOW, placeholder=True)
    raw = etree.tostring(idp.sign(envelope, algorithm="rsa-sha1"))
    assert reason_of(raw, make_policy()) == "algorithm"
    assert validate_assertion(raw, make_policy(allow_sha1=True), NOW).id


def test_response_signature_pointing_at_the_assertion_is_refused(
    idp: DemoIdP, policy: TrustPolicy
) -> None:
    response = signed_response(idp)
    assertion_id = response.find(f"{{{SAML_NS}}}Assertion").get("ID")
    signature = response.find(f"{DS}Signature")

    def point_at_assertion(reference: etree._Element) -> None:
        reference.set("URI", "#" + assertion_id)

    set_transforms(idp, signature, point_at_assertion)
    assert reason_of(etree.tostring(response), policy) == "wrapping"


def test_response_with_two_signatures_is_refused(idp: DemoIdP, policy: TrustPolicy) -> None:
    response = signed_response(idp)
    signature = response.find(f"{DS}Signature")
    signature.addnext(copy.deepcopy(signature))
    assert reason_of(etree.tostring(response), policy) == "wrapping"


def test_signed_response_without_an_id_is_refused(idp: DemoIdP, policy: TrustPolicy) -> None:
    response = signed_response(idp)
    del response.attrib["ID"]
    assert reason_of(etree.tostring(response), policy) == "malformed"


def test_response_transforms_follow_the_profile_too(idp: DemoIdP, policy: TrustPolicy) -> None:
    response = signed_response(idp)
    set_transforms(idp, response.find(f"{DS}Signature"), transforms(ENVELOPED, ENVELOPED, EXC))
    raw = etree.tostring(response)
    assert signxml_alone_accepts(raw, idp)
    assert reason_of(raw, policy) == "wrapping"


# --- the transform list -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithms", "reason", "genuine"),
    [
        ((ENVELOPED, ENVELOPED, EXC), "wrapping", True),  # duplicate (node-saml: too many)
        ((EXC, ENVELOPED), "wrapping", True),  # reordered: signxml runs enveloped first anyway
        ((ENVELOPED, EXC, XPATH), "algorithm", True),  # extra: signxml skips it silently
        ((XPATH, ENVELOPED, EXC), "algorithm", True),  # extra, first
        ((ENVELOPED,), "algorithm", True),  # the digest would use inclusive c14n
        # signxml crashes on a second canonicalization (TypeError): refused cleanly first
        ((ENVELOPED, EXC, EXC), "wrapping", False),
        ((ENVELOPED, EXC, EXC_COMMENTS), "algorithm", False),
    ],
    ids=[
        "dup-enveloped",
        "reordered",
        "extra-xpath",
        "xpath-first",
        "enveloped-only",
        "dup-exc",
        "extra-c14n",
    ],
)
def test_transform_list_other_than_the_profile_is_refused_before_verification(
    idp: DemoIdP, policy: TrustPolicy, algorithms: tuple[str, ...], reason: str, genuine: bool
) -> None:
    assertion = signed_assertion(idp)
    set_transforms(idp, assertion.find(f"{DS}Signature"), transforms(*algorithms))
    raw = etree.tostring(assertion)
    # Where signxml on its own accepts the signature, only the profile refuses it.
    assert signxml_alone_accepts(raw, idp) is genuine
    assert reason_of(raw, policy) == reason


@pytest.mark.parametrize("algorithms", [(), (EXC,)], ids=["empty", "exc-only"])
def test_transform_list_without_enveloped_is_refused(
    idp: DemoIdP, policy: TrustPolicy, algorithms: tuple[str, ...]
) -> None:
    # Without enveloped-signature the digest covers the signature itself: never valid, and
    # refused as a shape before signxml is asked.
    assertion = signed_assertion(idp)
    set_transforms(idp, assertion.find(f"{DS}Signature"), transforms(*algorithms))
    assert reason_of(etree.tostring(assertion), policy) == "wrapping"


def test_missing_transforms_element_is_refused(idp: DemoIdP, policy: TrustPolicy) -> None:
    assertion = signed_assertion(idp)

    def drop(reference: etree._Element) -> None:
        reference.remove(reference.find(f"{DS}Transforms"))

    set_transforms(idp, assertion.find(f"{DS}Signature"), drop)
    assert reason_of(etree.tostring(assertion), policy) == "wrapping"


def test_second_transforms_element_is_refused(idp: DemoIdP, policy: TrustPolicy) -> None:
    # signxml's schema check refuses it too; the profile says so before verifying.
    assertion = signed_assertion(idp)

    def duplicate(reference: etree._Element) -> None:
        container = reference.find(f"{DS}Transforms")
        second = copy.deepcopy(container)
        for step in second:
            step.set("Algorithm", XPATH)
        container.addnext(second)

    set_transforms(idp, assertion.find(f"{DS}Signature"), duplicate)
    raw = etree.tostring(assertion)
    assert not signxml_alone_accepts(raw, idp)
    assert reason_of(raw, policy) == "wrapping"


def _foreign_child(reference: etree._Element) -> None:
    etree.SubElement(reference.find(f"{DS}Transforms"), "{urn:example:evil}Transform")


def _enveloped_parameter(reference: etree._Element) -> None:
    step = reference.find(f"{DS}Transforms/{DS}Transform[@Algorithm='{ENVELOPED}']")
    etree.SubElement(step, f"{DS}XPath").text = "not(ancestor-or-self::saml:Subject)"


def _exc_parameter(reference: etree._Element) -> None:
    step = reference.find(f"{DS}Transforms/{DS}Transform[@Algorithm='{EXC}']")
    etree.SubElement(step, f"{DS}XPath").text = "true()"


def _inclusive_namespaces_extra_attribute(reference: etree._Element) -> None:
    step = reference.find(f"{DS}Transforms/{DS}Transform[@Algorithm='{EXC}']")
    etree.SubElement(step, f"{{{EXC}}}InclusiveNamespaces", PrefixList="xs", Other="1")


@pytest.mark.parametrize(
    ("edit", "genuine"),
    [
        (_foreign_child, False),  # signxml's schema check refuses it too
        (_enveloped_parameter, True),  # parameters signxml ignores
        (_exc_parameter, True),
        (_inclusive_namespaces_extra_attribute, True),
    ],
)
def test_transform_parameters_other_than_a_prefix_list_are_refused(
    idp: DemoIdP, policy: TrustPolicy, edit: Callable[[etree._Element], None], genuine: bool
) -> None:
    assertion = signed_assertion(idp)
    set_transforms(idp, assertion.find(f"{DS}Signature"), edit)
    raw = etree.tostring(assertion)
    assert signxml_alone_accepts(raw, idp) is genuine
    assert reason_of(raw, policy) == "wrapping"


def test_inclusive_namespaces_prefix_list_is_allowed(idp: DemoIdP, policy: TrustPolicy) -> None:
    # As Okta signs: exc-c14n with an InclusiveNamespaces PrefixList.
    assertion = signed_assertion(idp)

    def prefix_list(reference: etree._Element) -> None:
        step = reference.find(f"{DS}Transforms/{DS}Transform[@Algorithm='{EXC}']")
        etree.SubElement(step, f"{{{EXC}}}InclusiveNamespaces", PrefixList="xs saml")

    set_transforms(idp, assertion.find(f"{DS}Signature"), prefix_list)
    raw = etree.tostring(assertion)
    assert validate_assertion(raw, policy, NOW).subject == "alice@example.test"


def test_resigning_alone_keeps_a_valid_assertion_valid(idp: DemoIdP, policy: TrustPolicy) -> None:
    # The helper's own check: re-signing the profile's list changes nothing.
    assertion = signed_assertion(idp)
    set_transforms(idp, assertion.find(f"{DS}Signature"), transforms(ENVELOPED, EXC))
    assert validate_assertion(etree.tostring(assertion), policy, NOW).subject == (
        "alice@example.test"
    )
