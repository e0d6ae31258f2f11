"""saml:EncryptedAssertion: decrypted with python-xmlsec, then held to every rule as if bare."""

from __future__ import annotations

import base64
import copy
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from lxml import etree

from gateway.config import (
    AssertionSettings,
    AuthorizationServer,
    IdentityProvider,
    parse_config,
)
from gateway.devkit.idp import DS_NS, SAML_NS, XENC_NS, DemoIdP, encrypt_assertion
from gateway.errors import ConfigError, InvalidAssertion
from gateway.saml import (
    TrustPolicy,
    assertion_digest,
    build_trust_policy,
    parse_xml,
    validate_assertion,
)
from gateway.saml.decrypt import DecryptionKey

from .helpers import AUDIENCE, ISSUER, NOW, RECIPIENT, PolicyFactory

XENC = f"{{{XENC_NS}}}"
BOTH = frozenset({"1.1", "2.0"})


def _pem(holder: DemoIdP) -> bytes:
    return holder.private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


@pytest.fixture(scope="module")
def sp() -> DemoIdP:
    """The gateway's own encryption key pair (the IdP encrypts to its certificate)."""
    return DemoIdP.generate("https://gateway.example.test", "rsa")


@pytest.fixture(scope="module")
def other_sp() -> DemoIdP:
    return DemoIdP.generate("https://other.example.test", "rsa")


@pytest.fixture
def enc_policy(make_policy: PolicyFactory, sp: DemoIdP) -> TrustPolicy:
    return make_policy(
        decryption_keys=(DecryptionKey.from_pem(_pem(sp), "test"),), saml_versions=BOTH
    )


def reason_of(raw: bytes, policy: TrustPolicy) -> str:
    with pytest.raises(InvalidAssertion) as caught:
        validate_assertion(raw, policy, NOW)
    return caught.value.reason


def signed(idp: DemoIdP, subject: str = "alice@example.test") -> bytes:
    return idp.issue(subject, audience=AUDIENCE, recipient=RECIPIENT, now=NOW)


