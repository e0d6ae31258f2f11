"""Decide whether one decoded SAML document carries an assertion we accept.

Rules this module owns (each check below names the attack it stops):
- Exactly one assertion (SAML 2.0 or 1.1) in the whole document, either the root or the only
  assertion child of a ``samlp:Response``; the assertion itself carries the signature.
- A SAML 1.1 assertion (AD FS, WS-Trust) only for an IdP that opts in (``saml_versions``),
  under the same rules: one place per rule, a version only says where SAML put each value
  (``AssertionID``, the ``Issuer`` attribute, ``AudienceRestrictionCondition``, a Subject
  per statement). SAML 1.1 has no Recipient: the audience stands in for it.
- A ``saml:EncryptedAssertion`` (bare or the only one in a ``samlp:Response``) is opened
  with the IdP's decryption keys (``decrypt``), and what it held is parsed by the one
  hardened parser and must pass every rule here as if presented bare: signed, by itself.
- The signature is pinned: a direct child of that assertion, one Reference to ``#<its ID>``,
  transforms exactly [enveloped-signature, exclusive c14n], no ``ds:Object``, allowed
  algorithms only; verified by signxml against the pinned keys only.
- A ``samlp:Response`` that carries its own signature must pass the same profile (Reference
  to ``#<Response ID>``) and verify with the same keys: a broken signature anywhere in the
  document is evidence of tampering, even where it covers nothing we read.
- Every claim is read from the subtree signxml returns as signed, after checking it is the
  presented assertion.
- Pure: no I/O, no clock; ``now`` is an argument. Every failure is ``InvalidAssertion``
  naming the check with what it expected and found; it never quotes the document or a key,
  and values read from the document are bounded and escaped (``evidence.shown``).
- ``saml-gateway explain`` runs this very function with an ``Evidence`` to fill: the checks
  it prints are the ones the proxy runs, in the same order.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Literal

from lxml import etree
from signxml.algorithms import CanonicalizationMethod, DigestAlgorithm, SignatureMethod
from signxml.exceptions import InvalidCertificate, InvalidDigest, SignXMLException
from signxml.verifier import SignatureConfiguration, VerifyResult, XMLVerifier

from gateway.errors import InvalidAssertion
from gateway.saml.assertion import Assertion
from gateway.saml.decrypt import decrypt_assertion
from gateway.saml.evidence import (
    Evidence,
    duration_text,
    instant_text,
    key_text,
    printable,
    shown,
)
from gateway.saml.extract import assertion_digest
from gateway.saml.keys import PinnedKey, TrustPolicy
from gateway.saml.xml import hardened_parser, parse_xml

_SAML = "urn:oasis:names:tc:SAML:2.0:assertion"
_SAML1 = "urn:oasis:names:tc:SAML:1.0:assertion"
_SAMLP = "urn:oasis:names:tc:SAML:2.0:protocol"
_DS = "http://www.w3.org/2000/09/xmldsig#"

_ASSERTION = f"{{{_SAML}}}Assertion"
_ASSERTION1 = f"{{{_SAML1}}}Assertion"
_ASSERTIONS = frozenset({_ASSERTION, _ASSERTION1})
_ENCRYPTED_ASSERTION = f"{{{_SAML}}}EncryptedAssertion"
_RESPONSE = f"{{{_SAMLP}}}Response"
_SIGNATURE = f"{{{_DS}}}Signature"
_OBJECT = f"{{{_DS}}}Object"
_ISSUER = f"{{{_SAML}}}Issuer"
_SUBJECT = f"{{{_SAML}}}Subject"
_NAME_ID = f"{{{_SAML}}}NameID"
_CONFIRMATION = f"{{{_SAML}}}SubjectConfirmation"
_CONFIRMATION_DATA = f"{{{_SAML}}}SubjectConfirmationData"
_CONDITIONS = f"{{{_SAML}}}Conditions"
_AUDIENCE_RESTRICTION = f"{{{_SAML}}}AudienceRestriction"
_AUDIENCE = f"{{{_SAML}}}Audience"
_STATUS_CODE = f"{{{_SAMLP}}}Status/{{{_SAMLP}}}StatusCode"
_SAML1_PREFIX = f"{{{_SAML1}}}"
_SUBJECT1 = f"{{{_SAML1}}}Subject"
_NAME_IDENTIFIER = f"{{{_SAML1}}}NameIdentifier"
_CONFIRMATION1 = f"{{{_SAML1}}}SubjectConfirmation"
_CONFIRMATION_METHOD1 = f"{{{_SAML1}}}ConfirmationMethod"


@dataclass(frozen=True, slots=True)
class _Version:
    """Where one SAML version puts what the rules read; the rules themselves are shared."""

    name: Literal["1.1", "2.0"]
    id_attribute: str
    conditions: str
    audience_restriction: str
    audience: str
    restriction_words: str


_SAML2 = _Version(
    "2.0",
    "ID",
    _CONDITIONS,
    _AUDIENCE_RESTRICTION,
    _AUDIENCE,
    "AudienceRestriction",
)
_SAML1_1 = _Version(
    "1.1",
    "AssertionID",
    f"{{{_SAML1}}}Conditions",
    f"{{{_SAML1}}}AudienceRestrictionCondition",
    f"{{{_SAML1}}}Audience",
    "AudienceRestrictionCondition",
)

_BEARER = "urn:oasis:names:tc:SAML:2.0:cm:bearer"
_BEARER1 = "urn:oasis:names:tc:SAML:1.0:cm:bearer"
_SUCCESS = "urn:oasis:names:tc:SAML:2.0:status:Success"
_EXC_C14N = CanonicalizationMethod.EXCLUSIVE_XML_CANONICALIZATION_1_0.value
_ENVELOPED = "http://www.w3.org/2000/09/xmldsig#enveloped-signature"
_ALLOWED_TRANSFORMS = frozenset({_ENVELOPED, _EXC_C14N})
_TRANSFORMS = f"{{{_DS}}}Transforms"
_TRANSFORM = f"{{{_DS}}}Transform"
_INCLUSIVE_NAMESPACES = f"{{{_EXC_C14N}}}InclusiveNamespaces"
# Attribute names signxml may treat as IDs when it resolves a Reference (it matches the local
# name, whatever the namespace): all their values must be unique in the document.
_ID_NAMES = frozenset({"ID", "Id", "id", "AssertionID"})

_STRONG_METHODS = frozenset(
    {
        SignatureMethod.RSA_SHA256,
        SignatureMethod.RSA_SHA384,
        SignatureMethod.RSA_SHA512,
        SignatureMethod.ECDSA_SHA256,
        SignatureMethod.ECDSA_SHA384,
        SignatureMethod.ECDSA_SHA512,
    }
)
_SHA1_METHODS = frozenset({SignatureMethod.RSA_SHA1, SignatureMethod.ECDSA_SHA1})
_STRONG_DIGESTS = frozenset(
    {DigestAlgorithm.SHA256, DigestAlgorithm.SHA384, DigestAlgorithm.SHA512}
)
_BASE_CONFIG = SignatureConfiguration(
    location="./",  # the Signature must be a direct child of the assertion we pass
    expect_references=1,
    signature_methods=_STRONG_METHODS,
    digest_algorithms=_STRONG_DIGESTS,
    # KeyInfo is never trusted; the pinned certificate alone decides, so a KeyValue that
    # disagrees with it is irrelevant rather than an error.
    ignore_ambiguous_key_info=True,
)
_SHA1_CONFIG = replace(
    _BASE_CONFIG,
    signature_methods=_STRONG_METHODS | _SHA1_METHODS,
    digest_algorithms=_STRONG_DIGESTS | {DigestAlgorithm.SHA1},
)
_METHOD_BY_URI = {m.value: m for m in SignatureMethod}
_DIGEST_BY_URI = {d.value: d for d in DigestAlgorithm}

_DATETIME = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})?"
)


def _refusal(reason: str, check: str, found: str, expected: str = "") -> InvalidAssertion:
    """A refusal in explain's words: ``check: expected X, found Y`` (or ``check: found``)."""
    detail = f"{check}: expected {expected}, found {found}" if expected else f"{check}: {found}"
    return InvalidAssertion(reason, detail, check=check, expected=expected, found=found)


