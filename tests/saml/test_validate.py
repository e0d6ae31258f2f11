"""validate_assertion: each accept rule and each reject reason, with real keys and signatures."""

from __future__ import annotations

import copy
from datetime import timedelta

import pytest
from lxml import etree

from gateway.devkit.idp import DS_NS, SAML_NS, SAMLP_NS, DemoIdP
from gateway.errors import InvalidAssertion
from gateway.saml import TrustPolicy, assertion_digest, parse_xml, validate_assertion

from .helpers import AUDIENCE, ISSUER, NOW, RECIPIENT, IssueFn, PolicyFactory

SAML = f"{{{SAML_NS}}}"
DS = f"{{{DS_NS}}}"


def reason_of(raw: bytes, policy: TrustPolicy, now=NOW) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidAssertion) as caught:
        validate_assertion(raw, policy, now)
    return caught.value.reason


def signed_element(idp: DemoIdP, subject: str = "alice@example.test", **kw: object):  # type: ignore[no-untyped-def]
    unsigned = idp.build_assertion(
        subject,
        audience=AUDIENCE,
        recipient=RECIPIENT,
        now=NOW,
        **kw,  # type: ignore[arg-type]
    )
    return parse_xml(etree.tostring(idp.sign(unsigned)))


# --- accepted --------------------------------------------------------------------------


def test_bare_rsa_assertion_yields_signed_claims(issue: IssueFn, policy: TrustPolicy) -> None:
    raw = issue("alice@example.test", lifetime=300, assertion_id="_a1")
    result = validate_assertion(raw, policy, NOW)
    assert result.id == "_a1"
    assert result.issuer == ISSUER
    assert result.subject == "alice@example.test"
    assert result.audiences == (AUDIENCE,)
    assert result.recipient == RECIPIENT
    assert result.not_on_or_after == NOW + timedelta(seconds=300)
    assert result.digest == assertion_digest(raw)
    assert result.raw == raw


def test_ec_p256_assertion(ec_idp: DemoIdP, make_policy: PolicyFactory) -> None:
    raw = ec_idp.issue("bob@example.test", audience=AUDIENCE, recipient=RECIPIENT, now=NOW)
    assert validate_assertion(raw, make_policy(ec_idp), NOW).subject == "bob@example.test"


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "rsa-sha384", "rsa-sha512"])
def test_strong_rsa_algorithms(issue: IssueFn, policy: TrustPolicy, algorithm: str) -> None:
    assert validate_assertion(issue(algorithm=algorithm), policy, NOW).issuer == ISSUER


@pytest.mark.parametrize("algorithm", ["ecdsa-sha256", "ecdsa-sha384", "ecdsa-sha512"])
def test_strong_ecdsa_algorithms(
    ec_idp: DemoIdP, make_policy: PolicyFactory, algorithm: str
) -> None:
    raw = ec_idp.issue("b", audience=AUDIENCE, recipient=RECIPIENT, now=NOW, algorithm=algorithm)
    assert validate_assertion(raw, make_policy(ec_idp), NOW).subject == "b"


@pytest.mark.parametrize("sign_response", [False, True])
def test_response_with_one_signed_assertion(
    idp: DemoIdP, policy: TrustPolicy, sign_response: bool
) -> None:
    raw = idp.issue_response(
        "carol@example.test",
        audience=AUDIENCE,
        recipient=RECIPIENT,
        now=NOW,
        sign_response=sign_response,
    )
    result = validate_assertion(raw, policy, NOW)
    assert result.subject == "carol@example.test"
    assert result.digest == assertion_digest(raw)  # the cache binds to the presented bytes
    assert result.raw != raw  # the authorization server gets the assertion alone (below)


def _assert_raw_is_the_signed_assertion(presented: bytes, policy: TrustPolicy) -> None:
    """``raw`` is one saml:Assertion that validates alone, with the same claims."""
    result = validate_assertion(presented, policy, NOW)
    root = parse_xml(result.raw)
    assert root.tag == f"{SAML}Assertion"
    assert root.get("ID") == result.id
    assert root.find(f"{DS}Signature") is not None
    # Its own signature still verifies, so the authorization server can check it too.
    alone = validate_assertion(result.raw, policy, NOW)
    assert alone.raw == result.raw  # a bare assertion is sent exactly as given
    for name in ("id", "issuer", "subject", "audiences", "recipient", "not_on_or_after"):
        assert getattr(alone, name) == getattr(result, name), name
    assert result.digest == assertion_digest(presented)
    assert alone.digest != result.digest


