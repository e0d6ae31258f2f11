"""The token cache: one exchange per assertion for as long as its token lives.

Rules this module owns:
- The logical key is (profile, assertion ID), the profile naming whose token it is (the
  pipeline uses its route's identity provider and authorization server), and every entry is
  bound to the SHA-256 digest of the decoded assertion. The hot path (``lookup``) finds a token by
  (profile, digest) alone: no XML, no signature check, one dictionary probe.
- A different assertion that reuses a live entry's ID (or the ID of an exchange in flight)
  is a replay: refused with ``InvalidAssertion("replay")`` and the AS is never called.
- An entry is served until ``expires_in`` minus the refresh margin minus a random jitter
  (the margin never takes more than half of a token's life, so short-lived tokens are still
  cached), optionally capped at the assertion's NotOnOrAfter. An expired entry is never
  served. The store is bounded by ``max_entries`` with LRU eviction.
- Concurrent misses share one exchange (``SingleFlight``); a failed exchange is not cached,
  but ``invalid_grant`` is remembered for ``negative_ttl`` so one bad assertion cannot
  hammer the AS.
- With a ``SharedStore`` (Redis), the single-flight leader asks the store first, then takes
  the cross-replica exchange lock; a replica that does not get the lock polls the store for
  at most ``shared_wait`` seconds and then exchanges itself. A shared entry bound to another
  digest is never served.
- No I/O of its own and no aiohttp/redis import: the clock, the random source, the exchange
  and the shared store are handed in.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from cachetools import LRUCache

from gateway.cache.entry import CachedToken, SharedStore
from gateway.cache.singleflight import SingleFlight
from gateway.config import CacheSettings
from gateway.errors import InvalidAssertion
from gateway.oauth.token import Token
from gateway.saml.assertion import Assertion

K = TypeVar("K")
V = TypeVar("V")

Exchange = Callable[[Assertion], Awaitable[Token]]

_POLL_FIRST = 0.02  # seconds between shared-store polls, doubling up to _POLL_MAX
_POLL_MAX = 0.25


class _Lru(LRUCache[K, V]):
    """An LRU cache that reports what its size bound pushes out."""

    def __init__(self, maxsize: int, on_evict: Callable[[K, V], None]) -> None:
        super().__init__(maxsize)
        self._on_evict = on_evict

    def popitem(self) -> tuple[K, V]:
        key, value = super().popitem()
        self._on_evict(key, value)
        return key, value


class TokenCache:
    def __init__(
        self,
        settings: CacheSettings,
        *,
        shared: SharedStore | None = None,
        shared_wait: float = 5.0,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._settings = settings
        self._shared = shared
        self._shared_wait = shared_wait
        self._clock = clock
        self._rng = rng
        # (profile, digest) -> entry: what the hot path probes.
        self._entries: _Lru[tuple[str, bytes], CachedToken] = _Lru(
            settings.max_entries, self._evicted
        )
        # (profile, assertion ID) -> digest the ID is bound to, for replay detection.
        self._ids: dict[tuple[str, str], bytes] = {}
        # (profile, digest) -> until when an invalid_grant answer is remembered.
        self._negative: LRUCache[tuple[str, bytes], float] = LRUCache(settings.max_entries)
        self._flights: SingleFlight[tuple[str, str], CachedToken] = SingleFlight()
        # Bumped by forget_profile: an exchange started before is not kept after.
        self._generations: dict[str, int] = {}
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.replays = 0
        self.negative_hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def waiters(self) -> int:
        """Callers currently waiting on an exchange another caller started."""
        return self._flights.waiters

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    # --- the hot path --------------------------------------------------------------------

    def lookup(self, profile: str, digest: bytes) -> CachedToken | None:
        """The live token for exactly this assertion (by digest), or None; counts hit/miss."""
        entry = self._entries.get((profile, digest))
        if entry is not None:
            if entry.expires_at > self._clock():
                self.hits += 1
                return entry
            self._forget(entry)
        self.misses += 1
        return None

    def ttl(self, entry: CachedToken) -> float:
        """Seconds ``entry`` will still be served (0 when it no longer is)."""
        return max(0.0, entry.expires_at - self._clock())

    # --- the miss path -------------------------------------------------------------------

    async def obtain(self, profile: str, assertion: Assertion, exchange: Exchange) -> CachedToken:
        """A token for a verified ``assertion``: cached, shared, or from one exchange."""
        now = self._clock()
        key = (profile, assertion.digest)
        entry = self._entries.get(key)
        if entry is not None and entry.expires_at > now:
            return entry  # filled since the caller's lookup
        self._refuse_replay(profile, assertion, now)
        remembered = self._negative.get(key)
        if remembered is not None:
            if remembered > now:
                self.negative_hits += 1
                raise InvalidAssertion("invalid_grant", "refused recently; not asked again")
            self._negative.pop(key, None)
        return await self._flights.run(
            (profile, assertion.id),
            assertion.digest,
            lambda: self._fill(profile, assertion, exchange, self._generations.get(profile, 0)),
        )

    async def purge(self, profile: str, digest: bytes) -> bool:
        """Drop the token for this assertion (e.g. the upstream answered 401 with it)."""
        entry = self._entries.pop((profile, digest), None)
        if entry is None:
            return False
        self._unbind(entry)
        if self._shared is not None:
            await self._shared.delete(profile, entry.assertion_id)
        return True

    def forget_profile(self, profile: str) -> int:
        """Drop every in-memory token of ``profile`` (its trust changed); how many went.

        Shared-store entries may stay: they are only read after the assertion has been
        validated again, under the new trust.
        """
        # Exchanges already under way for this profile finish, but do not store their tokens.
        self._generations[profile] = self._generations.get(profile, 0) + 1
        # Keys only: reading values through the LRU would reorder it.
        stale = [key for key in self._entries if key[0] == profile]
        for key in stale:
            self._unbind(self._entries.pop(key))
        for key in [key for key in self._negative if key[0] == profile]:
            del self._negative[key]
        return len(stale)

    async def close(self) -> None:
        """Cancel exchanges still in flight (shutdown)."""
        await self._flights.close()

    # --- internals -----------------------------------------------------------------------

    def _refuse_replay(self, profile: str, assertion: Assertion, now: float) -> None:
        bound = self._ids.get((profile, assertion.id))
        if bound is not None and bound != assertion.digest:
            other = self._entries.get((profile, bound))
            if other is not None and other.expires_at > now:
                self.replays += 1
                raise InvalidAssertion("replay", "assertion ID already used by another assertion")
            if other is not None:
                self._forget(other)
            else:
                self._ids.pop((profile, assertion.id), None)
        running = self._flights.tag((profile, assertion.id))
        if running is not None and running != assertion.digest:
            self.replays += 1
            raise InvalidAssertion("replay", "assertion ID in flight for another assertion")

    async def _fill(
        self, profile: str, assertion: Assertion, exchange: Exchange, generation: int
    ) -> CachedToken:
        """The single-flight leader's work: shared store, lock, exchange, store."""
        shared = self._shared
        if shared is None:
            return self._keep(await self._exchange(profile, assertion, exchange), generation)
        entry = await self._from_shared(shared, profile, assertion)
        if entry is not None:
            return self._keep(entry, generation)
        async with shared.exchange_lock(profile, assertion.id) as owner:
            if owner:
                # Another replica may have finished between our get and the lock.
                entry = await self._from_shared(shared, profile, assertion)
                if entry is None:
                    entry = await self._exchange(profile, assertion, exchange)
                    await self._publish(shared, entry)
                return self._keep(entry, generation)
        entry = await self._wait_for_shared(shared, profile, assertion)
        if entry is None:
            # The lock holder did not deliver in time (or the store is down): go ourselves.
            entry = await self._exchange(profile, assertion, exchange)
            await self._publish(shared, entry)
        return self._keep(entry, generation)

    async def _exchange(
        self, profile: str, assertion: Assertion, exchange: Exchange
    ) -> CachedToken:
        try:
            token = await exchange(assertion)
        except InvalidAssertion as exc:
            if exc.reason == "invalid_grant" and self._settings.negative_ttl > 0:
                until = self._clock() + self._settings.negative_ttl
                self._negative[(profile, assertion.digest)] = until
            raise
        return CachedToken(
            profile=profile,
            assertion_id=assertion.id,
            digest=assertion.digest,
            token=token,
            expires_at=self._expires_at(token, assertion),
            issuer=assertion.issuer,
        )

    def _expires_at(self, token: Token, assertion: Assertion) -> float:
        settings = self._settings
        lifetime = max(0.0, token.expires_in)
        margin = settings.refresh_margin + settings.jitter * self._rng()
        # A token shorter than twice the margin would never be cached at all; keep half.
        expires_at = self._clock() + lifetime - min(margin, lifetime / 2)
        if settings.cap_to_assertion:
            expires_at = min(expires_at, assertion.not_on_or_after.timestamp())
        return expires_at

    def _keep(self, entry: CachedToken, generation: int) -> CachedToken:
        """Put a live entry in memory (a dead one is still handed to this one caller), unless
        the profile's trust changed while it was being obtained (see ``forget_profile``)."""
        if entry.expires_at <= self._clock():
            return entry
        if self._generations.get(entry.profile, 0) != generation:
            return entry
        id_key = (entry.profile, entry.assertion_id)
        previous = self._ids.get(id_key)
        if previous is not None and previous != entry.digest:
            # Only reachable through the shared path, where a newer exchange wins.
            self._entries.pop((entry.profile, previous), None)
        self._entries[(entry.profile, entry.digest)] = entry
        self._ids[id_key] = entry.digest
        return entry

    async def _publish(self, shared: SharedStore, entry: CachedToken) -> None:
        if entry.expires_at > self._clock():
            await shared.put(entry)

    async def _from_shared(
        self, shared: SharedStore, profile: str, assertion: Assertion
    ) -> CachedToken | None:
        entry = await shared.get(profile, assertion.id)
        if entry is None or entry.profile != profile:
            return None
        if entry.digest != assertion.digest:
            return None  # bound to another assertion: never served; we exchange our own
        if entry.expires_at <= self._clock():
            return None
        return entry

    async def _wait_for_shared(
        self, shared: SharedStore, profile: str, assertion: Assertion
    ) -> CachedToken | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._shared_wait
        pause = _POLL_FIRST
        while True:
            entry = await self._from_shared(shared, profile, assertion)
            if entry is not None:
                return entry
            left = deadline - loop.time()
            if left <= 0:
                return None
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, _POLL_MAX)

    def _forget(self, entry: CachedToken) -> None:
        self._entries.pop((entry.profile, entry.digest), None)
        self._unbind(entry)

    def _unbind(self, entry: CachedToken) -> None:
        id_key = (entry.profile, entry.assertion_id)
        if self._ids.get(id_key) == entry.digest:
            del self._ids[id_key]

    def _evicted(self, key: tuple[str, bytes], entry: CachedToken) -> None:
        self.evictions += 1
        self._unbind(entry)