# --- structure: which assertion, and is its signature where it must be ------------------

_ONE_ASSERTION = (
    "a saml:Assertion or saml:EncryptedAssertion, or a samlp:Response (Status Success)"
    " holding exactly one"
)


def _locate_assertion(root: etree._Element) -> etree._Element:
    """The one assertion (or EncryptedAssertion) of the document."""
    if root.tag in _ASSERTIONS or root.tag == _ENCRYPTED_ASSERTION:
        assertion = root
    elif root.tag == _RESPONSE:
        code = root.find(_STATUS_CODE)
        if code is not None and code.get("Value") != _SUCCESS:
            raise _refusal(
                "malformed", "structure", f"Response status {shown(code.get('Value'))}", _SUCCESS
            )
        children = root.findall(_ASSERTION) + root.findall(_ENCRYPTED_ASSERTION)
        if not children:
            raise _refusal("malformed", "structure", "a Response with no saml:Assertion")
        if len(children) > 1:
            raise _refusal(
                "wrapping", "structure", f"a Response holding {len(children)}", _ONE_ASSERTION
            )
        assertion = children[0]
    else:
        raise _refusal(
            "malformed",
            "structure",
            f"document element {shown(etree.QName(root).localname)}",
            _ONE_ASSERTION,
        )
    # Any other assertion in the document (inside Advice, ds:Object, a foreign wrapper), of
    # either version, is how signature-wrapping attacks smuggle a second identity.
    count = sum(1 for _ in root.iter(_ASSERTION, _ASSERTION1, _ENCRYPTED_ASSERTION))
    if count != 1:
        raise _refusal("wrapping", "structure", f"{count} saml:Assertion elements", "one")
    return assertion


