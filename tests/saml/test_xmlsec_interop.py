"""Interoperability: an assertion signed by an independent signer (the xmlsec1 CLI) verifies."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)
from lxml import etree

from gateway.devkit.idp import DS_NS, DemoIdP
from gateway.errors import InvalidAssertion
from gateway.saml import validate_assertion

from .helpers import AUDIENCE, NOW, RECIPIENT, PolicyFactory

XMLSEC1 = shutil.which("xmlsec1")
pytestmark = pytest.mark.skipif(XMLSEC1 is None, reason="xmlsec1 CLI is not on PATH")

_EXC = "http://www.w3.org/2001/10/xml-exc-c14n#"
_METHODS = {
    "rsa": "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256",
    "ec": "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256",
}


def _template(idp: DemoIdP, kind: str) -> etree._Element:
    assertion = idp.build_assertion(
        "xmlsec@example.test", audience=AUDIENCE, recipient=RECIPIENT, now=NOW
    )
    signature = assertion.find(f"{{{DS_NS}}}Signature")
    del signature.attrib["Id"]  # the placeholder becomes xmlsec1's template
    ds = f"{{{DS_NS}}}"
    signed_info = etree.SubElement(signature, ds + "SignedInfo")
    etree.SubElement(signed_info, ds + "CanonicalizationMethod", Algorithm=_EXC)
    etree.SubElement(signed_info, ds + "SignatureMethod", Algorithm=_METHODS[kind])
    reference = etree.SubElement(signed_info, ds + "Reference", URI="#" + assertion.get("ID"))
    transforms = etree.SubElement(reference, ds + "Transforms")
    etree.SubElement(
        transforms,
        ds + "Transform",
        Algorithm="http://www.w3.org/2000/09/xmldsig#enveloped-signature",
    )
    etree.SubElement(transforms, ds + "Transform", Algorithm=_EXC)
    etree.SubElement(
        reference, ds + "DigestMethod", Algorithm="http://www.w3.org/2001/04/xmlenc#sha256"
    )
    etree.SubElement(reference, ds + "DigestValue")
    etree.SubElement(signature, ds + "SignatureValue")
    key_info = etree.SubElement(signature, ds + "KeyInfo")
    etree.SubElement(etree.SubElement(key_info, ds + "X509Data"), ds + "X509Certificate")
    return assertion


def _xmlsec_sign(idp: DemoIdP, kind: str, tmp_path: Path) -> bytes:
    key = tmp_path / "key.pem"
    key.write_bytes(
        idp.private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    )
    cert = idp.write_certificate(tmp_path / "cert.pem")
    template = tmp_path / "template.xml"
    template.write_bytes(etree.tostring(_template(idp, kind)))
    out = tmp_path / "signed.xml"
    subprocess.run(
        [
            str(XMLSEC1),
            "--sign",
            "--privkey-pem",
            f"{key},{cert}",
            "--id-attr:ID",
            "urn:oasis:names:tc:SAML:2.0:assertion:Assertion",
            "--output",
            str(out),
            str(template),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return out.read_bytes()


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_xmlsec1_signed_assertion_is_accepted(
    kind: str, idp: DemoIdP, ec_idp: DemoIdP, make_policy: PolicyFactory, tmp_path: Path
) -> None:
    signer = idp if kind == "rsa" else ec_idp
    raw = _xmlsec_sign(signer, kind, tmp_path)
    assert b"<ds:SignatureValue>" in raw and b"<ds:SignatureValue/>" not in raw
    result = validate_assertion(raw, make_policy(signer), NOW)
    assert result.subject == "xmlsec@example.test"
    assert result.recipient == RECIPIENT
    # and the same bytes, edited, are refused: the check is real
    with pytest.raises(InvalidAssertion) as caught:
        validate_assertion(raw.replace(b"xmlsec@", b"xmlsex@"), make_policy(signer), NOW)
    assert caught.value.reason == "signature"


def _saml11_template(idp: DemoIdP) -> etree._Element:
    """A SAML 1.1 assertion with an empty signature template last, as AD FS places it."""
    assertion = idp.build_saml11_assertion("adfs@example.test", audience=AUDIENCE, now=NOW)
    template = _template(idp, "rsa").find(f"{{{DS_NS}}}Signature")  # the 2.0 one's shape
    reference = template.find(f"{{{DS_NS}}}SignedInfo/{{{DS_NS}}}Reference")
    reference.set("URI", "#" + assertion.get("AssertionID"))
    assertion.append(template)
    return assertion


def test_xmlsec1_signed_saml11_assertion_is_accepted(
    idp: DemoIdP, make_policy: PolicyFactory, tmp_path: Path
) -> None:
    key = tmp_path / "key.pem"
    key.write_bytes(
        idp.private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    )
    cert = idp.write_certificate(tmp_path / "cert.pem")
    template = tmp_path / "template11.xml"
    template.write_bytes(etree.tostring(_saml11_template(idp)))
    out = tmp_path / "signed11.xml"
    subprocess.run(
        [
            str(XMLSEC1),
            "--sign",
            "--privkey-pem",
            f"{key},{cert}",
            "--id-attr:AssertionID",
            "urn:oasis:names:tc:SAML:1.0:assertion:Assertion",
            "--output",
            str(out),
            str(template),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    raw = out.read_bytes()
    assert b"<ds:SignatureValue>" in raw and b"<ds:SignatureValue/>" not in raw
    policy = make_policy(idp, saml_versions=frozenset({"1.1"}))
    result = validate_assertion(raw, policy, NOW)
    assert (result.saml_version, result.subject) == ("1.1", "adfs@example.test")
    with pytest.raises(InvalidAssertion) as caught:
        validate_assertion(raw.replace(b"adfs@", b"adfx@"), policy, NOW)
    assert caught.value.reason == "signature"
