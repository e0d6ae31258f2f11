"""Find the assertion in the request headers and decode it: the cache key's hot path.

Rules this module owns:
- Sources are tried in configured order; ``Authorization`` with another scheme (``Bearer``)
  counts as absent, so a later source may still match.
- The size cap applies to the encoded value, before any decoding work.
- Standard base64 and base64url, padded or not, surrounding whitespace tolerated; anything
  else is ``BadRequest("malformed")``: the client did not even send base64.
- No XML here: the digest of the decoded bytes is all the cache needs.
"""

from __future__ import annotations

import binascii
import hashlib
from collections.abc import Mapping, Sequence

import pybase64

from gateway.config import HeaderSource
from gateway.errors import BadRequest, InvalidAssertion

_URLSAFE = b"-_"


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    # A plain dict is case-sensitive; aiohttp's CIMultiDictProxy already answered above.
    lowered = name.lower()
    for key, candidate in headers.items():
        if key.lower() == lowered:
            return candidate
    return None


def _payload(value: str, scheme: str | None) -> str | None:
    if scheme is None:
        return value
    value = value.lstrip()
    # The scheme is case-insensitive (RFC 9110) and must be followed by whitespace.
    if len(value) <= len(scheme) or value[: len(scheme)].lower() != scheme.lower():
        return None
    if value[len(scheme)] not in " \t":
        return None
    return value[len(scheme) + 1 :]


def decode_assertion(encoded: str, max_size: int) -> bytes:
    """Decode one header value's base64 (standard or url-safe, padding optional)."""
    if len(encoded) > max_size:
        raise InvalidAssertion("size", f"encoded assertion is {len(encoded)} bytes, cap {max_size}")
    text = encoded.strip()
    missing = -len(text) % 4
    if missing:
        if missing == 3:  # one leftover character can never be base64
            raise BadRequest("malformed", "assertion header is not base64")
        text += "=" * missing
    # pybase64 (SIMD) decodes a 5 KB header in about 1 µs where binascii takes about 15 µs;
    # validate=True refuses any character outside the alphabet and misplaced padding.
    altchars = _URLSAFE if ("-" in text or "_" in text) else None
    if altchars and ("+" in text or "/" in text):
        # One alphabet or the other: a mix is no encoding any IdP emits (and pybase64 is
        # deprecating its lenient reading of it).
        raise BadRequest("malformed", "assertion header mixes base64 and base64url")
    try:
        raw = pybase64.b64decode(text, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters in the str
        raise BadRequest("malformed", "assertion header is not base64") from None
    if not raw:
        raise BadRequest("malformed", "assertion header is empty")
    return raw


def extract_assertion(
    headers: Mapping[str, str], sources: Sequence[HeaderSource], max_size: int
) -> bytes | None:
    """The decoded assertion from the first configured source present, or None."""
    for source in sources:
        value = _header(headers, source.name)
        if value is None:
            continue
        encoded = _payload(value, source.scheme)
        if encoded is None:
            continue
        return decode_assertion(encoded, max_size)
    return None


def assertion_digest(raw: bytes) -> bytes:
    """SHA-256 of the decoded assertion: the cache binds each token to it."""
    return hashlib.sha256(raw).digest()