@pytest.mark.parametrize("sign_response", [False, True])
def test_response_sends_only_its_signed_assertion(
    idp: DemoIdP, policy: TrustPolicy, sign_response: bool
) -> None:
    raw = idp.issue_response(
        "carol@example.test",
        audience=AUDIENCE,
        recipient=RECIPIENT,
        now=NOW,
        assertion_id="_inner",
        sign_response=sign_response,
    )
    _assert_raw_is_the_signed_assertion(raw, policy)
    sent = parse_xml(validate_assertion(raw, policy, NOW).raw)
    # Nothing of the unsigned envelope travels: no Status, no Destination, no Response.
    assert sent.get("ID") == "_inner"
    assert sent.find(f"{{{SAMLP_NS}}}Status") is None
    assert b"Response" not in validate_assertion(raw, policy, NOW).raw


def test_response_declaring_the_assertion_namespace_only_on_itself(
    idp: DemoIdP, policy: TrustPolicy
) -> None:
    # Real IdPs often declare xmlns:saml once, on the Response: the bytes sent on must carry
    # that declaration, or they would not even parse at the authorization server.
    signed = idp.issue("dave@example.test", audience=AUDIENCE, recipient=RECIPIENT, now=NOW)
    declaration = f' xmlns:saml="{SAML_NS}"'.encode()
    assert signed.count(declaration) == 1
    body = signed.replace(declaration, b"", 1)
    envelope = (
        f'<samlp:Response xmlns:samlp="{SAMLP_NS}" xmlns:saml="{SAML_NS}" ID="_r" Version="2.0"'
        f' IssueInstant="2020-01-01T00:00:00Z" Destination="{RECIPIENT}">'
        f'<samlp:Status><samlp:StatusCode Value="urn:oasis:names:tc:SAML:2.0:status:Success"/>'
        f"</samlp:Status>"
    )
    raw = envelope.encode() + body + b"</samlp:Response>"
    _assert_raw_is_the_signed_assertion(raw, policy)


def test_bare_assertion_is_sent_as_presented(issue: IssueFn, policy: TrustPolicy) -> None:
    # An XML declaration and all: the presented bytes go on unchanged.
    raw = b"<?xml version='1.0' encoding='UTF-8'?>\n" + issue()
    assert validate_assertion(raw, policy, NOW).raw == raw


def test_recipient_alias_is_accepted(issue: IssueFn, policy: TrustPolicy) -> None:
    raw = issue(recipient="https://alias.example.test/token")
    assert validate_assertion(raw, policy, NOW).recipient == "https://alias.example.test/token"


def test_key_rollover_any_pinned_key_verifies(
    idp: DemoIdP, ec_idp: DemoIdP, attacker: DemoIdP, make_policy: PolicyFactory
) -> None:
    policy = make_policy(attacker, ec_idp, idp)  # the signer's key is last
    raw = idp.issue("d", audience=AUDIENCE, recipient=RECIPIENT, now=NOW)
    assert validate_assertion(raw, policy, NOW).subject == "d"
    ec_raw = ec_idp.issue("e", audience=AUDIENCE, recipient=RECIPIENT, now=NOW)
    assert validate_assertion(ec_raw, policy, NOW).subject == "e"


def test_given_digest_is_used(issue: IssueFn, policy: TrustPolicy) -> None:
    assert validate_assertion(issue(), policy, NOW, digest=b"k" * 32).digest == b"k" * 32


def test_clock_skew_tolerates_small_drift(issue: IssueFn, make_policy: PolicyFactory) -> None:
    raw = issue(lifetime=60)
    policy = make_policy(clock_skew=timedelta(seconds=120))
    # NotBefore is NOW-5s: a clock 100 s behind still accepts; 100 s past expiry too
    assert validate_assertion(raw, policy, NOW - timedelta(seconds=100)).id
    assert validate_assertion(raw, policy, NOW + timedelta(seconds=160)).id
    strict = make_policy(clock_skew=timedelta(0))
    assert reason_of(raw, strict, NOW - timedelta(seconds=100)) == "not_yet_valid"
    assert reason_of(raw, strict, NOW + timedelta(seconds=60)) == "expired"


def test_comment_in_name_id_keeps_the_full_subject(issue: IssueFn, policy: TrustPolicy) -> None:
    raw = issue("paul@example.test")
    commented = raw.replace(b">paul@example.test<", b">paul@<!-- a comment -->example.test<")
    assert commented != raw
    assert validate_assertion(commented, policy, NOW).subject == "paul@example.test"