def _flip(raw: bytes, path: str) -> bytes:
    """One bit of the CipherValue at ``path`` changed (the base64 stays valid)."""
    root = parse_xml(raw)
    value = root.find(path)
    data = bytearray(base64.b64decode(value.text))
    data[len(data) // 2] ^= 0x01
    value.text = base64.b64encode(bytes(data)).decode()
    return etree.tostring(root)


_DATA_CIPHER = f"{XENC}EncryptedData/{XENC}CipherData/{XENC}CipherValue"
_KEY_CIPHER = f".//{XENC}EncryptedKey/{XENC}CipherData/{XENC}CipherValue"


# --- accepted ------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["aes128-gcm", "aes256-gcm"])
@pytest.mark.parametrize("key_outside", [False, True], ids=["key-in-keyinfo", "key-beside"])
def test_gcm_encrypted_assertion_is_accepted(
    idp: DemoIdP, sp: DemoIdP, enc_policy: TrustPolicy, content: str, key_outside: bool
) -> None:
    inner = signed(idp)
    raw = encrypt_assertion(inner, sp.certificate_pem, content=content, key_outside=key_outside)  # type: ignore[arg-type]
    assert b"alice" not in raw
    result = validate_assertion(raw, enc_policy, NOW)
    assert result.subject == "alice@example.test"
    # The token request carries the decrypted, signed assertion; the cache binds the token
    # to the presented (encrypted) bytes.
    assert result.raw == inner
    assert result.digest == assertion_digest(raw)
    plain = validate_assertion(inner, enc_policy, NOW)
    assert result.fingerprint == plain.fingerprint and result.id == plain.id


@pytest.mark.parametrize("sign_response", [False, True])
def test_encrypted_assertion_in_a_response(
    idp: DemoIdP, sp: DemoIdP, enc_policy: TrustPolicy, sign_response: bool
) -> None:
    inner = signed(idp, "carol@example.test")
    response = idp.build_response([], destination=RECIPIENT, now=NOW, placeholder=sign_response)
    raw = encrypt_assertion(inner, sp.certificate_pem, response=response)
    if sign_response:
        raw = etree.tostring(idp.sign(parse_xml(raw)))
    result = validate_assertion(raw, enc_policy, NOW)
    assert (result.subject, result.raw) == ("carol@example.test", inner)


def test_encrypted_saml11_assertion(idp: DemoIdP, sp: DemoIdP, enc_policy: TrustPolicy) -> None:
    inner = idp.issue_saml11("john@example.test", audience=AUDIENCE, now=NOW)
    result = validate_assertion(encrypt_assertion(inner, sp.certificate_pem), enc_policy, NOW)
    assert (result.saml_version, result.subject, result.raw) == ("1.1", "john@example.test", inner)


def test_cbc_is_accepted_only_where_the_idp_opts_in(
    idp: DemoIdP, sp: DemoIdP, make_policy: PolicyFactory
) -> None:
    raw = encrypt_assertion(signed(idp), sp.certificate_pem, content="aes256-cbc")
    keys = (DecryptionKey.from_pem(_pem(sp), "test"),)
    assert reason_of(raw, make_policy(decryption_keys=keys)) == "decryption"
    opted_in = make_policy(decryption_keys=keys, allow_cbc_encryption=True)
    assert validate_assertion(raw, opted_in, NOW).subject == "alice@example.test"


def test_key_rollover_any_configured_key_opens_it(
    idp: DemoIdP, sp: DemoIdP, other_sp: DemoIdP, make_policy: PolicyFactory
) -> None:
    keys = (DecryptionKey.from_pem(_pem(other_sp), "old"), DecryptionKey.from_pem(_pem(sp), "new"))
    raw = encrypt_assertion(signed(idp), sp.certificate_pem)
    assert validate_assertion(raw, make_policy(decryption_keys=keys), NOW).id


def test_a_key_hint_in_the_encrypted_key_decides_nothing(
    idp: DemoIdP, sp: DemoIdP, other_sp: DemoIdP, enc_policy: TrustPolicy
) -> None:
    # AD FS names the certificate it encrypted to in the EncryptedKey's KeyInfo; a name (or
    # a public key) there is no reason to use or skip any configured key.
    root = parse_xml(encrypt_assertion(signed(idp), sp.certificate_pem))
    encrypted_key = root.find(f".//{XENC}EncryptedKey")
    hint = etree.Element(f"{{{DS_NS}}}KeyInfo")
    encrypted_key.insert(1, hint)
    x509 = etree.SubElement(
        etree.SubElement(hint, f"{{{DS_NS}}}X509Data"), f"{{{DS_NS}}}X509Certificate"
    )
    x509.text = base64.b64encode(other_sp.certificate.public_bytes(Encoding.DER)).decode()
    assert validate_assertion(etree.tostring(root), enc_policy, NOW).subject == "alice@example.test"


# --- refused: decryption ---------------------------------------------------------------------


def test_wrong_key_is_refused(
    idp: DemoIdP, other_sp: DemoIdP, make_policy: PolicyFactory, sp: DemoIdP
) -> None:
    raw = encrypt_assertion(signed(idp), sp.certificate_pem)
    policy = make_policy(decryption_keys=(DecryptionKey.from_pem(_pem(other_sp), "k"),))
    assert reason_of(raw, policy) == "decryption"


def test_rsa_1_5_key_transport_is_refused(
    idp: DemoIdP, sp: DemoIdP, enc_policy: TrustPolicy
) -> None:
    raw = encrypt_assertion(signed(idp), sp.certificate_pem, transport="rsa-1_5")
    assert b"xmlenc#rsa-1_5" in raw
    with pytest.raises(InvalidAssertion) as caught:
        validate_assertion(raw, enc_policy, NOW)
    assert caught.value.reason == "decryption"
    assert "RSA-OAEP" in caught.value.expected  # refused for the algorithm, not for the key


def test_no_decryption_keys_is_refused(idp: DemoIdP, sp: DemoIdP, policy: TrustPolicy) -> None:
    assert reason_of(encrypt_assertion(signed(idp), sp.certificate_pem), policy) == "decryption"


@pytest.mark.parametrize("content", ["aes256-gcm", "aes256-cbc"])
def test_tampered_ciphertext_is_refused(
    idp: DemoIdP, sp: DemoIdP, make_policy: PolicyFactory, content: str
) -> None:
    policy = make_policy(
        decryption_keys=(DecryptionKey.from_pem(_pem(sp), "k"),), allow_cbc_encryption=True
    )
    raw = encrypt_assertion(signed(idp), sp.certificate_pem, content=content)  # type: ignore[arg-type]
    tampered = _flip(raw, _DATA_CIPHER)
    assert tampered != raw
    # GCM's tag catches it at decryption; CBC has no tag, so garbage comes out, and it is
    # caught as unparseable or by the inner signature: never accepted.
    expected = {"decryption"} if content.endswith("gcm") else {"decryption", "signature"}
    assert reason_of(tampered, policy) in expected


def test_tampered_encrypted_key_is_refused(
    idp: DemoIdP, sp: DemoIdP, enc_policy: TrustPolicy
) -> None:
    raw = encrypt_assertion(signed(idp), sp.certificate_pem)
    assert reason_of(_flip(raw, _KEY_CIPHER), enc_policy) == "decryption"


def test_cipher_reference_is_refused(idp: DemoIdP, sp: DemoIdP, enc_policy: TrustPolicy) -> None:
    root = parse_xml(encrypt_assertion(signed(idp), sp.certificate_pem))
    cipher_data = root.find(f"{XENC}EncryptedData/{XENC}CipherData")
    cipher_data.remove(cipher_data[0])
    etree.SubElement(cipher_data, f"{XENC}CipherReference", URI="file:///etc/passwd")
    assert reason_of(etree.tostring(root), enc_policy) == "decryption"


def test_two_encrypted_keys_are_refused(idp: DemoIdP, sp: DemoIdP, enc_policy: TrustPolicy) -> None:
    root = parse_xml(encrypt_assertion(signed(idp), sp.certificate_pem, key_outside=True))
    key_info = root.find(f"{XENC}EncryptedData/{{{DS_NS}}}KeyInfo")
    second = copy.deepcopy(root.find(f"{XENC}EncryptedKey"))
    del second.attrib["Id"]  # (a duplicate Id would be refused as wrapping first)
    key_info.append(second)
    assert reason_of(etree.tostring(root), enc_policy) == "decryption"


# --- refused: what was inside ----------------------------------------------------------------


def test_unsigned_inner_assertion_is_refused_even_in_a_signed_response(
    idp: DemoIdP, sp: DemoIdP, enc_policy: TrustPolicy
) -> None:
    unsigned = idp.build_assertion(
        "admin@example.test", audience=AUDIENCE, recipient=RECIPIENT, now=NOW, placeholder=False
    )
    response = idp.build_response([], destination=RECIPIENT, now=NOW, placeholder=True)
    raw = encrypt_assertion(etree.tostring(unsigned), sp.certificate_pem, response=response)
    signed_response = etree.tostring(idp.sign(parse_xml(raw)))
    with pytest.raises(InvalidAssertion) as caught:
        validate_assertion(signed_response, enc_policy, NOW)
    assert caught.value.reason == "signature"
    assert "admin" not in str(caught.value)
    # bare, too
    bare = encrypt_assertion(etree.tostring(unsigned), sp.certificate_pem)
    assert reason_of(bare, enc_policy) == "signature"


def test_inner_assertion_wrapping_another_is_refused(
    idp: DemoIdP, sp: DemoIdP, enc_policy: TrustPolicy
) -> None:
    genuine = parse_xml(signed(idp))
    evil = idp.build_assertion(
        "admin@example.test", audience=AUDIENCE, recipient=RECIPIENT, now=NOW, placeholder=False
    )
    evil.insert(1, genuine.find(f"{{{DS_NS}}}Signature"))
    etree.SubElement(evil, f"{{{SAML_NS}}}Advice").append(genuine)
    raw = encrypt_assertion(etree.tostring(evil), sp.certificate_pem)
    assert reason_of(raw, enc_policy) == "wrapping"


def test_inner_assertion_signed_by_another_key_is_refused(
    attacker: DemoIdP, sp: DemoIdP, enc_policy: TrustPolicy
) -> None:
    # Anyone can encrypt to the gateway's certificate: encryption proves nothing of origin.
    raw = encrypt_assertion(signed(attacker, "admin@example.test"), sp.certificate_pem)
    assert reason_of(raw, enc_policy) == "signature"


def test_encrypted_and_plain_assertion_together_are_refused(
    idp: DemoIdP, sp: DemoIdP, enc_policy: TrustPolicy
) -> None:
    response = idp.build_response(
        [parse_xml(signed(idp, "bob@example.test"))], destination=RECIPIENT, now=NOW
    )
    raw = encrypt_assertion(signed(idp), sp.certificate_pem, response=response)
    assert reason_of(raw, enc_policy) == "wrapping"


def test_inner_response_is_refused(idp: DemoIdP, sp: DemoIdP, enc_policy: TrustPolicy) -> None:
    inner = idp.issue_response("a", audience=AUDIENCE, recipient=RECIPIENT, now=NOW)
    assert reason_of(encrypt_assertion(inner, sp.certificate_pem), enc_policy) == "malformed"


def test_refusal_detail_holds_no_plaintext_or_key(
    idp: DemoIdP, sp: DemoIdP, other_sp: DemoIdP, make_policy: PolicyFactory
) -> None:
    raw = encrypt_assertion(signed(idp, "secret-person@example.test"), sp.certificate_pem)
    policy = make_policy(decryption_keys=(DecryptionKey.from_pem(_pem(other_sp), "k0"),))
    with pytest.raises(InvalidAssertion) as caught:
        validate_assertion(raw, policy, NOW)
    text = str(caught.value) + caught.value.found + caught.value.expected
    assert "secret-person" not in text and "BEGIN" not in text and "CipherValue" not in text
    assert caught.value.public_message == "the SAML assertion was not accepted"


# --- configuration ---------------------------------------------------------------------------


def _trust(tmp_path: Path, idp: DemoIdP, **fields: object) -> TrustPolicy:
    cert = idp.write_certificate(tmp_path / "idp.pem")
    provider = IdentityProvider(issuers=(ISSUER,), certificates=(str(cert),), **fields)  # type: ignore[arg-type]
    server = AuthorizationServer(token_url=RECIPIENT, client_auth="none", audience=AUDIENCE)
    return build_trust_policy(provider, server, AssertionSettings(), idp_name="corp")


def test_decryption_keys_from_a_file_and_inline(tmp_path: Path, idp: DemoIdP, sp: DemoIdP) -> None:
    key_file = tmp_path / "sp-key.pem"
    key_file.write_bytes(_pem(sp))
    raw = encrypt_assertion(signed(idp), sp.certificate_pem)
    for given in (str(key_file), _pem(sp).decode()):
        policy = _trust(tmp_path, idp, decryption_keys=(given,))
        assert validate_assertion(raw, policy, NOW).subject == "alice@example.test"
        assert "PRIVATE" not in repr(policy) and "PRIVATE" not in repr(policy.decryption_keys)


def test_a_certificate_is_not_a_decryption_key(tmp_path: Path, idp: DemoIdP, sp: DemoIdP) -> None:
    with pytest.raises(ConfigError) as caught:
        _trust(tmp_path, idp, decryption_keys=(sp.certificate_pem.decode(),))
    assert "identity_providers.corp.decryption_keys[0]" in str(caught.value)
    assert "BEGIN" not in str(caught.value)


def test_ec_key_is_refused_at_load(tmp_path: Path, idp: DemoIdP, ec_idp: DemoIdP) -> None:
    with pytest.raises(ConfigError) as caught:
        _trust(tmp_path, idp, decryption_keys=(_pem(ec_idp).decode(),))
    assert "RSA" in str(caught.value) and "BEGIN" not in str(caught.value)


def _config(tmp_path: Path, idp: DemoIdP, keys: list[str]) -> dict[str, object]:
    idp.write_certificate(tmp_path / "idp.pem")
    return {
        "identity_providers": {
            "corp": {"issuer": ISSUER, "certificates": ["idp.pem"], "decryption_keys": keys}
        },
        "authorization_servers": {
            "as": {"token_url": RECIPIENT, "client_auth": "none", "audience": AUDIENCE}
        },
        "routes": [
            {
                "upstream": "http://127.0.0.1:1",
                "identity_provider": "corp",
                "authorization_server": "as",
            }
        ],
    }


def test_check_config_output_never_shows_a_decryption_key(
    tmp_path: Path, idp: DemoIdP, sp: DemoIdP, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "k.pem").write_bytes(_pem(sp))
    monkeypatch.setenv("TEST_DECRYPTION_KEY", _pem(sp).decode())
    keys = ["${TEST_DECRYPTION_KEY}", "${file:k.pem}", "k.pem"]
    config = parse_config(_config(tmp_path, idp, keys), tmp_path)
    printed = yaml.safe_dump(config.redacted())
    assert "PRIVATE" not in printed and "MII" not in printed
    assert printed.count("'**********'") >= 3
    loaded = config.identity_providers["corp"].decryption_keys
    assert loaded[2].get_secret_value() == str(tmp_path / "k.pem")  # a path, made absolute


def test_a_missing_decryption_key_file_names_its_key(tmp_path: Path, idp: DemoIdP) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_config(tmp_path, idp, ["missing.pem"]), tmp_path)
    assert "identity_providers.corp.decryption_keys: [0]" in str(caught.value)


