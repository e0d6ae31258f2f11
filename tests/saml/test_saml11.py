"""SAML 1.1 assertions (AD FS, WS-Trust): only where the IdP opts in, as strictly as 2.0."""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import timedelta

import pytest
from lxml import etree

from gateway.devkit.idp import DS_NS, SAML1_NS, DemoIdP
from gateway.errors import InvalidAssertion
from gateway.saml import TrustPolicy, assertion_digest, parse_xml, validate_assertion
from gateway.saml.evidence import Evidence

from .helpers import AUDIENCE, ISSUER, NOW, PolicyFactory

S1 = f"{{{SAML1_NS}}}"
DS = f"{{{DS_NS}}}"
BOTH = frozenset({"1.1", "2.0"})


@pytest.fixture
def policy11(make_policy: PolicyFactory) -> TrustPolicy:
    return make_policy(saml_versions=BOTH)


def reason_of(raw: bytes, policy: TrustPolicy, now=NOW) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidAssertion) as caught:
        validate_assertion(raw, policy, now)
    return caught.value.reason


def unsigned(idp: DemoIdP, subject: str = "john@example.test", **kw: object) -> etree._Element:
    return idp.build_saml11_assertion(subject, audience=AUDIENCE, now=NOW, **kw)  # type: ignore[arg-type]


def signed_element(idp: DemoIdP, subject: str = "john@example.test", **kw: object):  # type: ignore[no-untyped-def]
    return parse_xml(etree.tostring(idp.sign(unsigned(idp, subject, **kw))))


def signed_with(idp: DemoIdP, edit: Callable[[etree._Element], None]) -> bytes:
    element = unsigned(idp)
    edit(element)
    return etree.tostring(idp.sign(element))


# --- accepted ----------------------------------------------------------------------------


def test_saml11_assertion_yields_signed_claims(idp: DemoIdP, policy11: TrustPolicy) -> None:
    raw = idp.issue_saml11("john@example.test", audience=AUDIENCE, now=NOW, assertion_id="_s11")
    result = validate_assertion(raw, policy11, NOW)
    assert result.saml_version == "1.1"
    assert result.id == "_s11"
    assert result.issuer == ISSUER
    assert result.subject == "john@example.test"
    assert result.audiences == (AUDIENCE,)
    # SAML 1.1 has no Recipient: the audience that was matched stands in for it.
    assert result.recipient == AUDIENCE
    assert result.not_on_or_after == NOW + timedelta(seconds=300)
    assert result.digest == assertion_digest(raw)
    assert result.raw == raw  # the token request carries the assertion as presented


def test_saml20_keeps_its_version(idp: DemoIdP, policy11: TrustPolicy) -> None:
    raw = idp.issue(
        "a", audience=AUDIENCE, recipient="https://as.example.test/oauth2/v1/token", now=NOW
    )
    assert validate_assertion(raw, policy11, NOW).saml_version == "2.0"


@pytest.mark.parametrize(
    "statements",
    [("AuthenticationStatement",), ("AttributeStatement",), ("AuthorizationDecisionStatement",)],
)
def test_any_subject_statement_carries_the_subject(
    idp: DemoIdP, policy11: TrustPolicy, statements: tuple[str, ...]
) -> None:
    raw = etree.tostring(idp.sign(unsigned(idp, statements=statements)))
    assert validate_assertion(raw, policy11, NOW).subject == "john@example.test"


def test_ec_signed_saml11(ec_idp: DemoIdP, make_policy: PolicyFactory) -> None:
    raw = ec_idp.issue_saml11("e", audience=AUDIENCE, now=NOW)
    assert validate_assertion(raw, make_policy(ec_idp, saml_versions=BOTH), NOW).subject == "e"


def test_byte_variants_share_the_fingerprint(idp: DemoIdP, policy11: TrustPolicy) -> None:
    raw = idp.issue_saml11("j", audience=AUDIENCE, now=NOW)
    variant = b"<?xml version='1.0'?>\n" + raw
    first, second = (validate_assertion(r, policy11, NOW) for r in (raw, variant))
    assert first.fingerprint == second.fingerprint and first.digest != second.digest


def test_explain_says_what_stands_in_for_the_recipient(idp: DemoIdP, policy11: TrustPolicy) -> None:
    evidence = Evidence()
    validate_assertion(
        idp.issue_saml11("j", audience=AUDIENCE, now=NOW), policy11, NOW, evidence=evidence
    )
    recipient = next(c for c in evidence.checks if c.name == "recipient")
    assert "audience stands in" in recipient.expected and AUDIENCE in recipient.found
    assert all(c.passed for c in evidence.checks)
    assert not any("j" == c.found for c in evidence.checks)  # the NameIdentifier is not shown


# --- the opt-in ----------------------------------------------------------------------------


