"""What we trust for one (identity provider, authorization server) pair, built once at startup.

Rules this module owns:
- Signing keys come only from configured PEM files and IdP metadata, never from a document.
- Certificates are parsed once here; the validator never parses a certificate per request.
- Weak keys are refused at load time unless the IdP opts in (``min_rsa_key_bits``), so an
  operator learns about them at startup, not from a stream of 401s.
- Every problem is a ``ConfigError`` naming the key path and the file.
"""

from __future__ import annotations

import base64
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning

from gateway.config import AssertionSettings, AuthorizationServer, IdentityProvider, is_pem_text
from gateway.errors import ConfigError, GatewayError
from gateway.saml.decrypt import DecryptionKey
from gateway.saml.xml import parse_xml

_MD = "urn:oasis:names:tc:SAML:2.0:metadata"
_DS = "http://www.w3.org/2000/09/xmldsig#"
_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"


@dataclass(frozen=True, slots=True)
class PinnedKey:
    """One trusted signing certificate, parsed once."""

    certificate: x509.Certificate = field(repr=False)
    der: bytes = field(repr=False)  # to match a KeyInfo hint without parsing it
    kind: str  # "rsa" or "ec"
    bits: int
    source: str  # the config key path it came from, for logs

    @classmethod
    def from_certificate(cls, certificate: x509.Certificate, source: str) -> PinnedKey:
        key = certificate.public_key()
        if isinstance(key, rsa.RSAPublicKey):
            kind = "rsa"
        elif isinstance(key, ec.EllipticCurvePublicKey):
            kind = "ec"
        else:
            raise ValueError(f"unsupported key type {type(key).__name__} (RSA or EC expected)")
        return cls(certificate, certificate.public_bytes(Encoding.DER), kind, key.key_size, source)


@dataclass(frozen=True, slots=True)
class TrustPolicy:
    """Everything ``validate_assertion`` checks against; immutable and shared by requests."""

    keys: tuple[PinnedKey, ...]
    issuers: frozenset[str]
    audience: str
    recipients: frozenset[str]
    clock_skew: timedelta = timedelta(seconds=120)
    allow_sha1: bool = False
    min_rsa_key_bits: int = 2048
    idp_name: str = ""
    saml_versions: frozenset[str] = frozenset({"2.0"})
    decryption_keys: tuple[DecryptionKey, ...] = field(default=(), repr=False)
    allow_cbc_encryption: bool = False

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("a TrustPolicy needs at least one pinned key")
        if not self.issuers:
            raise ValueError("a TrustPolicy needs at least one issuer")
        if not self.recipients:
            raise ValueError("a TrustPolicy needs at least one recipient")


def _load_certificate_der(der: bytes) -> x509.Certificate:
    # Some real IdP certificates (serial number 0) make cryptography warn on load. A pinned
    # certificate is only a container for the public key here, so that is not our concern,
    # and under `-W error` it would otherwise turn a usable key into a crash.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return x509.load_der_x509_certificate(der)


def _pem_certificates(data: bytes) -> list[bytes]:
    """DER bytes of every CERTIFICATE block in a PEM file, in order."""
    ders: list[bytes] = []
    for block in data.split(_PEM_BEGIN)[1:]:
        body, sep, _ = block.partition(b"-----END CERTIFICATE-----")
        if not sep:
            raise ValueError("unterminated PEM certificate block")
        ders.append(base64.b64decode(b"".join(body.split()), validate=True))
    return ders