def _check_structure(root: etree._Element, assertion: etree._Element | None) -> None:
    """Unique IDs, no ds:Object, and signatures only on ``assertion`` and a Response."""
    seen: set[str | bytes] = set()
    for element in root.iter(etree.Element):
        for name, value in element.attrib.items():
            if str(name).rpartition("}")[2] in _ID_NAMES:
                # Duplicate IDs let a Reference resolve to a different element than we read.
                if value in seen:
                    raise _refusal(
                        "wrapping", "structure", "duplicate ID attribute values", "unique IDs"
                    )
                seen.add(value)
        tag = element.tag
        if tag == _OBJECT:  # where signed content hides
            raise _refusal("wrapping", "structure", "a ds:Object", "no ds:Object")
        if tag == _SIGNATURE:
            parent = element.getparent()
            # Only the assertion's own signature and a Response's signature may exist.
            if parent is not assertion and not (parent is root and root.tag == _RESPONSE):
                raise _refusal(
                    "wrapping",
                    "structure",
                    "a ds:Signature elsewhere",
                    "signatures only on the assertion and the Response",
                )


def _one(element: etree._Element, path: str, what: str) -> etree._Element:
    found = element.findall(path)
    if len(found) != 1:
        raise _refusal("signature", "signature profile", f"{len(found)}", f"one {what}")
    return found[0]


def _only_signature(element: etree._Element, what: str) -> etree._Element:
    """The one ds:Signature child of ``element`` (signxml would take the first of several)."""
    signatures = element.findall(_SIGNATURE)
    if not signatures:
        raise _refusal(
            "signature", "structure", f"the {what} is not signed", f"a ds:Signature in the {what}"
        )
    if len(signatures) > 1:
        raise _refusal(
            "wrapping", "structure", f"{len(signatures)} ds:Signature in the {what}", "one"
        )
    return signatures[0]


def _check_signature(
    signature: etree._Element, element_id: str, allow_sha1: bool, what: str
) -> Callable[[], str]:
    """The pinned profile of one signature over the element ``what`` whose ID is given;
    returns a function that says what was found, in words."""
    signed_info = _one(signature, f"{{{_DS}}}SignedInfo", "ds:SignedInfo")
    c14n = _one(signed_info, f"{{{_DS}}}CanonicalizationMethod", "CanonicalizationMethod")
    check = "signature profile" if what == "assertion" else "Response signature profile"
    if c14n.get("Algorithm") != _EXC_C14N:
        raise _refusal("algorithm", check, "another SignedInfo canonicalization", "exclusive c14n")
    method_el = _one(signed_info, f"{{{_DS}}}SignatureMethod", "SignatureMethod")
    method = _METHOD_BY_URI.get(method_el.get("Algorithm") or "")
    allowed = "RSA/ECDSA with SHA-256 or better" + (" (or SHA-1: allow_sha1)" if allow_sha1 else "")
    if method not in _STRONG_METHODS and not (allow_sha1 and method in _SHA1_METHODS):
        raise _refusal("algorithm", check, f"signature method {_name(method)}", allowed)
    references = signed_info.findall(f"{{{_DS}}}Reference")
    if len(references) != 1:
        raise _refusal("wrapping", check, f"{len(references)} References", "one Reference")
    reference = references[0]
    # The one Reference must point at this very element, or a valid signature over some
    # other element would vouch for claims it never covered.
    if reference.get("URI") != "#" + element_id:
        raise _refusal(
            "wrapping",
            check,
            f"Reference URI {shown(reference.get('URI'))}",
            f"#{shown(element_id)} (the {what}'s ID)",
        )
    _check_transforms(reference, check)
    digest_el = _one(reference, f"{{{_DS}}}DigestMethod", "DigestMethod")
    digest = _DIGEST_BY_URI.get(digest_el.get("Algorithm") or "")
    if digest not in _STRONG_DIGESTS and not (allow_sha1 and digest is DigestAlgorithm.SHA1):
        raise _refusal("algorithm", check, f"digest method {_name(digest)}", allowed)
    # Words for explain are built by the caller only when it records evidence.
    return lambda: f"Reference #{printable(element_id)}, {_name(method)}, digest {_name(digest)}"


def _check_transforms(reference: etree._Element, check: str) -> None:
    """Exactly [enveloped-signature, exclusive c14n], checked before anything is verified.

    signxml runs the enveloped transform first whatever its position, runs each c14n it
    finds, and skips algorithms it does not know (an XPath filter is silently not applied),
    so a list it accepts can mean something else to the authorization server's verifier.
    [enveloped-signature] alone is refused too: XML-DSig then digests with inclusive c14n
    (signxml: c14n 1.1), which SAML core 5.4.3 asks to avoid, and no IdP we know sends it.
    """
    wanted = "transforms exactly [enveloped-signature, exclusive c14n]"
    containers = reference.findall(_TRANSFORMS)
    if len(containers) != 1:
        # none: the digest would cover the signature itself; several: signxml reads the first
        raise _refusal("wrapping", check, f"{len(containers)} Transforms elements", wanted)
    steps = list(containers[0])  # comments and PIs were dropped at parse time
    if any(step.tag != _TRANSFORM for step in steps):
        raise _refusal("wrapping", check, "something other than ds:Transform", wanted)
    algorithms = [step.get("Algorithm") for step in steps]
    if any(algorithm not in _ALLOWED_TRANSFORMS for algorithm in algorithms):
        raise _refusal("algorithm", check, "a transform outside the two", wanted)
    if algorithms == [_ENVELOPED]:
        raise _refusal("algorithm", check, "no exclusive c14n (inclusive c14n implied)", wanted)
    if algorithms != [_ENVELOPED, _EXC_C14N]:
        raise _refusal("wrapping", check, f"{len(algorithms)} transforms in another order", wanted)
    enveloped, exclusive = steps
    if len(enveloped):
        raise _refusal("wrapping", check, "parameters on enveloped-signature", wanted)
    # exc-c14n takes one optional parameter: InclusiveNamespaces PrefixList (Okta sends it).
    parameters = list(exclusive)
    if parameters and (
        len(parameters) != 1
        or parameters[0].tag != _INCLUSIVE_NAMESPACES
        or len(parameters[0])
        or set(parameters[0].attrib) != {"PrefixList"}
    ):
        raise _refusal(
            "wrapping", check, "exclusive c14n parameters other than InclusiveNamespaces", wanted
        )


