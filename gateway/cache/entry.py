"""What the cache keeps per (cache_key, assertion ID), and the shared-store seam.

A token is only ever released for the signed assertion it was exchanged for: each entry
carries the SHA-256 digest of the decoded bytes that were exchanged (the hot path's key) and
the fingerprint of what was signed, which every byte variant of that one signed assertion
shares.

The cache learns about an assertion only through ``VerifiedAssertion``: plain facts the
validator's result carries (``gateway.saml.Assertion`` has them), so cache/ imports neither
gateway.saml nor gateway.oauth.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from gateway.values import Token


class VerifiedAssertion(Protocol):
    """What the cache needs to know of an assertion that passed validation."""

    @property
    def id(self) -> str:
        """The assertion ID: the replay key, with the cache key."""
        ...

    @property
    def digest(self) -> bytes:
        """SHA-256 of the presented (decoded) bytes: the hot path's key."""
        ...

    @property
    def fingerprint(self) -> bytes:
        """SHA-256 of what was signed, equal for every byte variant (b"": use the digest)."""
        ...

    @property
    def issuer(self) -> str:
        """For access lines on cache hits."""
        ...

    @property
    def accepted_until(self) -> datetime:
        """The first instant validation no longer accepts it: the ID binding's end and,
        with ``cap_to_assertion``, the token's."""
        ...


@dataclass(frozen=True, slots=True)
class CachedToken:
    cache_key: str  # whose token: the pipeline's key for (identity provider, authorization server)
    assertion_id: str
    digest: bytes  # SHA-256 of the decoded assertion the token was issued for
    token: Token
    expires_at: float  # wall-clock seconds (time.time()) after which it is never served
    issuer: str = ""  # the assertion's Issuer, for access lines on cache hits
    fingerprint: bytes = b""  # of the signed content; b"" in entries written before it existed
    # When validation stops accepting the assertion (wall clock): how long a replica that
    # takes this entry from the shared store keeps the ID bound. 0.0: not known (markers,
    # entries written before it existed).
    accepted_until: float = 0.0


class SharedStore(Protocol):
    """A second tier behind the in-memory cache, shared by replicas (Redis).

    Every method is bounded in time by the implementation and never raises for a store
    fault: a dead store behaves like an empty one, so correctness never depends on it.
    """

    async def get(self, cache_key: str, assertion_id: str) -> CachedToken | None:
        """The entry, or None when absent, expired, undecryptable or the store is down."""
        ...

    async def find(self, cache_key: str, digest: bytes) -> CachedToken | None:
        """The entry stored for exactly the bytes of SHA-256 ``digest``, or None (absent,
        expired, undecryptable, another key's, or the store is down)."""
        ...

    async def put(self, entry: CachedToken) -> None:
        """Store until ``entry.expires_at``, under its assertion ID and, for a token (an
        entry with a digest), under its digest too; silently skipped when the store is down."""
        ...

    async def delete(self, cache_key: str, assertion_id: str, digest: bytes = b"") -> None:
        """Remove the entry of ``assertion_id`` and, when given, the one under ``digest``."""
        ...

    async def bind_id(
        self, cache_key: str, assertion_id: str, fingerprint: bytes, until: float
    ) -> bytes | None:
        """Record that ``assertion_id`` belongs to the signed assertion ``fingerprint`` until
        ``until`` (time.time() seconds), unless a live binding exists. Returns the fingerprint
        already bound (equal to ``fingerprint`` or not), or None when this call recorded it or
        the store is down."""
        ...

    def exchange_lock(self, cache_key: str, assertion_id: str) -> AbstractAsyncContextManager[bool]:
        """Cross-replica single-flight: yields True when this replica owns the exchange.

        Yields False when another replica holds the lock; the caller then waits for that
        replica's result with ``get`` for a bounded time, and exchanges itself if none
        appears. Yields True while the store is down (nobody can deliver through it).
        """
        ...

    async def close(self) -> None: ...
