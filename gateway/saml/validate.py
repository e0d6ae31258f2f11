"""Decide whether one decoded SAML document carries an assertion we accept.

Rules this module owns (each check below names the attack it stops):
- Exactly one ``saml:Assertion`` in the whole document, either the root or the only
  assertion child of a ``samlp:Response``; the assertion itself carries the signature.
- The signature is pinned: a direct child of that assertion, one Reference to ``#<its ID>``,
  transforms exactly [enveloped-signature, exclusive c14n], no ``ds:Object``, allowed
  algorithms only; verified by signxml against the pinned keys only.
- A ``samlp:Response`` that carries its own signature must pass the same profile (Reference
  to ``#<Response ID>``) and verify with the same keys: a broken signature anywhere in the
  document is evidence of tampering, even where it covers nothing we read.
- Every claim is read from the subtree signxml returns as signed, after checking it is the
  presented assertion.
- Pure: no I/O, no clock; ``now`` is an argument. Every failure is ``InvalidAssertion``
  whose detail never quotes the document or a key.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from lxml import etree
from signxml.algorithms import CanonicalizationMethod, DigestAlgorithm, SignatureMethod
from signxml.exceptions import InvalidCertificate, InvalidDigest, SignXMLException
from signxml.verifier import SignatureConfiguration, VerifyResult, XMLVerifier

from gateway.errors import InvalidAssertion
from gateway.saml.assertion import Assertion
from gateway.saml.extract import assertion_digest
from gateway.saml.keys import PinnedKey, TrustPolicy
from gateway.saml.xml import hardened_parser, parse_xml

_SAML = "urn:oasis:names:tc:SAML:2.0:assertion"
_SAMLP = "urn:oasis:names:tc:SAML:2.0:protocol"
_DS = "http://www.w3.org/2000/09/xmldsig#"

_ASSERTION = f"{{{_SAML}}}Assertion"
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

_BEARER = "urn:oasis:names:tc:SAML:2.0:cm:bearer"
_SUCCESS = "urn:oasis:names:tc:SAML:2.0:status:Success"
_EXC_C14N = CanonicalizationMethod.EXCLUSIVE_XML_CANONICALIZATION_1_0.value
_ENVELOPED = "http://www.w3.org/2000/09/xmldsig#enveloped-signature"
_ALLOWED_TRANSFORMS = frozenset({_ENVELOPED, _EXC_C14N})
_TRANSFORMS = f"{{{_DS}}}Transforms"
_TRANSFORM = f"{{{_DS}}}Transform"
_INCLUSIVE_NAMESPACES = f"{{{_EXC_C14N}}}InclusiveNamespaces"
# Attribute names signxml treats as IDs when it resolves a Reference: all must be unique.
_ID_NAMES = frozenset({"ID", "Id", "id", "{http://www.w3.org/XML/1998/namespace}id"})

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


def _reject(reason: str, detail: str) -> InvalidAssertion:
    return InvalidAssertion(reason, detail)


# --- structure: which assertion, and is its signature where it must be ------------------


def _locate_assertion(root: etree._Element) -> etree._Element:
    if root.tag == _ASSERTION:
        assertion = root
    elif root.tag == _RESPONSE:
        code = root.find(_STATUS_CODE)
        if code is not None and code.get("Value") != _SUCCESS:
            raise _reject("malformed", "Response status is not Success")
        children = root.findall(_ASSERTION)
        if not children:
            raise _reject("malformed", "Response holds no (unencrypted) saml:Assertion")
        if len(children) > 1:
            raise _reject("wrapping", f"Response holds {len(children)} assertions")
        assertion = children[0]
    else:
        raise _reject("malformed", "document is neither saml:Assertion nor samlp:Response")
    # Any other assertion in the document (inside Advice, ds:Object, a foreign wrapper) is
    # how signature-wrapping attacks smuggle a second identity: refuse them all.
    if sum(1 for _ in root.iter(_ASSERTION)) != 1:
        raise _reject("wrapping", "more than one saml:Assertion in the document")
    return assertion


def _check_structure(root: etree._Element, assertion: etree._Element) -> None:
    seen: set[str | bytes] = set()
    for element in root.iter(etree.Element):
        for name, value in element.attrib.items():
            if name in _ID_NAMES:
                # Duplicate IDs let a Reference resolve to a different element than we read.
                if value in seen:
                    raise _reject("wrapping", "duplicate ID attribute values")
                seen.add(value)
        tag = element.tag
        if tag == _OBJECT:
            raise _reject("wrapping", "ds:Object is not allowed")  # where signed content hides
        if tag == _SIGNATURE:
            parent = element.getparent()
            # Only the assertion's own signature and a Response's signature may exist.
            if parent is not assertion and not (parent is root and root.tag == _RESPONSE):
                raise _reject("wrapping", "ds:Signature in an unexpected place")


def _one(element: etree._Element, path: str, what: str) -> etree._Element:
    found = element.findall(path)
    if len(found) != 1:
        raise _reject("signature", f"expected one {what}, found {len(found)}")
    return found[0]


def _only_signature(element: etree._Element, what: str) -> etree._Element:
    """The one ds:Signature child of ``element`` (signxml would take the first of several)."""
    signatures = element.findall(_SIGNATURE)
    if not signatures:
        raise _reject("signature", f"the {what} is not signed")
    if len(signatures) > 1:
        raise _reject("wrapping", f"the {what} carries several signatures")
    return signatures[0]


def _check_signature(
    signature: etree._Element, element_id: str, allow_sha1: bool, what: str
) -> None:
    """The pinned profile of one signature over the element ``what`` whose ID is given."""
    signed_info = _one(signature, f"{{{_DS}}}SignedInfo", "ds:SignedInfo")
    c14n = _one(signed_info, f"{{{_DS}}}CanonicalizationMethod", "CanonicalizationMethod")
    if c14n.get("Algorithm") != _EXC_C14N:
        raise _reject("algorithm", "SignedInfo canonicalization is not exclusive c14n")
    method_el = _one(signed_info, f"{{{_DS}}}SignatureMethod", "SignatureMethod")
    method = _METHOD_BY_URI.get(method_el.get("Algorithm") or "")
    if method not in _STRONG_METHODS and not (allow_sha1 and method in _SHA1_METHODS):
        raise _reject("algorithm", f"signature method not allowed: {_name(method)}")
    references = signed_info.findall(f"{{{_DS}}}Reference")
    if len(references) != 1:
        raise _reject("wrapping", f"expected one Reference, found {len(references)}")
    reference = references[0]
    # The one Reference must point at this very element, or a valid signature over some
    # other element would vouch for claims it never covered.
    if reference.get("URI") != "#" + element_id:
        raise _reject("wrapping", f"the Reference does not point at the {what}")
    _check_transforms(reference)
    digest_el = _one(reference, f"{{{_DS}}}DigestMethod", "DigestMethod")
    digest = _DIGEST_BY_URI.get(digest_el.get("Algorithm") or "")
    if digest not in _STRONG_DIGESTS and not (allow_sha1 and digest is DigestAlgorithm.SHA1):
        raise _reject("algorithm", f"digest method not allowed: {_name(digest)}")


def _check_transforms(reference: etree._Element) -> None:
    """Exactly [enveloped-signature, exclusive c14n], checked before anything is verified.

    signxml runs the enveloped transform first whatever its position, runs each c14n it
    finds, and skips algorithms it does not know (an XPath filter is silently not applied),
    so a list it accepts can mean something else to the authorization server's verifier.
    [enveloped-signature] alone is refused too: XML-DSig then digests with inclusive c14n
    (signxml: c14n 1.1), which SAML core 5.4.3 asks to avoid, and no IdP we know sends it.
    """
    containers = reference.findall(_TRANSFORMS)
    if len(containers) != 1:
        # none: the digest would cover the signature itself; several: signxml reads the first
        raise _reject("wrapping", f"expected one Transforms, found {len(containers)}")
    steps = list(containers[0])  # comments and PIs were dropped at parse time
    if any(step.tag != _TRANSFORM for step in steps):
        raise _reject("wrapping", "Transforms holds something other than ds:Transform")
    algorithms = [step.get("Algorithm") for step in steps]
    if any(algorithm not in _ALLOWED_TRANSFORMS for algorithm in algorithms):
        raise _reject("algorithm", "transform other than enveloped and exclusive c14n")
    if algorithms == [_ENVELOPED]:
        raise _reject("algorithm", "no exclusive c14n transform (inclusive c14n implied)")
    if algorithms != [_ENVELOPED, _EXC_C14N]:
        raise _reject("wrapping", "transforms are not exactly enveloped, then exclusive c14n")
    enveloped, exclusive = steps
    if len(enveloped):
        raise _reject("wrapping", "the enveloped-signature transform takes no parameters")
    # exc-c14n takes one optional parameter: InclusiveNamespaces PrefixList (Okta sends it).
    parameters = list(exclusive)
    if parameters and (
        len(parameters) != 1
        or parameters[0].tag != _INCLUSIVE_NAMESPACES
        or len(parameters[0])
        or set(parameters[0].attrib) != {"PrefixList"}
    ):
        raise _reject("wrapping", "exclusive c14n parameters other than InclusiveNamespaces")


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
        raise _reject("algorithm", "no pinned key meets min_rsa_key_bits")
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
) -> etree._Element:
    """signxml's verdict on the serialised assertion ``data`` with each pinned key in turn.

    Returns the signed subtree.
    """
    config = replace(_SHA1_CONFIG if policy.allow_sha1 else _BASE_CONFIG, verification_time=now)
    last = "no key tried"
    for key in _candidate_keys(signature, policy):
        try:
            result = _PinnedVerifier().verify(
                data,
                x509_cert=key.certificate,
                parser=hardened_parser(),
                expect_config=config,
            )
        except InvalidDigest:
            # The signature is good but the content changed after signing: no other key helps.
            raise _reject("signature", "digest mismatch: content changed after signing") from None
        except InvalidCertificate:
            last = f"pinned certificate {key.source} not valid at this time"
            continue
        except SignXMLException as exc:
            last = f"{type(exc).__name__} with {key.source}"
            continue
        except Exception as exc:  # signxml on hostile input raises anything
            last = f"unverifiable signature ({type(exc).__name__})"
            continue
        # expect_references=1 makes signxml return a single result, never a list
        signed = result.signed_xml if isinstance(result, VerifyResult) else None
        if signed is None:
            raise _reject("signature", "signed content is not XML")
        return signed
    raise _reject("signature", last)


def _response_signature(root: etree._Element, allow_sha1: bool) -> etree._Element | None:
    """The Response's own signature, profile-checked; None if it has none (or no Response)."""
    if root.tag != _RESPONSE or root.find(_SIGNATURE) is None:
        return None
    signature = _only_signature(root, "Response")
    response_id = root.get("ID")
    if not response_id:
        raise _reject("malformed", "the signed Response has no ID")
    _check_signature(signature, response_id, allow_sha1, "Response")
    return signature