def _name(algorithm: SignatureMethod | DigestAlgorithm | None) -> str:
    return algorithm.name if algorithm is not None else "unknown"


# --- signature verification ----------------------------------------------------------


class _PinnedVerifier(XMLVerifier):
    """signxml's verifier, minus reading the certificate serial for a message.

    signxml describes the signing certificate (subject, serial) on every verification. Some
    real IdP certificates carry serial 0, and reading it makes cryptography warn on every
    request; a pinned certificate is named by its config key instead.
    """

    def _get_cert_description(self, cert: object, cert_source: str) -> str:
        return cert_source


def _candidate_keys(signature: etree._Element, policy: TrustPolicy) -> list[PinnedKey]:
    """Pinned keys strong enough to use, the one KeyInfo names first (a hint, never trust)."""
    usable = [k for k in policy.keys if not (k.kind == "rsa" and k.bits < policy.min_rsa_key_bits)]
    if not usable:
        raise _refusal(
            "algorithm",
            "signature",
            "no pinned key that strong",
            f"RSA keys of {policy.min_rsa_key_bits} bits or more (min_rsa_key_bits)",
        )
    if len(usable) > 1:
        hinted = set()
        for cert in signature.iterfind(
            f"{{{_DS}}}KeyInfo/{{{_DS}}}X509Data/{{{_DS}}}X509Certificate"
        ):
            hinted.add("".join((cert.text or "").split()))
        if hinted:
            usable.sort(key=lambda k: base64.b64encode(k.der).decode() not in hinted)
    return usable


def _verify(
    data: bytes,
    signature: etree._Element,
    policy: TrustPolicy,
    now: datetime,
    check: str = "signature",
    id_attribute: str | None = None,
) -> tuple[etree._Element, PinnedKey]:
    """signxml's verdict on the serialised assertion ``data`` with each pinned key in turn.

    Returns the signed subtree and the key that verified it.
    """
    config = replace(_SHA1_CONFIG if policy.allow_sha1 else _BASE_CONFIG, verification_time=now)
    expected = f"a signature by one of the {len(policy.keys)} pinned certificate(s)"
    tried: list[str] = []
    for key in _candidate_keys(signature, policy):
        try:
            result = _PinnedVerifier().verify(
                data,
                x509_cert=key.certificate,
                parser=hardened_parser(),
                id_attribute=id_attribute,
                expect_config=config,
            )
        except InvalidDigest:
            # The signature is good but the content changed after signing: no other key helps.
            raise _refusal(
                "signature", check, "digest mismatch: content changed after signing", expected
            ) from None
        except InvalidCertificate:
            tried.append(f"{key.source}: certificate not valid at this time")
            continue
        except SignXMLException as exc:
            tried.append(f"{key.source}: {type(exc).__name__}")
            continue
        except Exception as exc:  # signxml on hostile input raises anything
            tried.append(f"{key.source}: unverifiable ({type(exc).__name__})")
            continue
        # expect_references=1 makes signxml return a single result, never a list
        signed = result.signed_xml if isinstance(result, VerifyResult) else None
        if signed is None:
            raise _refusal("signature", check, "signed content that is not XML", expected)
        return signed, key
    raise _refusal("signature", check, "none verified it (" + "; ".join(tried) + ")", expected)


def _response_signature(
    root: etree._Element, allow_sha1: bool
) -> tuple[etree._Element, Callable[[], str]] | None:
    """The Response's own signature, profile-checked; None if it has none (or no Response)."""
    if root.tag != _RESPONSE or root.find(_SIGNATURE) is None:
        return None
    signature = _only_signature(root, "Response")
    response_id = root.get("ID")
    if not response_id:
        raise _refusal("malformed", "structure", "a signed Response with no ID")
    return signature, _check_signature(signature, response_id, allow_sha1, "Response")


