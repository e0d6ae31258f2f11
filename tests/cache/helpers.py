"""Helpers for the token cache tests: assertions, a clock, an exchange, a shared store."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.cache.entry import CachedToken
from gateway.config import CacheSettings
from gateway.errors import GatewayError
from gateway.saml.assertion import Assertion
from gateway.values import Token

T0 = 1_700_000_000.0
_ids = itertools.count(1)


def assertion(
    assertion_id: str | None = None,
    *,
    body: str = "alice",
    not_on_or_after: float = T0 + 86400,
    variant: str = "",
    clock_skew: float = 0,
) -> Assertion:
    """A verified assertion as the validator would hand it on. ``variant`` changes the bytes
    (their digest) but not what was signed (the fingerprint), like whitespace after the root
    element; ``body`` changes what was signed."""
    assertion_id = assertion_id or f"_c{next(_ids):06d}"
    signed = f'<saml:Assertion ID="{assertion_id}"><NameID>{body}</NameID></saml:Assertion>'
    raw = (signed + variant).encode()
    return Assertion(
        id=assertion_id,
        issuer="https://idp.test",
        subject=body,
        audiences=("https://as.test",),
        recipient="https://as.test/token",
        not_on_or_after=datetime.fromtimestamp(not_on_or_after, UTC),
        digest=hashlib.sha256(raw).digest(),
        raw=raw,
        fingerprint=hashlib.sha256(signed.encode()).digest(),
        clock_skew=timedelta(seconds=clock_skew),
    )


def settings(**overrides: Any) -> CacheSettings:
    return CacheSettings.model_validate({"jitter": 0, **overrides})


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Exchange:
    """A stand-in for ``TokenClient.exchange``: counts calls, can block, fail or be slow."""

    def __init__(self, expires_in: float = 3600) -> None:
        self.expires_in = expires_in
        self.calls: list[str] = []
        self.gate: asyncio.Event | None = None  # when set, calls wait for it
        self.started = asyncio.Event()
        self.error: GatewayError | None = None

    async def __call__(self, presented: Assertion) -> Token:
        self.calls.append(presented.id)
        self.started.set()
        if self.gate is not None:
            await asyncio.wait_for(self.gate.wait(), 5)
        if self.error is not None:
            raise self.error
        return Token(access_token=f"tok-{len(self.calls)}", expires_in=self.expires_in)


class MemoryShared:
    """A SharedStore in memory, shared by several TokenCache "replicas" in one test."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.clock = clock  # None: bindings never lapse
        self.bindings: dict[tuple[str, str], tuple[bytes, float]] = {}
        self.entries: dict[tuple[str, str], CachedToken] = {}
        self.by_digest: dict[tuple[str, bytes], CachedToken] = {}
        self.finds = 0
        self.on_find: Callable[[], None] | None = None  # runs inside find, before the read
        self.locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.deleted: list[tuple[str, str]] = []
        self.puts = 0
        self.gets = 0
        self.never_owner = False  # as if another replica held every lock

    async def get(self, cache_key: str, assertion_id: str) -> CachedToken | None:
        self.gets += 1
        return self.entries.get((cache_key, assertion_id))

    async def find(self, cache_key: str, digest: bytes) -> CachedToken | None:
        self.finds += 1
        if self.on_find is not None:
            self.on_find()
        await asyncio.sleep(0)  # a real store suspends here: concurrent callers overlap
        entry = self.by_digest.get((cache_key, digest))
        if entry is None or (self.clock is not None and entry.expires_at <= self.clock()):
            return None
        return entry

    async def put(self, entry: CachedToken) -> None:
        self.puts += 1
        self.entries[(entry.cache_key, entry.assertion_id)] = entry
        if entry.digest:
            self.by_digest[(entry.cache_key, entry.digest)] = entry

    async def delete(self, cache_key: str, assertion_id: str, digest: bytes = b"") -> None:
        self.deleted.append((cache_key, assertion_id))
        self.entries.pop((cache_key, assertion_id), None)
        self.by_digest.pop((cache_key, digest), None)

    async def bind_id(
        self, cache_key: str, assertion_id: str, fingerprint: bytes, until: float
    ) -> bytes | None:
        bound = self.bindings.get((cache_key, assertion_id))
        if bound is not None and (self.clock is None or bound[1] > self.clock()):
            return bound[0]
        self.bindings[(cache_key, assertion_id)] = (fingerprint, until)
        return None

    @asynccontextmanager
    async def exchange_lock(self, cache_key: str, assertion_id: str) -> AsyncIterator[bool]:
        lock = self.locks.setdefault((cache_key, assertion_id), asyncio.Lock())
        if self.never_owner or lock.locked():
            yield False
            return
        async with lock:
            yield True

    async def close(self) -> None:
        pass