def _verify_response(
    raw: bytes,
    root: etree._Element,
    signature: etree._Element,
    policy: TrustPolicy,
    now: datetime,
) -> None:
    """The Response's signature must hold too, though we read nothing it alone covers."""
    try:
        signed = _verify(raw, signature, policy, now)
    except InvalidAssertion as exc:
        raise _reject(exc.reason, f"the Response's signature: {exc.detail}") from None
    if signed.tag != _RESPONSE or signed.get("ID") != root.get("ID"):
        raise _reject("wrapping", "the Response's signature covers another element")


# --- claims, read from the signed subtree only ----------------------------------------


def _parse_instant(value: str | None, what: str) -> datetime | None:
    if value is None:
        return None
    match = _DATETIME.fullmatch(value.strip())
    if match is None:
        raise _reject("malformed", f"{what} is not an xs:dateTime")
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
        raise _reject("malformed", f"{what} is not a valid date") from None
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        try:
            instant -= sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
        except OverflowError:
            # A signed 0001-01-01T00:00:00+14:00 lands before year 1: no datetime holds it.
            raise _reject("malformed", f"{what} is out of range") from None
    return instant


def _texts(elements: Iterable[etree._Element]) -> list[str]:
    return [(e.text or "").strip() for e in elements]


def _claims(
    signed: etree._Element, policy: TrustPolicy, now: datetime
) -> tuple[str, str, tuple[str, ...], str, datetime]:
    skew = policy.clock_skew
    issuers = _texts(signed.findall(_ISSUER))
    if len(issuers) != 1 or issuers[0] not in policy.issuers:
        raise _reject("issuer", "issuer missing or not in the allow-list")
    issuer = issuers[0]

    conditions = signed.findall(_CONDITIONS)
    if len(conditions) > 1:
        raise _reject("malformed", "several Conditions elements")
    limit: datetime | None = None
    audiences: list[str] = []
    if conditions:
        cond = conditions[0]
        not_before = _parse_instant(cond.get("NotBefore"), "Conditions NotBefore")
        limit = _parse_instant(cond.get("NotOnOrAfter"), "Conditions NotOnOrAfter")
        if not_before is not None and now + skew < not_before:
            raise _reject("not_yet_valid", "Conditions NotBefore is in the future")
        if limit is not None and now - skew >= limit:
            raise _reject("expired", "Conditions NotOnOrAfter has passed")
        restrictions = cond.findall(_AUDIENCE_RESTRICTION)
        # Each AudienceRestriction must name us (SAML core 2.5.1.4), and there must be one.
        for restriction in restrictions:
            values = _texts(restriction.findall(_AUDIENCE))
            if policy.audience not in values:
                raise _reject("audience", "an AudienceRestriction does not name our audience")
            audiences.extend(values)
        if not restrictions:
            raise _reject("audience", "no AudienceRestriction")
    else:
        raise _reject("audience", "no Conditions, so no AudienceRestriction")

    subjects = signed.findall(_SUBJECT)
    if len(subjects) != 1:
        raise _reject("subject_confirmation", "expected one Subject")
    name_ids = subjects[0].findall(_NAME_ID)
    if len(name_ids) != 1 or len(name_ids[0]) or not (name_ids[0].text or "").strip():
        raise _reject("malformed", "expected one plain-text NameID")
    # Comments were dropped before verification and signxml re-parses canonical text, so this
    # is the whole NameID value, exactly as signed.
    subject = (name_ids[0].text or "").strip()

    recipient, confirmation_limit = _bearer_confirmation(subjects[0], policy, now)
    limit = confirmation_limit if limit is None else min(limit, confirmation_limit)
    return issuer, subject, tuple(audiences), recipient, limit