def test_saml11_refused_for_an_idp_that_did_not_opt_in(
    idp: DemoIdP, make_policy: PolicyFactory
) -> None:
    raw = idp.issue_saml11("john@example.test", audience=AUDIENCE, now=NOW)
    assert reason_of(raw, make_policy()) == "version"  # the default is ("2.0",)
    assert validate_assertion(raw, make_policy(saml_versions=BOTH), NOW).id


def test_saml20_refused_for_an_idp_that_accepts_only_11(
    idp: DemoIdP, make_policy: PolicyFactory
) -> None:
    raw = idp.issue(
        "a", audience=AUDIENCE, recipient="https://as.example.test/oauth2/v1/token", now=NOW
    )
    assert reason_of(raw, make_policy(saml_versions=frozenset({"1.1"}))) == "version"


def test_saml10_is_not_saml11(idp: DemoIdP, policy11: TrustPolicy) -> None:
    assert (
        reason_of(signed_with(idp, lambda a: a.set("MinorVersion", "0")), policy11) == "malformed"
    )


# --- refused: signature and algorithm -------------------------------------------------------


def test_unsigned_saml11_is_refused(idp: DemoIdP, policy11: TrustPolicy) -> None:
    assert reason_of(etree.tostring(unsigned(idp)), policy11) == "signature"


def test_edited_name_identifier_is_refused(idp: DemoIdP, policy11: TrustPolicy) -> None:
    raw = idp.issue_saml11("john@example.test", audience=AUDIENCE, now=NOW)
    edited = raw.replace(b">john@example.test<", b">admin@example.test<")
    assert edited != raw
    assert reason_of(edited, policy11) == "signature"


def test_edited_issuer_attribute_is_refused(idp: DemoIdP, make_policy: PolicyFactory) -> None:
    raw = idp.issue_saml11("j", audience=AUDIENCE, now=NOW)
    other = "https://other.example.test/adfs"
    policy = make_policy(saml_versions=BOTH, issuers=frozenset({ISSUER, other}))
    assert reason_of(raw.replace(ISSUER.encode(), other.encode()), policy) == "signature"


def test_foreign_key_is_refused(attacker: DemoIdP, policy11: TrustPolicy) -> None:
    raw = attacker.issue_saml11("admin@example.test", audience=AUDIENCE, now=NOW)
    assert reason_of(raw, policy11) == "signature"


def test_sha1_is_refused_by_default(idp: DemoIdP, make_policy: PolicyFactory) -> None:
    raw = idp.issue_saml11("j", audience=AUDIENCE, now=NOW, algorithm="rsa-sha1")
    assert reason_of(raw, make_policy(saml_versions=BOTH)) == "algorithm"
    assert validate_assertion(raw, make_policy(saml_versions=BOTH, allow_sha1=True), NOW).id


def test_reference_to_another_id_is_refused(idp: DemoIdP, policy11: TrustPolicy) -> None:
    genuine = signed_element(idp)
    genuine.set("AssertionID", "_renamed")  # the Reference still names the signed ID
    assert reason_of(etree.tostring(genuine), policy11) == "wrapping"


def test_inclusive_c14n_is_refused(idp: DemoIdP, policy11: TrustPolicy) -> None:
    genuine = signed_element(idp)
    method = genuine.find(f"{DS}Signature/{DS}SignedInfo/{DS}CanonicalizationMethod")
    method.set("Algorithm", "http://www.w3.org/TR/2001/REC-xml-c14n-20010315")
    assert reason_of(etree.tostring(genuine), policy11) == "algorithm"


# --- refused: wrapping (the 2.0 constructions, rebuilt for 1.1) -----------------------------


def _evil(idp: DemoIdP, assertion_id: str | None = None) -> etree._Element:
    return unsigned(idp, "admin@example.test", assertion_id=assertion_id)


def test_xsw_evil_assertion_first_wrapping_the_signed_one(
    idp: DemoIdP, policy11: TrustPolicy
) -> None:
    genuine = signed_element(idp)
    evil = _evil(idp)
    evil.append(copy.deepcopy(genuine.find(f"{DS}Signature")))
    # The evil assertion is the document; the signed one rides inside it, first in line.
    evil.insert(0, genuine)
    assert reason_of(etree.tostring(evil), policy11) == "wrapping"


def test_xsw_signature_moved_to_the_evil_assertion(idp: DemoIdP, policy11: TrustPolicy) -> None:
    genuine = signed_element(idp)
    evil = _evil(idp)
    evil.append(genuine.find(f"{DS}Signature"))  # moved, its Reference still #<genuine ID>
    assert reason_of(etree.tostring(evil), policy11) == "wrapping"


