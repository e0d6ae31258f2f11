"""An embedded identity provider that signs real SAML 2.0 assertions: for tests and demos.

It makes a fresh key and self-signed certificate at start-up and signs with signxml, so what
it issues is verified exactly like a real IdP's output. Nothing here is used on the request
path of the gateway. The unsigned builders (``build_assertion``/``build_response``) and
``sign`` are public so tests can craft the documents attackers send.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from lxml import etree
from signxml.algorithms import CanonicalizationMethod, DigestAlgorithm, SignatureMethod
from signxml.signer import XMLSigner

SAML_NS = "urn:oasis:names:tc:SAML:2.0:assertion"
SAMLP_NS = "urn:oasis:names:tc:SAML:2.0:protocol"
DS_NS = "http://www.w3.org/2000/09/xmldsig#"
_BEARER = "urn:oasis:names:tc:SAML:2.0:cm:bearer"
_SUCCESS = "urn:oasis:names:tc:SAML:2.0:status:Success"
_EMAIL = "urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress"
_AUTHN_CONTEXT_CLASS = "urn:oasis:names:tc:SAML:2.0:ac:classes:PasswordProtectedTransport"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _saml(tag: str) -> str:
    return f"{{{SAML_NS}}}{tag}"


def instant(moment: datetime) -> str:
    """An xs:dateTime in UTC with milliseconds, as IdPs write them."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def encode_header(raw: bytes) -> str:
    """Standard base64, as a client puts the assertion into ``X-SAML-Assertion``."""
    return base64.b64encode(raw).decode("ascii")


def new_id() -> str:
    return "_" + secrets.token_hex(16)


class _PermissiveSigner(XMLSigner):
    """signxml refuses to produce SHA-1 signatures; the demo IdP may, to test their rejection."""

    def check_deprecated_methods(self) -> None:
        return None