def _verify_response(
    raw: bytes,
    root: etree._Element,
    signature: etree._Element,
    policy: TrustPolicy,
    now: datetime,
    ev: Evidence | None,
) -> None:
    """The Response's signature must hold too, though we read nothing it alone covers."""
    signed, key = _verify(raw, signature, policy, now, "Response signature")
    if signed.tag != _RESPONSE or signed.get("ID") != root.get("ID"):
        raise _refusal(
            "wrapping", "Response signature", "it covers another element", "the Response itself"
        )
    if ev is not None:
        ev.passed(
            "Response signature",
            "a signature by a pinned certificate",
            f"verified by {key_text(key)}",
        )


# --- claims, read from the signed subtree only ----------------------------------------


def _parse_instant(value: str | None, what: str) -> datetime | None:
    # Never quote a value that is not a date: it is whatever the document says.
    if value is None:
        return None
    match = _DATETIME.fullmatch(value.strip())
    if match is None:
        raise _refusal("malformed", what, "not an xs:dateTime", "an xs:dateTime")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        instant = datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second),
            int((fraction or "0")[:6].ljust(6, "0")),
            tzinfo=UTC,
        )
    except ValueError:
        raise _refusal("malformed", what, "not a valid date", "an xs:dateTime") from None
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        try:
            instant -= sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
        except OverflowError:
            # A signed 0001-01-01T00:00:00+14:00 lands before year 1: no datetime holds it.
            raise _refusal("malformed", what, "a date out of range", "an xs:dateTime") from None
    return instant


def _texts(elements: Iterable[etree._Element]) -> list[str]:
    return [(e.text or "").strip() for e in elements]


def _not_before(
    bound: datetime | None, now: datetime, skew: timedelta, what: str, ev: Evidence | None
) -> None:
    """``now`` may not be earlier than ``bound`` minus the skew."""
    if bound is None:
        return
    early = now + skew < bound
    if early or ev is not None:  # words only for a refusal or for explain
        expected = f"now ≥ {instant_text(bound)} − {int(skew.total_seconds())} s skew"
        side = "before" if now < bound else "after"
        found = f"now {instant_text(now)}, {duration_text(bound - now)} {side} it"
        if early:
            raise _refusal("not_yet_valid", what, found, expected)
        if ev is not None:
            ev.passed(what, expected, found)


def _not_on_or_after(
    bound: datetime | None, now: datetime, skew: timedelta, what: str, ev: Evidence | None
) -> None:
    """``now`` must be earlier than ``bound`` plus the skew."""
    if bound is None:
        return
    late = now - skew >= bound
    if late or ev is not None:
        expected = f"now < {instant_text(bound)} + {int(skew.total_seconds())} s skew"
        side = "before" if now < bound else "after"
        found = f"now {instant_text(now)}, {duration_text(bound - now)} {side} it"
        if late:
            raise _refusal("expired", what, found, expected)
        if ev is not None:
            ev.passed(what, expected, found)


def _check_issuer(values: list[str], policy: TrustPolicy, ev: Evidence | None) -> str:
    """Exactly one Issuer, and it is in the allow-list."""
    if len(values) != 1:
        raise _refusal(
            "issuer", "issuer", f"{len(values)} Issuer elements", _one_of(policy.issuers)
        )
    if values[0] not in policy.issuers:
        raise _refusal("issuer", "issuer", shown(values[0]), _one_of(policy.issuers))
    if ev is not None:
        ev.passed("issuer", _one_of(policy.issuers), shown(values[0]))
    return values[0]


def _check_conditions(
    signed: etree._Element,
    version: _Version,
    policy: TrustPolicy,
    now: datetime,
    ev: Evidence | None,
) -> tuple[tuple[str, ...], datetime | None]:
    """Conditions' time window and audience restrictions: the audiences and the expiry."""
    skew = policy.clock_skew
    conditions = signed.findall(version.conditions)
    if len(conditions) > 1:
        raise _refusal("malformed", "audience", f"{len(conditions)} Conditions", "one")
    if not conditions:
        found = f"no Conditions, so no {version.restriction_words}"
        raise _refusal("audience", "audience", found, shown(policy.audience))
    cond = conditions[0]
    not_before = _parse_instant(cond.get("NotBefore"), "Conditions NotBefore")
    limit = _parse_instant(cond.get("NotOnOrAfter"), "Conditions NotOnOrAfter")
    _not_before(not_before, now, skew, "Conditions NotBefore", ev)
    _not_on_or_after(limit, now, skew, "Conditions NotOnOrAfter", ev)
    restrictions = cond.findall(version.audience_restriction)
    audiences: list[str] = []
    # Each restriction must name us (SAML 2.0 core 2.5.1.4, SAML 1.1 core 2.3.2.1.1), and
    # there must be one: an assertion meant for everyone is meant for any relying party.
    for restriction in restrictions:
        values = _texts(restriction.findall(version.audience))
        if policy.audience not in values:
            found = ", ".join(shown(v) for v in values) or f"an empty {version.restriction_words}"
            raise _refusal("audience", "audience", found, shown(policy.audience))
        audiences.extend(values)
    if not restrictions:
        found = f"no {version.restriction_words}"
        raise _refusal("audience", "audience", found, shown(policy.audience))
    if ev is not None:
        ev.passed("audience", shown(policy.audience), ", ".join(shown(a) for a in audiences))
    return tuple(audiences), limit