def test_explain_shows_decryption_and_then_every_rule(
    idp: DemoIdP, sp: DemoIdP, enc_policy: TrustPolicy
) -> None:
    from gateway.saml.evidence import Evidence

    evidence = Evidence()
    raw = encrypt_assertion(signed(idp, "hidden@example.test"), sp.certificate_pem)
    validate_assertion(raw, enc_policy, NOW, evidence=evidence)
    names = [check.name for check in evidence.checks]
    assert names[:3] == ["parse", "envelope", "decryption"]
    assert names.index("signature") > names.index("decryption")
    assert {"issuer", "audience", "recipient", "bearer confirmation"} <= set(names)
    decryption = evidence.checks[2]
    assert decryption.passed and "AES-256-GCM" in decryption.found and "test" in decryption.found
    assert not any("hidden" in c.found or "hidden" in c.expected for c in evidence.checks)


def test_explain_records_the_decryption_refusal_last(
    idp: DemoIdP, sp: DemoIdP, enc_policy: TrustPolicy
) -> None:
    from gateway.saml.evidence import Evidence

    evidence = Evidence()
    raw = encrypt_assertion(signed(idp), sp.certificate_pem, transport="rsa-1_5")
    with pytest.raises(InvalidAssertion):
        validate_assertion(raw, enc_policy, NOW, evidence=evidence)
    last = evidence.checks[-1]
    assert (last.name, last.passed, last.reason) == ("decryption", False, "decryption")


def test_an_unloadable_xmlsec_is_a_config_error_naming_the_key(
    tmp_path: Path, idp: DemoIdP, sp: DemoIdP, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from gateway.saml import decrypt

    monkeypatch.setattr(decrypt, "_LIBRARY", [])
    monkeypatch.setitem(sys.modules, "xmlsec", None)  # as if it failed to import
    with pytest.raises(ConfigError) as caught:
        _trust(tmp_path, idp, decryption_keys=(_pem(sp).decode(),))
    message = str(caught.value)
    assert "identity_providers.corp.decryption_keys[0]" in message
    assert "python-xmlsec cannot be loaded" in message and "BEGIN" not in message
    # and an IdP without decryption keys does not need it at all
    assert _trust(tmp_path, idp).decryption_keys == ()