@dataclass(frozen=True)
class DemoIdP:
    issuer: str
    private_key: PrivateKey = field(repr=False)
    certificate: x509.Certificate = field(repr=False)
    certificate_pem: bytes = field(repr=False)

    @classmethod
    def generate(
        cls,
        issuer: str,
        key: Literal["rsa", "ec"] = "rsa",
        rsa_bits: int = 2048,
        *,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        common_name: str = "demo-idp",
    ) -> DemoIdP:
        """A fresh key and a self-signed certificate (valid from a day ago for ten years)."""
        private_key: PrivateKey
        if key == "rsa":
            private_key = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
        else:
            private_key = ec.generate_private_key(ec.SECP256R1())
        start = not_before or datetime.now(UTC) - timedelta(days=1)
        end = not_after or start + timedelta(days=3650)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(private_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .sign(private_key, hashes.SHA256())
        )
        return cls(issuer, private_key, certificate, certificate.public_bytes(Encoding.PEM))

    @property
    def default_algorithm(self) -> str:
        return (
            "ecdsa-sha256"
            if isinstance(self.private_key, ec.EllipticCurvePrivateKey)
            else ("rsa-sha256")
        )

    def write_certificate(self, path: str | Path) -> Path:
        target = Path(path)
        target.write_bytes(self.certificate_pem)
        return target

    # --- unsigned documents ---------------------------------------------------------

    def build_assertion(
        self,
        subject: str,
        *,
        audience: str,
        recipient: str,
        now: datetime,
        lifetime: float = 300,
        assertion_id: str | None = None,
        attributes: Mapping[str, str] | None = None,
        issuer: str | None = None,
        placeholder: bool = True,
    ) -> etree._Element:
        """An unsigned saml:Assertion; with ``placeholder`` the signature goes after Issuer."""
        until = now + timedelta(seconds=lifetime)
        assertion_id = assertion_id or new_id()
        root = etree.Element(
            _saml("Assertion"),
            nsmap={"saml": SAML_NS},
            ID=assertion_id,
            Version="2.0",
            IssueInstant=instant(now),
        )
        etree.SubElement(root, _saml("Issuer")).text = issuer or self.issuer
        if placeholder:
            etree.SubElement(root, f"{{{DS_NS}}}Signature", nsmap={"ds": DS_NS}, Id="placeholder")
        subject_el = etree.SubElement(root, _saml("Subject"))
        name_id = etree.SubElement(subject_el, _saml("NameID"), Format=_EMAIL)
        name_id.text = subject
        confirmation = etree.SubElement(subject_el, _saml("SubjectConfirmation"), Method=_BEARER)
        etree.SubElement(
            confirmation,
            _saml("SubjectConfirmationData"),
            NotOnOrAfter=instant(until),
            Recipient=recipient,
        )
        conditions = etree.SubElement(
            root,
            _saml("Conditions"),
            NotBefore=instant(now - timedelta(seconds=5)),
            NotOnOrAfter=instant(until),
        )
        restriction = etree.SubElement(conditions, _saml("AudienceRestriction"))
        etree.SubElement(restriction, _saml("Audience")).text = audience
        statement = etree.SubElement(
            root, _saml("AuthnStatement"), AuthnInstant=instant(now), SessionIndex=assertion_id
        )
        context = etree.SubElement(statement, _saml("AuthnContext"))
        etree.SubElement(context, _saml("AuthnContextClassRef")).text = _AUTHN_CONTEXT_CLASS
        if attributes:
            attribute_statement = etree.SubElement(root, _saml("AttributeStatement"))
            for name, value in attributes.items():
                attribute = etree.SubElement(attribute_statement, _saml("Attribute"), Name=name)
                etree.SubElement(attribute, _saml("AttributeValue")).text = value
        return root

    def build_response(
        self,
        assertions: list[etree._Element],
        *,
        destination: str,
        now: datetime,
        response_id: str | None = None,
        placeholder: bool = False,
    ) -> etree._Element:
        """An unsigned samlp:Response around ``assertions`` (tests pass several to attack)."""
        response = etree.Element(
            f"{{{SAMLP_NS}}}Response",
            nsmap={"samlp": SAMLP_NS, "saml": SAML_NS},
            ID=response_id or new_id(),
            Version="2.0",
            IssueInstant=instant(now),
            Destination=destination,
        )
        etree.SubElement(response, _saml("Issuer")).text = self.issuer
        if placeholder:
            etree.SubElement(
                response, f"{{{DS_NS}}}Signature", nsmap={"ds": DS_NS}, Id="placeholder"
            )
        status = etree.SubElement(response, f"{{{SAMLP_NS}}}Status")
        etree.SubElement(status, f"{{{SAMLP_NS}}}StatusCode", Value=_SUCCESS)
        response.extend(assertions)
        return response

    # --- signing ------------------------------------------------------------------------

    def sign(
        self,
        element: etree._Element,
        *,
        algorithm: str | None = None,
        key: PrivateKey | None = None,
        certificate: x509.Certificate | None = None,
    ) -> etree._Element:
        """An enveloped, exclusive-c14n signature over ``element`` (a signed copy)."""
        method = SignatureMethod.from_fragment(algorithm or self.default_algorithm)  # type: ignore[no-untyped-call]
        digest = DigestAlgorithm.SHA1 if "SHA1" in method.name else DigestAlgorithm.SHA256
        signer = _PermissiveSigner(
            signature_algorithm=method,
            digest_algorithm=digest,
            c14n_algorithm=CanonicalizationMethod.EXCLUSIVE_XML_CANONICALIZATION_1_0,
        )
        signed: Any = signer.sign(
            element,
            key=key or self.private_key,
            cert=[certificate or self.certificate],
        )
        return signed  # type: ignore[no-any-return]

    def issue(
        self,
        subject: str,
        *,
        audience: str,
        recipient: str,
        now: datetime,
        lifetime: float = 300,
        assertion_id: str | None = None,
        algorithm: str | None = None,
        attributes: Mapping[str, str] | None = None,
    ) -> bytes:
        """A signed bare saml:Assertion."""
        unsigned = self.build_assertion(
            subject,
            audience=audience,
            recipient=recipient,
            now=now,
            lifetime=lifetime,
            assertion_id=assertion_id,
            attributes=attributes,
        )
        return etree.tostring(self.sign(unsigned, algorithm=algorithm))

    def issue_response(
        self,
        subject: str,
        *,
        audience: str,
        recipient: str,
        now: datetime,
        lifetime: float = 300,
        assertion_id: str | None = None,
        algorithm: str | None = None,
        attributes: Mapping[str, str] | None = None,
        sign_assertion: bool = True,
        sign_response: bool = False,
    ) -> bytes:
        """A samlp:Response holding one assertion (signed unless told otherwise)."""
        assertion = self.build_assertion(
            subject,
            audience=audience,
            recipient=recipient,
            now=now,
            lifetime=lifetime,
            assertion_id=assertion_id,
            attributes=attributes,
            placeholder=sign_assertion,
        )
        if sign_assertion:
            assertion = self.sign(assertion, algorithm=algorithm)
        response = self.build_response(
            [assertion], destination=recipient, now=now, placeholder=sign_response
        )
        if sign_response:
            response = self.sign(response, algorithm=algorithm)
        return etree.tostring(response)