def test_xsw_signature_moved_into_a_statement(idp: DemoIdP, policy11: TrustPolicy) -> None:
    genuine = signed_element(idp)
    genuine.find(f"{S1}AttributeStatement").append(genuine.find(f"{DS}Signature"))
    assert reason_of(etree.tostring(genuine), policy11) == "wrapping"


def test_xsw_same_assertion_id_twice(idp: DemoIdP, policy11: TrustPolicy) -> None:
    genuine = signed_element(idp)
    evil = _evil(idp, assertion_id=genuine.get("AssertionID"))
    evil.append(copy.deepcopy(genuine.find(f"{DS}Signature")))
    # An element elsewhere with the signed ID: the Reference could resolve to either.
    conditions = evil.find(f"{S1}Conditions")
    etree.SubElement(conditions, f"{S1}DoNotCacheCondition", AssertionID=genuine.get("AssertionID"))
    assert reason_of(etree.tostring(evil), policy11) == "wrapping"


def test_xsw_duplicate_id_under_another_attribute_name(idp: DemoIdP, policy11: TrustPolicy) -> None:
    genuine = signed_element(idp)
    genuine.find(f"{S1}Conditions").set("ID", genuine.get("AssertionID"))
    assert reason_of(etree.tostring(genuine), policy11) == "wrapping"


def test_xsw_signed_assertion_nested_in_advice(idp: DemoIdP, policy11: TrustPolicy) -> None:
    genuine = signed_element(idp)
    evil = _evil(idp)
    evil.append(copy.deepcopy(genuine.find(f"{DS}Signature")))
    advice = etree.Element(f"{S1}Advice")
    advice.append(genuine)
    evil.insert(1, advice)  # SAML 1.1 Advice sits after Conditions
    assert reason_of(etree.tostring(evil), policy11) == "wrapping"


def test_saml20_assertion_hidden_in_saml11_advice(idp: DemoIdP, policy11: TrustPolicy) -> None:
    # One assertion of each version: a second identity, whatever its namespace.
    inner = idp.build_assertion(
        "admin@example.test", audience=AUDIENCE, recipient="r", now=NOW, placeholder=False
    )

    def edit(a: etree._Element) -> None:
        etree.SubElement(a, f"{S1}Advice").append(inner)
        a.insert(1, a[-1])

    assert reason_of(signed_with(idp, edit), policy11) == "wrapping"


# --- refused: SAML conditions -------------------------------------------------------------


def test_expired(idp: DemoIdP, policy11: TrustPolicy) -> None:
    raw = idp.issue_saml11("j", audience=AUDIENCE, now=NOW, lifetime=60)
    assert reason_of(raw, policy11, NOW + timedelta(seconds=300)) == "expired"
    assert validate_assertion(raw, policy11, NOW + timedelta(seconds=150)).id  # within skew


def test_not_yet_valid(idp: DemoIdP, policy11: TrustPolicy) -> None:
    raw = idp.issue_saml11("j", audience=AUDIENCE, now=NOW)
    assert reason_of(raw, policy11, NOW - timedelta(seconds=600)) == "not_yet_valid"


def test_an_expiry_is_required(idp: DemoIdP, policy11: TrustPolicy) -> None:
    def edit(a: etree._Element) -> None:
        del a.find(f"{S1}Conditions").attrib["NotOnOrAfter"]

    with pytest.raises(InvalidAssertion) as caught:
        validate_assertion(signed_with(idp, edit), policy11, NOW)
    assert caught.value.reason == "malformed"
    assert caught.value.check == "Conditions NotOnOrAfter"


def test_wrong_audience(idp: DemoIdP, policy11: TrustPolicy) -> None:
    raw = idp.issue_saml11("j", audience="urn:federation:other", now=NOW)
    assert reason_of(raw, policy11) == "audience"


def test_no_audience_restriction(idp: DemoIdP, policy11: TrustPolicy) -> None:
    def edit(a: etree._Element) -> None:
        conditions = a.find(f"{S1}Conditions")
        conditions.remove(conditions.find(f"{S1}AudienceRestrictionCondition"))

    assert reason_of(signed_with(idp, edit), policy11) == "audience"


def test_no_conditions(idp: DemoIdP, policy11: TrustPolicy) -> None:
    assert reason_of(signed_with(idp, lambda a: a.remove(a.find(f"{S1}Conditions"))), policy11) == (
        "audience"
    )


def test_unknown_issuer(idp: DemoIdP, make_policy: PolicyFactory) -> None:
    raw = idp.issue_saml11("j", audience=AUDIENCE, now=NOW)
    policy = make_policy(saml_versions=BOTH, issuers=frozenset({"https://other.idp"}))
    assert reason_of(raw, policy) == "issuer"


def test_no_issuer_attribute(idp: DemoIdP, policy11: TrustPolicy) -> None:
    assert reason_of(signed_with(idp, lambda a: a.attrib.pop("Issuer")), policy11) == "issuer"