def _metadata_certificates(data: bytes, issuers: frozenset[str]) -> list[bytes]:
    """DER bytes of the signing certificates of the IdP entities named in ``issuers``."""
    try:
        root = parse_xml(data)
    except GatewayError as exc:
        raise ValueError(f"not readable SAML metadata ({exc.reason})") from None
    entities = root.iter(f"{{{_MD}}}EntityDescriptor")  # the root itself, or an aggregate
    # Only entities we trust as issuers: in an aggregate (federation) file, another IdP's key
    # must not be able to sign assertions that claim our issuer.
    chosen = [e for e in entities if e.get("entityID") in issuers]
    if not chosen:
        raise ValueError("no md:EntityDescriptor whose entityID is one of the issuers")
    ders: list[bytes] = []
    for entity in chosen:
        for descriptor in entity.iterchildren(f"{{{_MD}}}IDPSSODescriptor"):
            for key_descriptor in descriptor.iterchildren(f"{{{_MD}}}KeyDescriptor"):
                if key_descriptor.get("use") not in (None, "signing"):
                    continue
                for cert in key_descriptor.iterfind(
                    f"{{{_DS}}}KeyInfo/{{{_DS}}}X509Data/{{{_DS}}}X509Certificate"
                ):
                    ders.append(base64.b64decode("".join((cert.text or "").split()), validate=True))
    if not ders:
        raise ValueError("no signing X509Certificate in md:IDPSSODescriptor")
    return ders


def _read(path: str, where: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([f"{where}: cannot read {path!r}: {exc.strerror}"]) from None


def build_trust_policy(
    idp: IdentityProvider,
    server: AuthorizationServer,
    settings: AssertionSettings,
    *,
    idp_name: str = "",
) -> TrustPolicy:
    """Read the IdP's certificates once and combine them with what the server expects."""
    prefix = f"identity_providers.{idp_name}" if idp_name else "identity_provider"
    issuers = frozenset(idp.issuers)
    problems: list[str] = []
    keys: list[PinnedKey] = []
    seen: set[bytes] = set()

    def add(ders: list[bytes], where: str, path: str) -> None:
        for der in ders:
            if der in seen:  # the same certificate in a PEM file and in metadata
                continue
            try:
                key = PinnedKey.from_certificate(_load_certificate_der(der), where)
            except ValueError as exc:
                problems.append(f"{where}: {exc}: {path!r}")
                continue
            if key.kind == "rsa" and key.bits < idp.min_rsa_key_bits:
                problems.append(
                    f"{where}: RSA key of {key.bits} bits is under min_rsa_key_bits "
                    f"({idp.min_rsa_key_bits}); lower min_rsa_key_bits to accept it: {path!r}"
                )
                continue
            seen.add(der)
            keys.append(key)

    for i, path in enumerate(idp.certificates):
        where = f"{prefix}.certificates[{i}]"
        data = _read(path, where)
        try:
            ders = _pem_certificates(data)
        except ValueError:  # binascii.Error is one too
            ders = []
        if not ders:
            problems.append(f"{where}: not a PEM certificate: {path!r}")
            continue
        add(ders, where, path)
    for i, path in enumerate(idp.metadata):
        where = f"{prefix}.metadata[{i}]"
        data = _read(path, where)
        try:
            ders = _metadata_certificates(data, issuers)
        except ValueError as exc:  # binascii.Error too
            problems.append(f"{where}: {exc}: {path!r}")
            continue
        add(ders, where, path)
    decryption_keys: list[DecryptionKey] = []
    for i, secret in enumerate(idp.decryption_keys):
        where = f"{prefix}.decryption_keys[{i}]"
        value = secret.get_secret_value()
        # The value is never quoted, since it may be the key itself; a path may be.
        pem = value.encode() if is_pem_text(value) else _read(value, where)
        try:
            decryption_keys.append(DecryptionKey.from_pem(pem, where))
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    if problems:
        raise ConfigError(problems)
    if not keys:
        raise ConfigError([f"{prefix}: no usable signing certificate"])
    return TrustPolicy(
        keys=tuple(keys),
        issuers=issuers,
        audience=server.audience,
        recipients=frozenset(server.recipients),
        clock_skew=timedelta(seconds=settings.clock_skew),
        allow_sha1=idp.allow_sha1,
        min_rsa_key_bits=idp.min_rsa_key_bits,
        idp_name=idp_name,
        saml_versions=frozenset(idp.saml_versions),
        decryption_keys=tuple(decryption_keys),
        allow_cbc_encryption=idp.allow_cbc_encryption,
    )