# --- refused: signature ------------------------------------------------------------------


def test_unsigned_assertion_is_refused(idp: DemoIdP, policy: TrustPolicy) -> None:
    unsigned = idp.build_assertion(
        "a", audience=AUDIENCE, recipient=RECIPIENT, now=NOW, placeholder=False
    )
    assert reason_of(etree.tostring(unsigned), policy) == "signature"


def test_signed_response_around_unsigned_assertion_is_refused(
    idp: DemoIdP, policy: TrustPolicy
) -> None:
    raw = idp.issue_response(
        "a",
        audience=AUDIENCE,
        recipient=RECIPIENT,
        now=NOW,
        sign_assertion=False,
        sign_response=True,
    )
    assert reason_of(raw, policy) == "signature"


def test_signed_then_edited_name_id_is_refused(issue: IssueFn, policy: TrustPolicy) -> None:
    raw = issue("alice@example.test")
    assert reason_of(raw.replace(b"alice@example.test", b"admin@example.test"), policy) == (
        "signature"
    )


def test_text_appended_after_a_comment_is_refused(issue: IssueFn, policy: TrustPolicy) -> None:
    raw = issue("paul@example.test")
    injected = raw.replace(b">paul@example.test<", b">paul@example.test<!---->.evil.test<")
    assert reason_of(injected, policy) == "signature"


def test_certificate_swap_is_refused(idp: DemoIdP, attacker: DemoIdP, policy: TrustPolicy) -> None:
    # Attacker signs with its own key and puts its own certificate in KeyInfo.
    raw = attacker.issue("admin@example.test", audience=AUDIENCE, recipient=RECIPIENT, now=NOW)
    assert attacker.certificate_pem != idp.certificate_pem
    assert reason_of(raw, policy) == "signature"


def test_expired_pinned_certificate_is_refused(make_policy: PolicyFactory) -> None:
    old = DemoIdP.generate(
        ISSUER, "ec", not_before=NOW - timedelta(days=20), not_after=NOW - timedelta(days=10)
    )
    raw = old.issue("a", audience=AUDIENCE, recipient=RECIPIENT, now=NOW)
    assert reason_of(raw, make_policy(old)) == "signature"


# --- refused: wrapping -----------------------------------------------------------------


def _evil(idp: DemoIdP, assertion_id: str | None = None) -> etree._Element:
    return idp.build_assertion(
        "admin@example.test",
        audience=AUDIENCE,
        recipient=RECIPIENT,
        now=NOW,
        placeholder=False,
        assertion_id=assertion_id,
    )


def test_xsw_evil_assertion_wraps_signed_one_in_advice(idp: DemoIdP, policy: TrustPolicy) -> None:
    genuine = signed_element(idp)
    evil = _evil(idp)
    evil.insert(1, copy.deepcopy(genuine.find(f"{DS}Signature")))
    advice = etree.SubElement(evil, f"{SAML}Advice")
    advice.append(genuine)
    assert reason_of(etree.tostring(evil), policy) == "wrapping"


def test_xsw_signed_assertion_hidden_in_ds_object(idp: DemoIdP, policy: TrustPolicy) -> None:
    genuine = signed_element(idp)
    signature = copy.deepcopy(genuine.find(f"{DS}Signature"))
    etree.SubElement(signature, f"{DS}Object").append(genuine)
    evil = _evil(idp)
    evil.insert(1, signature)
    assert reason_of(etree.tostring(evil), policy) == "wrapping"


@pytest.mark.parametrize("evil_first", [True, False])
def test_xsw_evil_sibling_in_response(idp: DemoIdP, policy: TrustPolicy, evil_first: bool) -> None:
    genuine = signed_element(idp)
    pair = [_evil(idp), genuine] if evil_first else [genuine, _evil(idp)]
    response = idp.build_response(pair, destination=RECIPIENT, now=NOW)
    assert reason_of(etree.tostring(response), policy) == "wrapping"


def test_xsw_duplicate_id_elsewhere_in_response(idp: DemoIdP, policy: TrustPolicy) -> None:
    genuine = signed_element(idp)
    response = idp.build_response([genuine], destination=RECIPIENT, now=NOW)
    extensions = etree.Element(f"{{{SAMLP_NS}}}Extensions", ID=genuine.get("ID"))
    response.insert(1, extensions)
    assert reason_of(etree.tostring(response), policy) == "wrapping"