def _bearer_confirmation(
    subject: etree._Element, policy: TrustPolicy, now: datetime
) -> tuple[str, datetime]:
    skew = policy.clock_skew
    problem = ("subject_confirmation", "no bearer SubjectConfirmation")
    for confirmation in subject.iterfind(_CONFIRMATION):
        if confirmation.get("Method") != _BEARER:
            continue
        data = confirmation.find(_CONFIRMATION_DATA)
        if data is None:
            problem = ("subject_confirmation", "bearer confirmation without data")
            continue
        recipient = (data.get("Recipient") or "").strip()
        if recipient not in policy.recipients:
            problem = ("recipient", "bearer Recipient is not our token endpoint")
            continue
        limit = _parse_instant(data.get("NotOnOrAfter"), "SubjectConfirmationData NotOnOrAfter")
        if limit is None:
            problem = ("subject_confirmation", "bearer confirmation without NotOnOrAfter")
            continue
        if now - skew >= limit:
            problem = ("expired", "bearer SubjectConfirmationData NotOnOrAfter has passed")
            continue
        not_before = _parse_instant(data.get("NotBefore"), "SubjectConfirmationData NotBefore")
        if not_before is not None and now + skew < not_before:
            problem = ("not_yet_valid", "bearer SubjectConfirmationData NotBefore is ahead")
            continue
        return recipient, limit
    raise _reject(*problem)