def _plain_name(subject: etree._Element, tag: str) -> str:
    """The one plain-text name identifier of a Subject."""
    names = subject.findall(tag)
    if len(names) != 1 or len(names[0]) or not (names[0].text or "").strip():
        what = etree.QName(tag).localname
        raise _refusal(
            "malformed", "subject", "none, several or structured", f"one plain-text {what}"
        )
    # Comments were dropped before verification and signxml re-parses canonical text, so this
    # is the whole value, exactly as signed.
    return (names[0].text or "").strip()


def _claims(
    signed: etree._Element, policy: TrustPolicy, now: datetime, ev: Evidence | None
) -> tuple[str, str, tuple[str, ...], str, datetime]:
    issuer = _check_issuer(_texts(signed.findall(_ISSUER)), policy, ev)
    audiences, limit = _check_conditions(signed, _SAML2, policy, now, ev)
    subjects = signed.findall(_SUBJECT)
    if len(subjects) != 1:
        raise _refusal("subject_confirmation", "subject", f"{len(subjects)} Subject", "one")
    subject = _plain_name(subjects[0], _NAME_ID)
    if ev is not None:  # the NameID is personal data: its value is never shown
        ev.passed("subject", "one plain-text NameID", "one NameID (value not shown)")

    recipient, confirmation_limit = _bearer_confirmation(subjects[0], policy, now, ev)
    limit = confirmation_limit if limit is None else min(limit, confirmation_limit)
    return issuer, subject, audiences, recipient, limit


def _claims_saml11(
    signed: etree._Element, policy: TrustPolicy, now: datetime, ev: Evidence | None
) -> tuple[str, str, tuple[str, ...], str, datetime]:
    """SAML 1.1: Issuer is an attribute, each statement has its own Subject, no Recipient."""
    issuer_value = signed.get("Issuer")
    issuer = _check_issuer([] if issuer_value is None else [issuer_value.strip()], policy, ev)
    audiences, limit = _check_conditions(signed, _SAML1_1, policy, now, ev)
    if limit is None:
        # 2.0 takes its expiry from the bearer confirmation; 1.1 has only this one.
        raise _refusal(
            "malformed",
            "Conditions NotOnOrAfter",
            "none",
            "an expiry (SAML 1.1 has no other)",
        )
    statements = [
        child
        for child in signed.iterchildren(etree.Element)
        if child.tag.startswith(_SAML1_PREFIX) and child.tag.endswith("Statement")
    ]
    if not statements:
        raise _refusal(
            "subject_confirmation", "subject", "no statement", "a statement with a Subject"
        )
    subject: str | None = None
    for statement in statements:
        subjects = statement.findall(_SUBJECT1)
        if len(subjects) != 1:
            found = f"{len(subjects)} Subject in a {etree.QName(statement).localname}"
            raise _refusal("subject_confirmation", "subject", found, "one in every statement")
        name = _plain_name(subjects[0], _NAME_IDENTIFIER)
        # Every statement speaks of one principal: two names would let the authorization
        # server and the gateway read different identities from one signed assertion.
        if subject is not None and name != subject:
            raise _refusal(
                "malformed", "subject", "statements naming different subjects", "one NameIdentifier"
            )
        subject = name
        # A holder-of-key or sender-vouches statement is not ours to accept as a bearer.
        methods = _texts(subjects[0].iterfind(f"{_CONFIRMATION1}/{_CONFIRMATION_METHOD1}"))
        if _BEARER1 not in methods:
            raise _refusal(
                "subject_confirmation",
                "bearer confirmation",
                f"a {etree.QName(statement).localname} without it",
                f"ConfirmationMethod {_BEARER1} in every statement's Subject",
            )
    if ev is not None:
        ev.passed(
            "subject",
            "one plain-text NameIdentifier, the same in every statement",
            f"{len(statements)} statement(s), one NameIdentifier (value not shown)",
        )
        ev.passed(
            "bearer confirmation", f"ConfirmationMethod {_BEARER1} in each", "present in each"
        )
        ev.passed(
            "recipient",
            "SAML 1.1 has no Recipient: the audience stands in for it",
            shown(policy.audience),
        )
    return issuer, subject or "", audiences, policy.audience, limit


