"""How the gateway proves who it is to an authorization server (pure: no I/O).

Rules this module owns:
- ``client_secret_basic`` form-encodes the client id and secret *before* base64
  (RFC 6749 §2.3.1): a secret with ``:`` or ``%`` in it would otherwise be misread. A server
  that does not decode them (SAP NetWeaver ABAP) gets them raw, when its settings say so.
- ``private_key_jwt`` (RFC 7523 §2.2) is a short-lived JWT whose ``iss`` and ``sub`` are the
  client id and whose ``aud`` is the token URL, with a fresh ``jti`` so it cannot be replayed.
  It is signed with ``cryptography`` directly: RS256 (RSA PKCS#1 v1.5, SHA-256, at least
  2048 bits) or ES256 (ECDSA P-256, SHA-256, raw ``r || s`` signature per RFC 7518 §3.4).
- The signing key is parsed once, from PEM bytes the caller read; its type must match the
  configured algorithm, so a wrong key fails at startup, not on the first request.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import quote_plus

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from gateway.errors import ConfigError

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

Algorithm = Literal["RS256", "ES256"]
_MIN_RSA_BITS = 2048


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 7515 §2), as JWTs and RFC 7522 use it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def basic_authorization(client_id: str, client_secret: str, encoding: str = "form") -> str:
    """The ``Authorization`` header value for ``client_secret_basic``.

    ``form`` encodes both parts first (RFC 6749 §2.3.1); ``raw`` sends them as they are
    (RFC 7617), for servers that do not decode (the config refuses a ``:`` in a raw id).
    """
    if encoding == "raw":
        pair = f"{client_id}:{client_secret}"
    else:
        pair = f"{quote_plus(client_id, safe='')}:{quote_plus(client_secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private key for ``private_key_jwt``; never printed."""

    algorithm: Algorithm
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = field(repr=False)
    key_id: str | None = None


def load_signing_key(
    pem: bytes, algorithm: Algorithm, *, key_id: str | None = None, where: str = "key_file"
) -> SigningKey:
    """Parse an unencrypted PEM private key and check it fits ``algorithm``.

    ``where`` is the config key path used in error messages.
    """
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The parser's message may quote key material; say only what is wrong.
        raise ConfigError(
            [f"{where}: not an unencrypted PEM private key (PKCS#8 or traditional)"]
        ) from None
    if algorithm == "RS256":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError([f"{where}: RS256 needs an RSA private key"])
        if key.key_size < _MIN_RSA_BITS:
            raise ConfigError([f"{where}: RSA key has {key.key_size} bits, need {_MIN_RSA_BITS}"])
        return SigningKey(algorithm, key, key_id)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError([f"{where}: ES256 needs an EC private key on curve P-256"])
    return SigningKey(algorithm, key, key_id)


def client_assertion(
    key: SigningKey,
    *,
    client_id: str,
    audience: str,
    now: float,
    jti: str,
    lifetime: float = 60,
) -> str:
    """A signed RFC 7523 client-authentication JWT, in compact serialisation."""
    header: dict[str, str] = {"alg": key.algorithm, "typ": "JWT"}
    if key.key_id:
        header["kid"] = key.key_id
    issued = int(now)
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "jti": jti,
        "iat": issued,
        # Whole seconds, at least one second ahead, so a fractional lifetime stays valid.
        "exp": issued + max(1, int(lifetime)),
    }
    signing_input = (_json_segment(header) + "." + _json_segment(claims)).encode("ascii")
    return signing_input.decode("ascii") + "." + b64url(_sign(key, signing_input))


def _json_segment(value: object) -> str:
    return b64url(json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8"))


def _sign(key: SigningKey, data: bytes) -> bytes:
    if isinstance(key.key, rsa.RSAPrivateKey):
        return key.key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    der = key.key.sign(data, ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    # JWS wants the fixed-width concatenation, not DER (RFC 7518 §3.4).
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")