# --- the entry point -----------------------------------------------------------------


def validate_assertion(
    raw: bytes, policy: TrustPolicy, now: datetime, *, digest: bytes | None = None
) -> Assertion:
    """Parse, pin, verify and check ``raw``; the verified ``Assertion`` or ``InvalidAssertion``.

    ``now`` must be timezone-aware (naive values are taken as UTC). ``digest`` is the
    SHA-256 of ``raw`` when the caller already computed it for the cache key.
    """
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    root = parse_xml(raw)
    assertion = _locate_assertion(root)
    assertion_id = assertion.get("ID")
    if not assertion_id:
        raise _reject("malformed", "the assertion has no ID")
    if assertion.get("Version") != "2.0":
        raise _reject("malformed", "the assertion is not SAML 2.0")
    _check_structure(root, assertion)
    signature = _only_signature(assertion, "assertion")
    _check_signature(signature, assertion_id, policy.allow_sha1, "assertion")
    response_signature = _response_signature(root, policy.allow_sha1)
    # Only the assertion is handed to signxml, so it cannot find a signature or resolve a
    # Reference anywhere else in the document. lxml keeps the in-scope namespace declarations
    # and exclusive c14n ignores unused ones, so these bytes stand alone, signature valid.
    assertion_xml = etree.tostring(assertion, with_tail=False)
    signed = _verify(assertion_xml, signature, policy, now)
    # What signxml vouches for must be the assertion we located, not some other element.
    if signed.tag != _ASSERTION or signed.get("ID") != assertion_id:
        raise _reject("wrapping", "the signed element is not the presented assertion")
    if response_signature is not None:
        _verify_response(raw, root, response_signature, policy, now)
    issuer, subject, audiences, recipient, limit = _claims(signed, policy, now)
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
    )