def _bearer_confirmation(
    subject: etree._Element, policy: TrustPolicy, now: datetime, ev: Evidence | None
) -> tuple[str, datetime]:
    skew = policy.clock_skew
    problem: InvalidAssertion | None = None  # the last one wins: none was bearer
    for confirmation in subject.iterfind(_CONFIRMATION):
        if confirmation.get("Method") != _BEARER:
            continue
        data = confirmation.find(_CONFIRMATION_DATA)
        if data is None:
            problem = _refusal(
                "subject_confirmation",
                "bearer confirmation",
                "no SubjectConfirmationData",
                "SubjectConfirmationData",
            )
            continue
        recipient = (data.get("Recipient") or "").strip()
        if recipient not in policy.recipients:
            found = shown(recipient or None)
            problem = _refusal("recipient", "recipient", found, _one_of(policy.recipients))
            continue
        try:
            limit = _parse_instant(data.get("NotOnOrAfter"), "SubjectConfirmationData NotOnOrAfter")
            if limit is None:
                problem = _refusal(
                    "subject_confirmation",
                    "bearer confirmation",
                    "no NotOnOrAfter",
                    "SubjectConfirmationData NotOnOrAfter",
                )
                continue
            _not_on_or_after(limit, now, skew, "SubjectConfirmationData NotOnOrAfter", None)
            not_before = _parse_instant(data.get("NotBefore"), "SubjectConfirmationData NotBefore")
            _not_before(not_before, now, skew, "SubjectConfirmationData NotBefore", None)
        except InvalidAssertion as exc:
            if exc.reason == "malformed":
                raise
            problem = exc
            continue
        if ev is not None:  # recorded for the confirmation that was accepted only
            ev.passed("bearer confirmation", f"Method {_BEARER}", "present, with data")
            ev.passed("recipient", _one_of(policy.recipients), shown(recipient))
            _not_on_or_after(limit, now, skew, "SubjectConfirmationData NotOnOrAfter", ev)
            _not_before(not_before, now, skew, "SubjectConfirmationData NotBefore", ev)
        return recipient, limit
    raise problem or _refusal(
        "subject_confirmation",
        "bearer confirmation",
        "none",
        f"a SubjectConfirmation with Method {_BEARER}",
    )


def _one_of(values: frozenset[str]) -> str:
    # Built only for a refusal or for explain: the hot path never formats policy values.
    return "one of " + ", ".join(shown(v) for v in sorted(values))


# --- the entry point -----------------------------------------------------------------


def validate_assertion(
    raw: bytes,
    policy: TrustPolicy,
    now: datetime,
    *,
    digest: bytes | None = None,
    evidence: Evidence | None = None,
) -> Assertion:
    """Parse, pin, verify and check ``raw``; the verified ``Assertion`` or ``InvalidAssertion``.

    ``now`` must be timezone-aware (naive values are taken as UTC). ``digest`` is the
    SHA-256 of ``raw`` when the caller already computed it for the cache key. ``evidence``,
    when given, receives every check in order, the failed one last; a refusal carries the
    assertion's ID and Issuer as read before verification (``unverified_id``/``_issuer``).
    """
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    located: list[etree._Element] = []  # the assertion checked last, for the log's ID
    try:
        root = parse_xml(raw)
        if evidence is not None:
            evidence.passed(
                "parse",
                "well-formed XML without DOCTYPE",
                f"<{printable(etree.QName(root).localname)}>, {len(raw)} bytes",
            )
        assertion = _locate_assertion(root)
        located.append(assertion)
        if assertion.tag == _ENCRYPTED_ASSERTION:
            return _validate_encrypted(raw, root, assertion, policy, now, digest, evidence, located)
        return _validate(raw, root, assertion, policy, now, digest, evidence)
    except InvalidAssertion as exc:
        if not exc.check:  # the parser's own refusals (malformed, dtd)
            exc = _refusal(exc.reason, "parse", exc.detail)
        if evidence is not None:
            evidence.failed(exc.check, exc.reason, exc.expected, exc.found)
        if located:
            last = located[-1]
            exc.unverified_id = last.get("ID") or last.get("AssertionID")
            issuer = last.find(_ISSUER)
            if issuer is not None:
                exc.unverified_issuer = (issuer.text or "").strip()
            elif last.get("Issuer") is not None:
                exc.unverified_issuer = (last.get("Issuer") or "").strip()
        raise exc from None


def _validate_encrypted(
    raw: bytes,
    root: etree._Element,
    encrypted: etree._Element,
    policy: TrustPolicy,
    now: datetime,
    digest: bytes | None,
    ev: Evidence | None,
    located: list[etree._Element],
) -> Assertion:
    """Open the EncryptedAssertion, then hold what it held to every rule, as if bare."""
    _check_structure(root, None)
    response_signature = _response_signature(root, policy.allow_sha1)
    if ev is not None:
        where = "a bare" if encrypted is root else "a samlp:Response holding one"
        ev.passed(
            "envelope",
            _ONE_ASSERTION + "; unique IDs, no ds:Object",
            f"{where} saml:EncryptedAssertion"
            + ("; the Response signed" if response_signature else ""),
        )
    if response_signature is not None:
        # Checked before anything is decrypted: a forged envelope costs no private-key work.
        _verify_response(raw, root, response_signature[0], policy, now, ev)
    plain, words = decrypt_assertion(encrypted, policy.decryption_keys, policy.allow_cbc_encryption)
    if ev is not None:
        ev.passed(
            "decryption", "RSA-OAEP key transport, AES-GCM content (or CBC if allowed)", words
        )
    try:
        inner_root = parse_xml(plain)  # the one hardened parser, for decrypted bytes too
    except InvalidAssertion as exc:
        if exc.reason != "malformed":
            raise
        # Garbage out of a tampered ciphertext is a decryption failure like any other.
        raise _refusal(
            "decryption", "decryption", "the plaintext is not XML", "an assertion"
        ) from None
    if inner_root.tag not in _ASSERTIONS:
        found = f"an EncryptedAssertion holding {shown(etree.QName(inner_root).localname)}"
        raise _refusal("malformed", "structure", found, "one saml:Assertion")
    inner = _locate_assertion(inner_root)  # one assertion in there too, nothing wrapped
    located.append(inner)
    # The presented bytes stay the cache's digest; the plaintext goes to the token request.
    return _validate(plain, inner_root, inner, policy, now, digest or assertion_digest(raw), ev)


