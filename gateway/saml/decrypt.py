"""Open a saml:EncryptedAssertion with the IdP's decryption keys, through python-xmlsec.

Rules this module owns:
- No XML Encryption of our own: xmlsec (libxmlsec1, the binding python3-saml uses) decrypts.
  What this module decides is which documents it may be handed at all.
- Key transport RSA-OAEP only: RSA PKCS#1 v1.5 is refused before any private-key operation
  (Bleichenbacher). Content AES-GCM; AES-CBC only where the IdP opts in
  (``allow_cbc_encryption``), since unauthenticated CBC is open to padding oracles.
- Exactly one EncryptedData and one EncryptedKey (in its KeyInfo, or beside it and named by a
  RetrievalMethod); cipher values inline only: a CipherReference would make xmlsec read a URI.
- Every failure is ``InvalidAssertion("decryption")``; the detail names the rule that failed,
  never a key, a cipher value or the plaintext, and the client sees the one 401 of all refusals.
- The plaintext is returned as bytes, not parsed here: the validator parses it with the one
  hardened parser, and nothing logs it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from lxml import etree

from gateway.errors import InvalidAssertion

if TYPE_CHECKING:
    import xmlsec

_XENC = "http://www.w3.org/2001/04/xmlenc#"
_XENC11 = "http://www.w3.org/2009/xmlenc11#"
_DS = "http://www.w3.org/2000/09/xmldsig#"
_ENCRYPTED_DATA = f"{{{_XENC}}}EncryptedData"
_ENCRYPTED_KEY = f"{{{_XENC}}}EncryptedKey"
_METHOD = f"{{{_XENC}}}EncryptionMethod"
_CIPHER_VALUE = f"{{{_XENC}}}CipherData/{{{_XENC}}}CipherValue"
_CIPHER_REFERENCE = f"{{{_XENC}}}CipherReference"
_KEY_INFO = f"{{{_DS}}}KeyInfo"
_RETRIEVAL = f"{{{_DS}}}RetrievalMethod"
_KEY_NAME = f"{{{_DS}}}KeyName"

_KEY_TRANSPORT = {
    f"{_XENC}rsa-oaep-mgf1p": "RSA-OAEP",
    f"{_XENC11}rsa-oaep": "RSA-OAEP",
}
_GCM = {
    f"{_XENC11}aes128-gcm": "AES-128-GCM",
    f"{_XENC11}aes192-gcm": "AES-192-GCM",
    f"{_XENC11}aes256-gcm": "AES-256-GCM",
}
_CBC = {
    f"{_XENC}aes128-cbc": "AES-128-CBC",
    f"{_XENC}aes192-cbc": "AES-192-CBC",
    f"{_XENC}aes256-cbc": "AES-256-CBC",
}

_LIBRARY: list[ModuleType] = []


def _xmlsec() -> ModuleType:
    """python-xmlsec, loaded on first use: only an IdP with decryption_keys needs it, so a
    broken libxmlsec1 (its libxml2 must be lxml's) stops those IdPs' startup, not the rest."""
    if not _LIBRARY:
        try:
            import xmlsec as library
        except Exception as exc:  # ImportError, or xmlsec's libxml2 version check
            raise ValueError(f"python-xmlsec cannot be loaded ({exc})") from None
        # xmlsec resolves URIs (CipherReference, RetrievalMethod) through its IO callbacks:
        # with none registered it reads no file and reaches no network, whatever is asked.
        library.cleanup_callbacks()
        _LIBRARY.append(library)
    return _LIBRARY[0]


@dataclass(frozen=True, slots=True)
class DecryptionKey:
    """One configured private key, loaded into xmlsec once; it prints as its config key only."""

    source: str  # the config key path it came from, for explain
    manager: xmlsec.KeysManager = field(repr=False, compare=False)

    @classmethod
    def from_pem(cls, pem: bytes, source: str) -> DecryptionKey:
        """Raises ``ValueError`` (with no key material in it) unless ``pem`` is an RSA private
        key (RSA-OAEP is the only key transport accepted) that xmlsec can load."""
        try:
            private = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            raise ValueError("not an unencrypted PEM private key") from None
        if not isinstance(private, rsa.RSAPrivateKey):
            raise ValueError(f"a {type(private).__name__}, not an RSA private key (RSA-OAEP)")
        library = _xmlsec()
        try:
            key = library.Key.from_memory(pem, library.constants.KeyDataFormatPem, None)
        except library.Error:
            raise ValueError("not a readable unencrypted PEM private key") from None
        manager = library.KeysManager()
        manager.add_key(key)
        return cls(source, manager)


def _refuse(found: str, expected: str) -> InvalidAssertion:
    return InvalidAssertion(
        "decryption",
        f"decryption: expected {expected}, found {found}",
        check="decryption",
        expected=expected,
        found=found,
    )


def _algorithm(element: etree._Element, allowed: dict[str, str], expected: str) -> str:
    methods = element.findall(_METHOD)
    if len(methods) != 1:
        raise _refuse(f"{len(methods)} EncryptionMethod", expected)
    name = allowed.get(methods[0].get("Algorithm") or "")
    if name is None:
        raise _refuse("another algorithm", expected)  # the URI is the document's, not quoted
    return name


def _inline_cipher(element: etree._Element) -> None:
    if (
        len(element.findall(_CIPHER_VALUE)) != 1
        or element.find(f".//{_CIPHER_REFERENCE}") is not None
    ):
        raise _refuse("no inline CipherValue", "one CipherData/CipherValue, no CipherReference")


def _the_encrypted_key(encrypted: etree._Element, data: etree._Element) -> etree._Element:
    """The one EncryptedKey, in the EncryptedData's KeyInfo or beside it (RetrievalMethod)."""
    key_info = data.findall(_KEY_INFO)
    if len(key_info) > 1:
        raise _refuse("several KeyInfo", "one")
    inside = key_info[0].findall(_ENCRYPTED_KEY) if key_info else []
    beside = encrypted.findall(_ENCRYPTED_KEY)
    if len(inside) + len(beside) != 1:
        raise _refuse(f"{len(inside) + len(beside)} EncryptedKey", "exactly one EncryptedKey")
    if key_info:
        for child in key_info[0].iterchildren(etree.Element):
            if child.tag not in (_ENCRYPTED_KEY, _RETRIEVAL, _KEY_NAME):
                raise _refuse("other KeyInfo content", "EncryptedKey, RetrievalMethod, KeyName")
            if child.tag == _RETRIEVAL and (
                not beside or child.get("URI") != "#" + (beside[0].get("Id") or "\0")
            ):
                raise _refuse("a RetrievalMethod to elsewhere", "the EncryptedKey beside it")
    return inside[0] if inside else beside[0]


def decrypt_assertion(
    encrypted: etree._Element, keys: tuple[DecryptionKey, ...], allow_cbc: bool
) -> tuple[bytes, str]:
    """The plaintext of ``encrypted`` (a saml:EncryptedAssertion) and words for explain."""
    if not keys:
        raise _refuse("no decryption_keys for this IdP", "decryption_keys to open it")
    library = _xmlsec()  # loaded already: keys were made with it
    children = list(encrypted.iterchildren(etree.Element))
    data_elements = [c for c in children if c.tag == _ENCRYPTED_DATA]
    if len(data_elements) != 1 or any(
        c.tag not in (_ENCRYPTED_DATA, _ENCRYPTED_KEY) for c in children
    ):
        raise _refuse("other content", "one xenc:EncryptedData (and its EncryptedKey)")
    data = data_elements[0]
    content = _GCM | _CBC if allow_cbc else _GCM
    content_name = _algorithm(
        data, content, "AES-GCM" + (" or AES-CBC" if allow_cbc else " (CBC: allow_cbc_encryption)")
    )
    _inline_cipher(data)
    encrypted_key = _the_encrypted_key(encrypted, data)
    transport = _algorithm(encrypted_key, _KEY_TRANSPORT, "RSA-OAEP key transport")
    _inline_cipher(encrypted_key)
    for key in keys:
        # A fresh copy per attempt: xmlsec edits what it decrypts. Without the Type attribute
        # xmlsec returns the plaintext as bytes instead of parsing it into the tree itself;
        # the EncryptedKey goes into KeyInfo, the one place xmlsec looks without a URI.
        attempt = copy.deepcopy(data)
        if "Type" in attempt.attrib:
            del attempt.attrib["Type"]
        for old in attempt.findall(_KEY_INFO):
            attempt.remove(old)
        key_info = etree.Element(_KEY_INFO)
        transported = copy.deepcopy(encrypted_key)
        # The EncryptedKey's own KeyInfo only hints at which of our keys it is for (AD FS
        # names the certificate): every configured key is tried anyway, and xmlsec must take
        # no key, and follow no reference, from the document.
        for hint in transported.findall(_KEY_INFO):
            transported.remove(hint)
        key_info.append(transported)
        attempt.insert(1, key_info)  # after EncryptionMethod, as the schema orders them
        try:
            plain = library.EncryptionContext(key.manager).decrypt(attempt)
        except (library.Error, ValueError, TypeError):
            continue  # the next key, for rollover; which one failed is nobody else's business
        if isinstance(plain, bytes) and plain:
            return plain, f"{content_name}, {transport} key transport, with {key.source}"
    raise _refuse(f"no key of {len(keys)} opened it", "a key in decryption_keys that opens it")
