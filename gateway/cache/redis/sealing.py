"""Sealed entries and key names of the shared tiers (Redis, and the workers' SQLite file):
pure, no I/O.

Rules this module owns:

- **Tokens are encrypted at rest** with AES-256-GCM. Each configured secret
  (``encryption_keys``: key ID → secret string) is stretched into a 256-bit key with
  HKDF-SHA256, so any high-entropy string works (``openssl rand -base64 32`` is a good
  one; secrets under 16 characters are refused). The key ID is stored in clear beside the
  ciphertext: ``active_key`` encrypts new entries, every configured key still decrypts, so
  keys rotate by adding the new one, making it active, and removing the old one after the
  longest token lifetime.
- **Ciphertext is bound to its Redis key**: the key name and key ID are AES-GCM associated
  data, so an entry copied to another key, a changed key ID or a flipped byte all fail
  authentication and read as a miss.
- **Key names reveal nothing**: ``prefix + "t:" + SHA-256(cache_key, assertion ID)``, and
  for the copy of a token found by the exchanged bytes ``prefix + "d:" + SHA-256(cache_key,
  hex SHA-256 of the bytes)``. A plain (domain-separated, length-prefixed) hash rather than
  an HMAC under an encryption key, so names stay stable across key rotation; assertion IDs
  are random by the SAML spec, and the name is useless without the assertion it was
  derived from.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import SecretStr

from gateway.cache.entry import CachedToken
from gateway.errors import ConfigError
from gateway.values import Token

# The store's logger: a rejected entry is one of the store's events.
logger = logging.getLogger("gateway.cache.redis")

_MIN_SECRET_CHARS = 16
_HKDF_INFO = b"saml-oauth-gateway/redis-token-store/v1"
_ENVELOPE_VERSION = 1
_NONCE_BYTES = 12
_AAD_TAG = b"samlgw-token-v1\x00"
_NAME_TAG = b"samlgw-key-v1\x00"


def entry_name(prefix: str, cache_key: str, assertion_id: str) -> bytes:
    """The Redis key of one cache entry; reveals neither the cache key nor the assertion ID."""
    return prefix.encode() + b"t:" + _hash_name(cache_key, assertion_id)


def digest_name(prefix: str, cache_key: str, digest: bytes) -> bytes:
    """The Redis key of one token entry found by the SHA-256 of the exchanged bytes."""
    return prefix.encode() + b"d:" + _hash_name(cache_key, digest.hex())


def lock_name(prefix: str, cache_key: str, assertion_id: str) -> bytes:
    """The Redis key of the cross-replica exchange lock for one assertion."""
    return prefix.encode() + b"l:" + _hash_name(cache_key, assertion_id)


def binding_name(prefix: str, cache_key: str, assertion_id: str) -> bytes:
    """The Redis key binding one assertion ID to its signed assertion's fingerprint."""
    return prefix.encode() + b"b:" + _hash_name(cache_key, assertion_id)


def _hash_name(cache_key: str, assertion_id: str) -> bytes:
    digest = hashlib.sha256(_NAME_TAG)
    for part in (cache_key.encode(), assertion_id.encode()):
        # length prefixes: ("ab", "c") and ("a", "bc") must not collide
        digest.update(len(part).to_bytes(4, "big") + part)
    return digest.hexdigest().encode()