def test_xsw_evil_assertion_reusing_the_signed_id(idp: DemoIdP, policy: TrustPolicy) -> None:
    genuine = signed_element(idp)
    evil = _evil(idp, assertion_id=genuine.get("ID"))
    response = idp.build_response([genuine, evil], destination=RECIPIENT, now=NOW)
    assert reason_of(etree.tostring(response), policy) == "wrapping"


def test_signature_referencing_another_element_is_refused(
    idp: DemoIdP, policy: TrustPolicy
) -> None:
    genuine = signed_element(idp)
    evil = _evil(idp)
    evil.insert(1, copy.deepcopy(genuine.find(f"{DS}Signature")))  # URI="#<genuine ID>"
    assert reason_of(etree.tostring(evil), policy) == "wrapping"


def test_signature_not_a_direct_child_is_refused(idp: DemoIdP, policy: TrustPolicy) -> None:
    genuine = signed_element(idp)
    signature = genuine.find(f"{DS}Signature")
    genuine.find(f"{SAML}Subject").append(signature)  # moved one level down
    assert reason_of(etree.tostring(genuine), policy) == "wrapping"


def test_two_references_are_refused(idp: DemoIdP, policy: TrustPolicy) -> None:
    genuine = signed_element(idp)
    signed_info = genuine.find(f"{DS}Signature/{DS}SignedInfo")
    signed_info.append(copy.deepcopy(signed_info.find(f"{DS}Reference")))
    assert reason_of(etree.tostring(genuine), policy) == "wrapping"


# --- refused: algorithm ----------------------------------------------------------------


def test_sha1_is_refused_unless_the_idp_opts_in(issue: IssueFn, make_policy: PolicyFactory) -> None:
    raw = issue(algorithm="rsa-sha1")
    assert reason_of(raw, make_policy()) == "algorithm"
    assert validate_assertion(raw, make_policy(allow_sha1=True), NOW).issuer == ISSUER


def test_transform_outside_the_allow_list_is_refused(idp: DemoIdP, policy: TrustPolicy) -> None:
    genuine = signed_element(idp)
    transform = genuine.find(
        f"{DS}Signature/{DS}SignedInfo/{DS}Reference/{DS}Transforms/{DS}Transform"
    )
    transform.set("Algorithm", "http://www.w3.org/TR/1999/REC-xpath-19991116")
    assert reason_of(etree.tostring(genuine), policy) == "algorithm"


def test_weak_rsa_key_is_refused_unless_the_idp_lowers_the_minimum(
    make_policy: PolicyFactory,
) -> None:
    weak = DemoIdP.generate(ISSUER, "rsa", rsa_bits=1024)
    raw = weak.issue("a", audience=AUDIENCE, recipient=RECIPIENT, now=NOW)
    assert reason_of(raw, make_policy(weak)) == "algorithm"
    assert validate_assertion(raw, make_policy(weak, min_rsa_key_bits=1024), NOW).subject == "a"


# --- refused: SAML conditions ----------------------------------------------------------


def test_expired_assertion(issue: IssueFn, policy: TrustPolicy) -> None:
    assert reason_of(issue(lifetime=60), policy, NOW + timedelta(seconds=300)) == "expired"


def test_not_yet_valid_assertion(issue: IssueFn, policy: TrustPolicy) -> None:
    assert reason_of(issue(), policy, NOW - timedelta(seconds=600)) == "not_yet_valid"


def _signed_with(idp: DemoIdP, edit) -> bytes:  # type: ignore[no-untyped-def]
    unsigned = idp.build_assertion("a", audience=AUDIENCE, recipient=RECIPIENT, now=NOW)
    edit(unsigned)
    return etree.tostring(idp.sign(unsigned))


def test_expired_bearer_confirmation_alone(idp: DemoIdP, policy: TrustPolicy) -> None:
    def edit(a: etree._Element) -> None:
        data = a.find(f"{SAML}Subject/{SAML}SubjectConfirmation/{SAML}SubjectConfirmationData")
        data.set("NotOnOrAfter", "2001-01-01T00:00:00Z")

    assert reason_of(_signed_with(idp, edit), policy) == "expired"


def test_wrong_audience(issue: IssueFn, policy: TrustPolicy) -> None:
    assert reason_of(issue(audience="https://other.example.test"), policy) == "audience"


def test_missing_conditions_means_no_audience(idp: DemoIdP, policy: TrustPolicy) -> None:
    def edit(a: etree._Element) -> None:
        a.remove(a.find(f"{SAML}Conditions"))

    assert reason_of(_signed_with(idp, edit), policy) == "audience"