def _version_and_id(assertion: etree._Element, policy: TrustPolicy) -> tuple[_Version, str]:
    """Which SAML the assertion speaks, held to the IdP's ``saml_versions``, and its ID."""
    version = _SAML1_1 if assertion.tag == _ASSERTION1 else _SAML2
    assertion_id = assertion.get(version.id_attribute)
    if not assertion_id:
        raise _refusal(
            "malformed",
            "structure",
            "an assertion with no ID",
            f"an {version.id_attribute} attribute",
        )
    if version is _SAML2 and assertion.get("Version") != "2.0":
        raise _refusal(
            "malformed", "structure", f"Version {shown(assertion.get('Version'))}", "SAML 2.0"
        )
    major, minor = assertion.get("MajorVersion"), assertion.get("MinorVersion")
    if version is _SAML1_1 and (major, minor) != ("1", "1"):
        found = f"MajorVersion {shown(major)}, MinorVersion {shown(minor)}"
        raise _refusal("malformed", "structure", found, "SAML 1.1")
    if version.name not in policy.saml_versions:
        # An IdP that never sends 1.1 should not have its keys accepted on 1.1 documents.
        raise _refusal(
            "version",
            "structure",
            f"a SAML {version.name} assertion",
            "SAML " + " or ".join(sorted(policy.saml_versions)) + " (saml_versions)",
        )
    return version, assertion_id


def _validate(
    raw: bytes,
    root: etree._Element,
    assertion: etree._Element,
    policy: TrustPolicy,
    now: datetime,
    digest: bytes | None,
    ev: Evidence | None,
) -> Assertion:
    version, assertion_id = _version_and_id(assertion, policy)
    _check_structure(root, assertion)
    signature = _only_signature(assertion, "assertion")
    algorithms = _check_signature(signature, assertion_id, policy.allow_sha1, "assertion")
    response_signature = _response_signature(root, policy.allow_sha1)
    if ev is not None:
        where = (
            f"a bare SAML {version.name} assertion"
            if assertion is root
            else "a samlp:Response holding one saml:Assertion"
        )
        signed_parts = "the assertion" + (" and the Response" if response_signature else "")
        ev.passed(
            "structure",
            _ONE_ASSERTION + "; unique IDs, no ds:Object, signatures only where allowed",
            f"{where}, ID {shown(assertion_id)}; {signed_parts} signed",
        )
        ev.passed(
            "signature profile",
            f"one Reference to #ID, {_TRANSFORMS_WORDS}, SHA-256 or better",
            algorithms(),
        )
        if response_signature is not None:
            ev.passed(
                "Response signature profile",
                f"one Reference to the Response's #ID, {_TRANSFORMS_WORDS}",
                response_signature[1](),
            )
    # Only the assertion is handed to signxml, so it cannot find a signature or resolve a
    # Reference anywhere else in the document. lxml keeps the in-scope namespace declarations
    # and exclusive c14n ignores unused ones, so these bytes stand alone, signature valid.
    assertion_xml = etree.tostring(assertion, with_tail=False)
    id_attribute = version.id_attribute if version is _SAML1_1 else None
    signed, key = _verify(assertion_xml, signature, policy, now, id_attribute=id_attribute)
    # What signxml vouches for must be the assertion we located, not some other element.
    if signed.tag != assertion.tag or signed.get(version.id_attribute) != assertion_id:
        raise _refusal(
            "wrapping", "signature", "it covers another element", "the presented assertion"
        )
    if ev is not None:
        ev.passed(
            "signature", "a signature by a pinned certificate", f"verified by {key_text(key)}"
        )
    if response_signature is not None:
        _verify_response(raw, root, response_signature[0], policy, now, ev)
    read_claims = _claims_saml11 if version is _SAML1_1 else _claims
    issuer, subject, audiences, recipient, limit = read_claims(signed, policy, now, ev)
    return Assertion(
        id=assertion_id,
        issuer=issuer,
        subject=subject,
        audiences=audiences,
        recipient=recipient,
        not_on_or_after=limit,
        # The cache binds tokens to the presented bytes, whatever envelope they came in.
        digest=digest if digest is not None else assertion_digest(raw),
        # RFC 7522 2.1: the grant carries a single Assertion, not the Response around it
        # (whose Issuer, Status and Destination no signature we checked covers).
        raw=raw if assertion is root else assertion_xml,
        # What was signed, in canonical form: the same for every byte variant.
        fingerprint=hashlib.sha256(
            etree.tostring(signed, method="c14n", exclusive=True, with_comments=False)
        ).digest(),
        clock_skew=policy.clock_skew,
        saml_version=version.name,
    )


_TRANSFORMS_WORDS = "transforms [enveloped-signature, exclusive c14n]"