def test_statement_without_bearer_confirmation(idp: DemoIdP, policy11: TrustPolicy) -> None:
    def edit(a: etree._Element) -> None:
        # One of the two statements is holder-of-key: every one must be bearer.
        method = a.find(
            f"{S1}AuthenticationStatement/{S1}Subject/{S1}SubjectConfirmation/{S1}ConfirmationMethod"
        )
        method.text = "urn:oasis:names:tc:SAML:1.0:cm:holder-of-key"

    assert reason_of(signed_with(idp, edit), policy11) == "subject_confirmation"


def test_statement_without_subject_confirmation(idp: DemoIdP, policy11: TrustPolicy) -> None:
    def edit(a: etree._Element) -> None:
        subject = a.find(f"{S1}AttributeStatement/{S1}Subject")
        subject.remove(subject.find(f"{S1}SubjectConfirmation"))

    assert reason_of(signed_with(idp, edit), policy11) == "subject_confirmation"


def test_statements_naming_different_subjects(idp: DemoIdP, policy11: TrustPolicy) -> None:
    def edit(a: etree._Element) -> None:
        a.find(f"{S1}AuthenticationStatement/{S1}Subject/{S1}NameIdentifier").text = "admin@x"

    assert reason_of(signed_with(idp, edit), policy11) == "malformed"


def test_no_statement(idp: DemoIdP, policy11: TrustPolicy) -> None:
    raw = etree.tostring(idp.sign(unsigned(idp, statements=())))
    assert reason_of(raw, policy11) == "subject_confirmation"


def test_structured_name_identifier(idp: DemoIdP, policy11: TrustPolicy) -> None:
    def edit(a: etree._Element) -> None:
        name = a.find(f"{S1}AttributeStatement/{S1}Subject/{S1}NameIdentifier")
        etree.SubElement(name, f"{S1}Extra").text = "x"

    assert reason_of(signed_with(idp, edit), policy11) == "malformed"


def test_comment_in_name_identifier_keeps_the_full_subject(
    idp: DemoIdP, policy11: TrustPolicy
) -> None:
    raw = idp.issue_saml11("paul@example.test", audience=AUDIENCE, now=NOW)
    commented = raw.replace(b">paul@example.test<", b">paul@<!-- x -->example.test<")
    assert commented.count(b"<!-- x -->") == 3  # both NameIdentifiers and the email attribute
    assert validate_assertion(commented, policy11, NOW).subject == "paul@example.test"


# --- configuration ----------------------------------------------------------------------------


def _idp_config(tmp_path, idp: DemoIdP, **fields: object) -> dict[str, object]:  # type: ignore[no-untyped-def]
    idp.write_certificate(tmp_path / "idp.pem")
    return {
        "identity_providers": {"adfs": {"issuer": ISSUER, "certificates": ["idp.pem"], **fields}},
        "authorization_servers": {
            "as": {
                "token_url": "https://as.example.test/token",
                "client_auth": "none",
                "audience": AUDIENCE,
                "grant": "token-exchange",  # carries SAML 1.1 and 2.0 alike
            }
        },
        "routes": [
            {
                "upstream": "http://127.0.0.1:1",
                "identity_provider": "adfs",
                "authorization_server": "as",
            }
        ],
    }


def test_saml_versions_default_and_yaml_numbers(tmp_path, idp: DemoIdP) -> None:  # type: ignore[no-untyped-def]
    from gateway.config import parse_config

    default = parse_config(_idp_config(tmp_path, idp), tmp_path)
    assert default.identity_providers["adfs"].saml_versions == ("2.0",)
    # unquoted in YAML, 1.1 and 2.0 are numbers: they mean the versions they spell
    both = parse_config(_idp_config(tmp_path, idp, saml_versions=[1.1, 2.0]), tmp_path)
    assert both.identity_providers["adfs"].saml_versions == ("1.1", "2.0")


@pytest.mark.parametrize("versions", [["1.0"], [], ["2.0", "2.0"], ["3"]])
def test_bad_saml_versions_name_the_key(tmp_path, idp: DemoIdP, versions: list[str]) -> None:  # type: ignore[no-untyped-def]
    from gateway.config import parse_config
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        parse_config(_idp_config(tmp_path, idp, saml_versions=versions), tmp_path)
    assert "identity_providers.adfs.saml_versions" in str(caught.value)


def test_doctype_in_a_signed_saml11_assertion_is_refused(
    idp: DemoIdP, policy11: TrustPolicy
) -> None:
    raw = idp.issue_saml11("j", audience=AUDIENCE, now=NOW)
    assert reason_of(b'<!DOCTYPE a [<!ENTITY e "x">]>' + raw, policy11) == "dtd"