def test_unknown_issuer(idp: DemoIdP, make_policy: PolicyFactory) -> None:
    raw = idp.issue("a", audience=AUDIENCE, recipient=RECIPIENT, now=NOW)
    assert reason_of(raw, make_policy(issuers=frozenset({"https://other.idp"}))) == "issuer"


def test_wrong_recipient(issue: IssueFn, policy: TrustPolicy) -> None:
    assert reason_of(issue(recipient="https://evil.example.test/token"), policy) == "recipient"


def test_no_bearer_confirmation(idp: DemoIdP, policy: TrustPolicy) -> None:
    def edit(a: etree._Element) -> None:
        confirmation = a.find(f"{SAML}Subject/{SAML}SubjectConfirmation")
        confirmation.set("Method", "urn:oasis:names:tc:SAML:2.0:cm:holder-of-key")

    assert reason_of(_signed_with(idp, edit), policy) == "subject_confirmation"


def test_bearer_confirmation_without_not_on_or_after(idp: DemoIdP, policy: TrustPolicy) -> None:
    def edit(a: etree._Element) -> None:
        data = a.find(f"{SAML}Subject/{SAML}SubjectConfirmation/{SAML}SubjectConfirmationData")
        del data.attrib["NotOnOrAfter"]

    assert reason_of(_signed_with(idp, edit), policy) == "subject_confirmation"


@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        ("NotBefore", "0001-01-01T00:00:00+14:00"),
        ("NotOnOrAfter", "9999-12-31T23:59:59-14:00"),
    ],
)
def test_signed_instant_beyond_the_datetime_range_is_malformed(
    idp: DemoIdP, policy: TrustPolicy, attribute: str, value: str
) -> None:
    # The offset moves these instants past year 1 or 9999: no datetime holds them, and the
    # request must be refused as malformed rather than fail with an OverflowError.
    def edit(a: etree._Element) -> None:
        a.find(f"{SAML}Conditions").set(attribute, value)

    with pytest.raises(InvalidAssertion) as caught:
        validate_assertion(_signed_with(idp, edit), policy, NOW)
    assert caught.value.reason == "malformed"
    assert value not in caught.value.detail


# --- refused: malformed and hostile XML -------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"not xml at all",
        b"<saml:Assertion xmlns:saml='urn:oasis:names:tc:SAML:2.0:assertion'>",
        b"<Other/>",
        f"<samlp:Response xmlns:samlp='{SAMLP_NS}' ID='r'/>".encode(),
        f"<saml:Assertion xmlns:saml='{SAML_NS}' Version='2.0'/>".encode(),
    ],
    ids=["text", "unclosed", "foreign-root", "empty-response", "no-id"],
)
def test_malformed_documents(raw: bytes, policy: TrustPolicy) -> None:
    assert reason_of(raw, policy) == "malformed"


def test_xxe_external_file_entity(policy: TrustPolicy) -> None:
    raw = (
        b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
        b'<saml:Assertion xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion" ID="x">'
        b"&xxe;</saml:Assertion>"
    )
    assert reason_of(raw, policy) == "dtd"


def test_xxe_parameter_entity(policy: TrustPolicy) -> None:
    raw = (
        b'<!DOCTYPE a [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]>'
        b'<saml:Assertion xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion" ID="x"/>'
    )
    assert reason_of(raw, policy) == "dtd"


def test_billion_laughs(policy: TrustPolicy) -> None:
    entities = "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10))
    raw = f'<!DOCTYPE a [<!ENTITY l0 "lol">{entities}]><a>&l9;</a>'.encode()
    assert reason_of(raw, policy) == "dtd"


def test_doctype_in_a_signed_assertion_is_refused(issue: IssueFn, policy: TrustPolicy) -> None:
    raw = issue()
    assert reason_of(b"<!DOCTYPE saml:Assertion>" + raw, policy) == "dtd"


def test_detail_never_quotes_the_document(issue: IssueFn, policy: TrustPolicy) -> None:
    raw = issue("secret-subject@example.test").replace(b"secret-subject", b"secret-subjecX")
    with pytest.raises(InvalidAssertion) as caught:
        validate_assertion(raw, policy, NOW)
    assert caught.value.reason == "signature"
    assert "secret" not in str(caught.value)
    assert "BEGIN" not in caught.value.detail and "MII" not in caught.value.detail
