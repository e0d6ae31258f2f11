"""An embedded identity provider that signs real SAML 2.0 and 1.1 assertions: for tests and demos.

It makes a fresh key and self-signed certificate at start-up and signs with signxml, so what
it issues is verified exactly like a real IdP's output; it encrypts with python-xmlsec (the
library the gateway decrypts with) as AD FS or Shibboleth do. Nothing here is used on the
request path of the gateway. The unsigned builders (``build_assertion``/``build_response``,
``build_saml11_assertion``) and ``sign``/``encrypt`` are public so tests can craft the
documents attackers send.
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

from gateway.saml.xml import parse_xml

SAML_NS = "urn:oasis:names:tc:SAML:2.0:assertion"
SAML1_NS = "urn:oasis:names:tc:SAML:1.0:assertion"
XENC_NS = "http://www.w3.org/2001/04/xmlenc#"
SAMLP_NS = "urn:oasis:names:tc:SAML:2.0:protocol"
DS_NS = "http://www.w3.org/2000/09/xmldsig#"
_BEARER = "urn:oasis:names:tc:SAML:2.0:cm:bearer"
_BEARER1 = "urn:oasis:names:tc:SAML:1.0:cm:bearer"
_PASSWORD1 = "urn:oasis:names:tc:SAML:1.0:am:password"
_SUCCESS = "urn:oasis:names:tc:SAML:2.0:status:Success"
_EMAIL = "urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress"
_AUTHN_CONTEXT_CLASS = "urn:oasis:names:tc:SAML:2.0:ac:classes:PasswordProtectedTransport"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _saml(tag: str) -> str:
    return f"{{{SAML_NS}}}{tag}"


def _saml1(tag: str) -> str:
    return f"{{{SAML1_NS}}}{tag}"


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

    def build_saml11_assertion(
        self,
        subject: str,
        *,
        audience: str,
        now: datetime,
        lifetime: float = 300,
        assertion_id: str | None = None,
        attributes: Mapping[str, str] | None = None,
        issuer: str | None = None,
        statements: tuple[str, ...] = ("AttributeStatement", "AuthenticationStatement"),
    ) -> etree._Element:
        """An unsigned SAML 1.1 assertion as AD FS writes it (``sign`` puts the signature last).

        Each statement carries its own Subject: the NameIdentifier and a bearer confirmation.
        """
        until = now + timedelta(seconds=lifetime)
        assertion_id = assertion_id or new_id()
        root = etree.Element(
            _saml1("Assertion"),
            nsmap={"saml": SAML1_NS},
            MajorVersion="1",
            MinorVersion="1",
            AssertionID=assertion_id,
            Issuer=issuer or self.issuer,
            IssueInstant=instant(now),
        )
        conditions = etree.SubElement(
            root,
            _saml1("Conditions"),
            NotBefore=instant(now - timedelta(seconds=5)),
            NotOnOrAfter=instant(until),
        )
        restriction = etree.SubElement(conditions, _saml1("AudienceRestrictionCondition"))
        etree.SubElement(restriction, _saml1("Audience")).text = audience
        for kind in statements:
            statement = etree.SubElement(root, _saml1(kind))
            if kind == "AuthenticationStatement":
                statement.set("AuthenticationMethod", _PASSWORD1)
                statement.set("AuthenticationInstant", instant(now))
            subject_el = etree.SubElement(statement, _saml1("Subject"))
            etree.SubElement(subject_el, _saml1("NameIdentifier")).text = subject
            confirmation = etree.SubElement(subject_el, _saml1("SubjectConfirmation"))
            etree.SubElement(confirmation, _saml1("ConfirmationMethod")).text = _BEARER1
            if kind == "AttributeStatement":
                for name, value in (attributes or {"emailaddress": subject}).items():
                    attribute = etree.SubElement(
                        statement,
                        _saml1("Attribute"),
                        AttributeName=name,
                        AttributeNamespace="http://schemas.xmlsoap.org/ws/2005/05/identity/claims",
                    )
                    etree.SubElement(attribute, _saml1("AttributeValue")).text = value
        return root

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
        # SAML 1.1 names its ID ``AssertionID``; signxml looks for ``ID``/``Id`` by itself.
        saml11 = element.tag == _saml1("Assertion")
        signed: Any = signer.sign(
            element,
            key=key or self.private_key,
            cert=[certificate or self.certificate],
            reference_uri="#" + element.get("AssertionID", "") if saml11 else None,
            id_attribute="AssertionID" if saml11 else None,
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

    def issue_saml11(
        self,
        subject: str,
        *,
        audience: str,
        now: datetime,
        lifetime: float = 300,
        assertion_id: str | None = None,
        algorithm: str | None = None,
        attributes: Mapping[str, str] | None = None,
    ) -> bytes:
        """A signed SAML 1.1 assertion (what AD FS returns from WS-Trust)."""
        unsigned = self.build_saml11_assertion(
            subject,
            audience=audience,
            now=now,
            lifetime=lifetime,
            assertion_id=assertion_id,
            attributes=attributes,
        )
        return etree.tostring(self.sign(unsigned, algorithm=algorithm))


# --- encryption (XML Encryption with python-xmlsec, as the gateway decrypts it) ---------

ContentAlgorithm = Literal["aes128-gcm", "aes256-gcm", "aes128-cbc", "aes256-cbc"]
KeyTransport = Literal["rsa-oaep", "rsa-1_5"]


def encrypt_assertion(
    assertion: bytes,
    certificate_pem: bytes,
    *,
    content: ContentAlgorithm = "aes256-gcm",
    transport: KeyTransport = "rsa-oaep",
    response: etree._Element | None = None,
    key_outside: bool = False,
) -> bytes:
    """``assertion`` (serialised, usually signed) as a saml:EncryptedAssertion for the SP
    whose encryption certificate is ``certificate_pem``.

    The EncryptedKey sits in the EncryptedData's KeyInfo, or with ``key_outside`` next to it
    (referenced by RetrievalMethod, as Shibboleth writes it). With ``response`` (an unsigned
    samlp:Response, see ``DemoIdP.build_response``) the EncryptedAssertion is put into it.
    """
    import xmlsec  # the devkit alone encrypts; imported here so importing the devkit stays cheap

    methods = {
        "aes128-gcm": xmlsec.constants.TransformAes128Gcm,
        "aes256-gcm": xmlsec.constants.TransformAes256Gcm,
        "aes128-cbc": xmlsec.constants.TransformAes128Cbc,
        "aes256-cbc": xmlsec.constants.TransformAes256Cbc,
    }
    key_sizes = {"aes128-gcm": 128, "aes256-gcm": 256, "aes128-cbc": 128, "aes256-cbc": 256}
    transports = {
        "rsa-oaep": xmlsec.constants.TransformRsaOaep,
        "rsa-1_5": xmlsec.constants.TransformRsaPkcs1,
    }
    # Encrypted inside a holder that declares no namespace, so the plaintext keeps every
    # declaration it needs: it must parse on its own, as an IdP's standalone serialisation.
    holder = etree.Element("holder")
    template = xmlsec.template.encrypted_data_create(
        holder, methods[content], type=xmlsec.constants.TypeEncElement, ns="xenc"
    )
    xmlsec.template.encrypted_data_ensure_cipher_value(template)
    key_info = xmlsec.template.encrypted_data_ensure_key_info(template, ns="ds")
    encrypted_key = xmlsec.template.add_encrypted_key(key_info, transports[transport])
    xmlsec.template.encrypted_data_ensure_cipher_value(encrypted_key)
    manager = xmlsec.KeysManager()
    manager.add_key(xmlsec.Key.from_memory(certificate_pem, xmlsec.constants.KeyDataFormatCertPem))
    context = xmlsec.EncryptionContext(manager)
    context.key = xmlsec.Key.generate(
        xmlsec.constants.KeyDataAes, key_sizes[content], xmlsec.constants.KeyDataTypeSession
    )
    target = parse_xml(assertion)
    holder.append(target)
    context.encrypt_xml(template, target)
    # Re-read what xmlsec wrote, so lxml sees its namespaces as a parser would.
    data = parse_xml(etree.tostring(holder))[0]
    wrapper = etree.Element(_saml("EncryptedAssertion"), nsmap={"saml": SAML_NS})
    wrapper.append(data)
    if key_outside:
        found_info = wrapper.find(f"{{{XENC_NS}}}EncryptedData/{{{DS_NS}}}KeyInfo")
        key_element = None if found_info is None else found_info.find(f"{{{XENC_NS}}}EncryptedKey")
        if found_info is None or key_element is None:
            raise RuntimeError("xmlsec wrote no EncryptedKey into KeyInfo")
        key_id = new_id()
        key_element.set("Id", key_id)
        wrapper.append(key_element)
        etree.SubElement(
            found_info,
            f"{{{DS_NS}}}RetrievalMethod",
            URI="#" + key_id,
            Type="http://www.w3.org/2001/04/xmlenc#EncryptedKey",
        )
    if response is not None:
        response.append(wrapper)
        return etree.tostring(response)
    return etree.tostring(wrapper)