def derive_key(secret: str) -> bytes:
    """The AES-256 key for one configured secret (HKDF-SHA256, no salt, fixed info)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(
        secret.encode()
    )


class EntrySealer:
    """Encrypts ``CachedToken`` values for one Redis key name, and opens them again.

    Layout: ``version(1) | len(key_id)(1) | key_id | nonce(12) | AES-GCM(json) + tag(16)``;
    associated data = tag, Redis key name and key ID, so the blob only opens where written.
    """

    def __init__(self, keys: Mapping[str, SecretStr], active_key: str) -> None:
        problems = []
        for key_id, secret in keys.items():
            where = f"cache.redis.encryption_keys.{key_id}"
            if not 0 < len(key_id.encode()) <= 255:
                problems.append(f"{where}: key IDs are 1 to 255 bytes")
            if len(secret.get_secret_value()) < _MIN_SECRET_CHARS:
                problems.append(
                    f"{where}: secret is too short ({_MIN_SECRET_CHARS}+ characters; "
                    "e.g. `openssl rand -base64 32`)"
                )
        if active_key not in keys:
            problems.append(f"cache.redis.active_key: {active_key!r} is not in 'encryption_keys'")
        if problems:
            raise ConfigError(problems)
        self._ciphers = {
            key_id: AESGCM(derive_key(secret.get_secret_value())) for key_id, secret in keys.items()
        }
        self._active = active_key
        self._warned_ids: set[str] = set()

    def __repr__(self) -> str:  # keys must never show up in a log or a traceback
        return f"EntrySealer(active_key={self._active!r}, keys={sorted(self._ciphers)!r})"

    def seal(self, name: bytes, entry: CachedToken) -> bytes:
        return self.seal_bytes(name, json.dumps(_to_json(entry), separators=(",", ":")).encode())

    def open(self, name: bytes, blob: bytes) -> CachedToken | None:
        """The entry, or None (with a log line saying why) when it cannot be trusted."""
        plain = self.open_bytes(name, blob)
        if plain is None:
            return None
        try:
            return _from_json(json.loads(plain))
        except (ValueError, TypeError, KeyError):
            rejected("malformed payload")
            return None

    def seal_bytes(self, name: bytes, plain: bytes) -> bytes:
        key_id = self._active.encode()
        header = bytes((_ENVELOPE_VERSION, len(key_id))) + key_id
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._ciphers[self._active].encrypt(nonce, plain, _aad(name, key_id))
        return header + nonce + sealed

    def open_bytes(self, name: bytes, blob: bytes) -> bytes | None:
        """The plaintext sealed for ``name``, or None (logged) when it cannot be trusted."""
        if len(blob) < 2 or blob[0] != _ENVELOPE_VERSION:
            rejected("unknown envelope version")
            return None
        end = 2 + blob[1]
        key_id = blob[2:end]
        nonce, sealed = blob[end : end + _NONCE_BYTES], blob[end + _NONCE_BYTES :]
        if len(nonce) != _NONCE_BYTES or len(sealed) < 16:
            rejected("truncated envelope")
            return None
        cipher = self._ciphers.get(key_id.decode("utf-8", "replace"))
        if cipher is None:
            shown = key_id.decode("utf-8", "replace")
            # once per key ID: during a rolling key change this is expected, not an attack
            if shown not in self._warned_ids and len(self._warned_ids) < 64:
                self._warned_ids.add(shown)
                logger.warning("redis entry under unknown encryption key id %r ignored", shown)
            return None
        try:
            return cipher.decrypt(nonce, sealed, _aad(name, key_id))
        except InvalidTag:
            rejected("authentication failed (tampered, moved to another key, or wrong key)")
            return None


def _aad(name: bytes, key_id: bytes) -> bytes:
    return _AAD_TAG + len(name).to_bytes(4, "big") + name + key_id


def rejected(reason: str) -> None:
    logger.warning("redis entry rejected: %s", reason)


def _to_json(entry: CachedToken) -> dict[str, Any]:
    token = entry.token
    return {
        "p": entry.cache_key,
        "i": entry.assertion_id,
        "d": base64.b64encode(entry.digest).decode(),
        "x": entry.expires_at,
        "a": token.access_token,
        "n": token.expires_in,
        "s": token.scope,
        "y": token.token_type,
        "r": entry.issuer,
        "f": base64.b64encode(entry.fingerprint).decode(),
        "u": entry.accepted_until,
    }


def _from_json(data: Any) -> CachedToken:
    if not isinstance(data, dict):
        raise TypeError("payload is not an object")
    strings = (data["p"], data["i"], data["d"], data["a"], data["y"], data["r"])
    numbers = (data["x"], data["n"])
    if not all(isinstance(v, str) for v in strings):
        raise TypeError("expected strings")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers):
        raise TypeError("expected numbers")
    if data["s"] is not None and not isinstance(data["s"], str):
        raise TypeError("scope must be a string")
    fingerprint = data.get("f", "")  # absent in entries written before fingerprints
    if not isinstance(fingerprint, str):
        raise TypeError("expected a string")
    accepted_until = data.get("u", 0.0)  # absent in entries written before it
    if not isinstance(accepted_until, int | float) or isinstance(accepted_until, bool):
        raise TypeError("expected a number")
    token = Token(
        access_token=data["a"], expires_in=float(data["n"]), scope=data["s"], token_type=data["y"]
    )
    return CachedToken(
        cache_key=data["p"],
        assertion_id=data["i"],
        digest=base64.b64decode(data["d"], validate=True),
        token=token,
        expires_at=float(data["x"]),
        issuer=data["r"],
        fingerprint=base64.b64decode(fingerprint, validate=True),
        accepted_until=float(accepted_until),
    )
