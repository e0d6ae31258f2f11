"""The token cache: one exchange per assertion ID, whatever bytes carry the assertion.

Rules this module owns:
- The logical key is (cache_key, assertion ID), the cache key naming whose token it is (the
  pipeline uses its route's identity provider and authorization server). Each ID is bound to
  the fingerprint of the signed assertion it belongs to (``VerifiedAssertion.fingerprint``: the
  digest of what was signed, equal for every byte variant of it) from its first exchange
  until validation stops accepting the assertion (NotOnOrAfter + clock skew), whether or
  not a token is cached meanwhile. The bindings are bounded (``max_entries``, LRU).
- The hot path (``lookup``) finds a token by (cache_key, SHA-256 of the decoded bytes) alone:
  no XML, no signature check, one dictionary probe. The bytes that were exchanged, and each
  validated byte variant of the same signed assertion (a few per ID), point at the token.
- On the miss path, after validation: a bound ID with another fingerprint is a replay
  (``InvalidAssertion("replay")``; the AS is never called), also while the first one's
  exchange is in flight and, through ``SharedStore.bind_id``, on another replica. A byte
  variant shares the live token. Once the assertion's token has been obtained it is not
  exchanged again, in any byte form: when that token is no longer served, the assertion is
  ``spent`` (401) until it expires, and the client must present a fresh one. The single
  exception: when the upstream refuses the token (``purge``; the pipeline rate-limits it),
  one re-exchange is allowed.
- A token is served until ``expires_in`` minus the refresh margin minus a random jitter (the
  margin never takes more than half of a token's life, so short-lived tokens are still
  cached), optionally capped where validation stops accepting the assertion. An expired
  token is never served.
- Concurrent misses share one exchange (``SingleFlight``); a failed exchange is not cached
  and may be retried, but ``invalid_grant`` is remembered per (cache_key, assertion ID) for
  ``negative_ttl``, so neither one bad assertion nor its byte variants hammer the AS.
- With a ``SharedStore`` (Redis), the single-flight leader asks the store first, then takes
  the cross-replica exchange lock; a replica that does not get the lock polls the store for
  at most ``shared_wait`` seconds and then exchanges itself. Before exchanging it binds the
  ID in the store, and after a successful exchange it stores an "exchanged" record beside
  the token (under a derived ID no SAML ID can take), so every replica knows the assertion
  is spent. A shared entry for another signed assertion is never served. When the
  exchange fails, the holder records that for a few seconds (another derived ID), so
  the replicas waiting on it stop at once: refusing too on ``invalid_grant``, trying
  themselves otherwise.
- **An L2 hit skips validation** (``shared_lookup``, before the pipeline validates): the
  replica that exchanged an assertion also stores its token under (cache_key, SHA-256 of
  the exchanged bytes), and another replica that is sent exactly those bytes serves that
  token after one read, as its own hot path would: no XML, no signature check. What it
  relies on, each of which holds today and must keep holding:
  - *The same bytes validate the same way under the same trust.* The digest is SHA-256 of
    the decoded bytes, so a hit means byte-identical input; the cache key names the IdP,
    the AS and a fingerprint of every trust and server setting validation and the exchange
    use (keys, issuers, audience, recipients, skew, algorithms, key size, AS settings), so
    a replica whose route, IdP, AS or trust differs (another route, a rolling reload)
    looks under another key and finds nothing. Validation depends on nothing else but
    time, and time is what the expiry covers. So the cache key must name every field of
    the trust policy (``pipeline._cache_key`` does today): a field added to the policy
    and left out of it would let one replica serve what another's trust refuses.
  - *Expiry as in memory.* The entry carries ``expires_at`` (capped where validation stops
    accepting the assertion when ``cap_to_assertion`` is on, exactly as an L1 entry); the
    store drops it then (``PX``) and both the store and this cache refuse an expired one.
    A NotBefore in the future was refused by the validating replica, and an entry exists
    only after that replica accepted the assertion and obtained a token.
  - *Only a gateway can write an entry.* Entries are AES-GCM sealed under the shared
    encryption keys with the key name as associated data: nobody without those keys can
    make one, and an entry moved to another digest's or ID's name does not open. Whoever
    holds the keys could make a replica forward a token they chose with bytes they chose,
    which gives them nothing a token in hand does not; treat the keys as secrets guarding
    the routes.
  - *Replay rules stay by ID.* An adopted entry binds its ID to its fingerprint here and is
    spent, as if exchanged here; an ID bound here to another signed assertion is not
    adopted (validation decides). Other bytes for the same ID never match the digest and
    take the validated path, with ``bind_id`` across replicas as before.
  - *Revocation reaches it.* ``purge`` deletes the copy under the digest with the one
    under the ID; ``forget`` needs nothing, the cache key changes with the trust.
- No I/O of its own and no aiohttp/redis import: the clock, the random source, the exchange
  and the shared store are handed in. The bookkeeping is synchronous, in ``CacheTable``
  (table.py); this class adds what needs awaiting: single-flight and the shared store.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from gateway.cache.entry import CachedToken, SharedStore, VerifiedAssertion
from gateway.cache.singleflight import SingleFlight
from gateway.cache.table import CacheTable, refused, signed
from gateway.config import CacheSettings
from gateway.errors import GatewayError
from gateway.values import Token

A = TypeVar("A", bound=VerifiedAssertion)
# The exchange of one assertion, bound to it by ``obtain``.
Exchange = Callable[[], Awaitable[Token]]

_POLL_FIRST = 0.02  # seconds between shared-store polls, doubling up to _POLL_MAX
_POLL_MAX = 0.25
# Suffix of the ID under which the shared store records "exchanged": a NUL is never in an
# xs:ID, so no assertion can collide with it.
_EXCHANGED = "\x00exchanged"
# Suffix of the ID under which a lock holder whose exchange failed says so, for this long
# (seconds): the replicas waiting on it stop at once instead of after ``shared_wait``. Short,
# because a later attempt may well succeed.
_FAILED = "\x00failed"
_FAILED_TTL = 3.0


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
        self._shared = shared
        self._shared_wait = shared_wait
        self._clock = clock
        self._table = CacheTable(settings, clock=clock, rng=rng)
        self._flights: SingleFlight[tuple[str, str], CachedToken] = SingleFlight()
        # (cache_key, digest) -> the shared-store read running for those bytes
        self._reads: dict[tuple[str, bytes], asyncio.Future[CachedToken | None]] = {}

    def __len__(self) -> int:
        """Tokens held in memory."""
        return len(self._table)

    # What the metrics read (``gateway.metrics.CacheStats``).
    @property
    def hits(self) -> int:
        return self._table.hits

    @property
    def misses(self) -> int:
        return self._table.misses

    @property
    def evictions(self) -> int:
        return self._table.evictions

    @property
    def replays(self) -> int:
        return self._table.replays

    @property
    def negative_hits(self) -> int:
        return self._table.negative_hits

    @property
    def waiters(self) -> int:
        """Callers currently waiting on an exchange another caller started."""
        return self._flights.waiters

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    # --- the hot path --------------------------------------------------------------------

    def lookup(self, cache_key: str, digest: bytes) -> CachedToken | None:
        """The live token for exactly these bytes (by digest), or None; counts hit/miss."""
        return self._table.lookup(cache_key, digest)

    async def shared_lookup(self, cache_key: str, digest: bytes) -> CachedToken | None:
        """After a ``lookup`` miss, before validation: the token another replica obtained
        for exactly these bytes, from the shared store, then held here too; None without a
        store or such an entry (see the module doc for why this may skip validation)."""
        shared = self._shared
        if shared is None:
            return None
        # Concurrent requests with the same new bytes share one read (a burst would otherwise
        # open a connection per request at once). The first reads inline rather than in a
        # task, as SingleFlight would: a task costs a trip through the event loop, which on
        # a busy machine is most of what an L2 hit costs.
        key = (cache_key, digest)
        pending = self._reads.get(key)
        if pending is not None:
            return await asyncio.shield(pending)  # a waiter that leaves cancels nobody
        read: asyncio.Future[CachedToken | None] = asyncio.get_running_loop().create_future()
        self._reads[key] = read
        try:
            entry = await self._find(shared, cache_key, digest)
        except BaseException:
            read.set_result(None)  # the first caller went away: the others validate
            raise
        finally:
            del self._reads[key]
        read.set_result(entry)
        return entry

    async def _find(self, shared: SharedStore, cache_key: str, digest: bytes) -> CachedToken | None:
        generation = self._table.generation(cache_key)
        entry = await shared.find(cache_key, digest)
        # The store checked both already; a replica relies on them, so check them here too.
        if entry is None or entry.cache_key != cache_key or entry.digest != digest:
            return None
        return self._table.adopt(entry, generation)

    def ttl(self, entry: CachedToken) -> float:
        """Seconds ``entry`` will still be served (0 when it no longer is)."""
        return self._table.ttl(entry)

    # --- the miss path -------------------------------------------------------------------

    async def obtain(
        self, cache_key: str, assertion: A, exchange: Callable[[A], Awaitable[Token]]
    ) -> CachedToken:
        """A token for a verified ``assertion``: cached, shared, or from one
        ``exchange(assertion)``."""
        table = self._table
        entry = table.served(cache_key, assertion)
        if entry is not None:
            return entry
        key = (cache_key, assertion.id)
        running = self._flights.tag(key)
        if running is not None and running != signed(assertion):
            raise table.replay_in_flight()
        generation = table.admit(cache_key, assertion)
        return await self._flights.run(
            key,
            signed(assertion),
            lambda: self._fill(cache_key, assertion, lambda: exchange(assertion), generation),
        )

    async def purge(self, entry: CachedToken) -> bool:
        """The upstream refused ``entry``'s token: drop it, and let its assertion be
        exchanged once more. True when it was dropped (False: already dropped or replaced)."""
        if self._table.superseded(entry):
            return False  # replaced by a newer token, which the store may hold: keep both
        # Whether or not this replica still holds it (evicted, expired here, or read from
        # the store by a replica that restarted), the shared copy is that refused token.
        if self._shared is not None:
            await self._shared.delete(entry.cache_key, entry.assertion_id, entry.digest)
            await self._shared.delete(entry.cache_key, entry.assertion_id + _EXCHANGED)
        return self._table.purge(entry)

    def forget(self, cache_key: str) -> int:
        """Forget every in-memory token, ID binding and remembered refusal under
        ``cache_key`` (its trust changed); returns how many tokens went.

        Shared-store entries may stay: the cache key names the trust they were obtained
        under, so a changed trust looks them up under another key and never finds them.
        """
        return self._table.forget(cache_key)

    async def close(self) -> None:
        """Cancel exchanges still in flight (shutdown)."""
        await self._flights.close()

    # --- filling -------------------------------------------------------------------------

    async def _fill(
        self, cache_key: str, assertion: VerifiedAssertion, exchange: Exchange, generation: int
    ) -> CachedToken:
        """The single-flight leader's work: shared store, lock, bind, exchange, store."""
        shared = self._shared
        if shared is None:
            exchanged = await self._exchange(cache_key, assertion, exchange)
            return self._table.keep(assertion, exchanged, generation)
        entry = await self._from_shared(shared, cache_key, assertion)
        if entry is not None:
            return self._table.keep(assertion, entry, generation)
        async with shared.exchange_lock(cache_key, assertion.id) as owner:
            if owner:
                # Another replica may have finished between our get and the lock.
                entry = await self._from_shared(shared, cache_key, assertion)
                if entry is None:
                    entry = await self._exchange_shared(shared, cache_key, assertion, exchange)
                return self._table.keep(assertion, entry, generation)
        entry = await self._wait_for_shared(shared, cache_key, assertion)
        if entry is None:
            # The lock holder did not deliver in time (or the store is down): go ourselves.
            entry = await self._exchange_shared(shared, cache_key, assertion, exchange)
        return self._table.keep(assertion, entry, generation)

    async def _exchange_shared(
        self, shared: SharedStore, cache_key: str, assertion: VerifiedAssertion, exchange: Exchange
    ) -> CachedToken:
        """Bind the ID across replicas, then exchange and publish, unless another replica
        exchanged this signed assertion already (its token, or ``spent``) or bound the ID
        to another one (``replay``)."""
        until = assertion.accepted_until.timestamp()
        bound = await shared.bind_id(cache_key, assertion.id, signed(assertion), until)
        if bound is not None:
            if bound != signed(assertion):
                raise self._table.replay_elsewhere(cache_key, assertion, bound)
            exchanged = await shared.get(cache_key, assertion.id + _EXCHANGED)
            if exchanged is not None and exchanged.fingerprint == signed(assertion):
                entry = await self._from_shared(shared, cache_key, assertion)
                if entry is not None:
                    return entry
                self._table.mark_spent(cache_key, assertion)
                raise refused(
                    "spent", "assertion already exchanged and its token is no longer served"
                )
        try:
            entry = await self._exchange(cache_key, assertion, exchange)
        except Exception as exc:
            await self._publish_failure(shared, cache_key, assertion, exc)
            raise
        if entry.expires_at > self._clock():
            await shared.put(entry)
        if until > self._clock():
            await shared.put(
                CachedToken(
                    cache_key=cache_key,
                    assertion_id=assertion.id + _EXCHANGED,
                    digest=b"",
                    token=Token(access_token="", expires_in=0.0),
                    expires_at=until,
                    fingerprint=signed(assertion),
                )
            )
        return entry

    async def _publish_failure(
        self, shared: SharedStore, cache_key: str, assertion: VerifiedAssertion, exc: Exception
    ) -> None:
        """Tell the replicas waiting on this exchange that it failed, and whether with
        ``invalid_grant`` (then they refuse too; anything else they may try themselves)."""
        remembered = isinstance(exc, GatewayError) and exc.remembered
        await shared.put(
            CachedToken(
                cache_key=cache_key,
                assertion_id=assertion.id + _FAILED,
                digest=b"",
                token=Token(access_token="", expires_in=0.0),
                expires_at=self._clock() + _FAILED_TTL,
                issuer="invalid_grant" if remembered else "failed",  # a marker has no issuer
                fingerprint=signed(assertion),
            )
        )

    async def _exchange(
        self, cache_key: str, assertion: VerifiedAssertion, exchange: Exchange
    ) -> CachedToken:
        try:
            token = await exchange()
        except GatewayError as exc:
            if exc.remembered:
                self._table.remember_refusal(cache_key, assertion.id)
            raise
        return self._table.entry(cache_key, assertion, token)

    async def _from_shared(
        self, shared: SharedStore, cache_key: str, assertion: VerifiedAssertion
    ) -> CachedToken | None:
        entry = await shared.get(cache_key, assertion.id)
        if entry is None or entry.cache_key != cache_key:
            return None
        if entry.fingerprint:
            if entry.fingerprint != signed(assertion):
                return None  # another signed assertion's: never served (bind_id decides)
        elif entry.digest != assertion.digest:
            return None  # written before fingerprints: only for the very same bytes
        if entry.expires_at <= self._clock():
            return None
        return entry

    async def _wait_for_shared(
        self, shared: SharedStore, cache_key: str, assertion: VerifiedAssertion
    ) -> CachedToken | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._shared_wait
        pause = _POLL_FIRST
        while True:
            entry = await self._from_shared(shared, cache_key, assertion)
            if entry is not None:
                return entry
            failed = await shared.get(cache_key, assertion.id + _FAILED)
            if failed is not None and failed.fingerprint == signed(assertion):
                if failed.issuer == "invalid_grant":
                    # the AS refused this very assertion a moment ago: not asked again
                    self._table.remember_refusal(cache_key, assertion.id)
                    raise refused("invalid_grant", "refused on another replica; not asked again")
                return None  # the holder gave up: nothing to wait for, try ourselves
            left = deadline - loop.time()
            if left <= 0:
                return None
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, _POLL_MAX)
