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
- No I/O of its own and no aiohttp/redis import: the clock, the random source, the exchange
  and the shared store are handed in.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from cachetools import LRUCache

from gateway.cache.entry import CachedToken, SharedStore, VerifiedAssertion
from gateway.cache.singleflight import SingleFlight
from gateway.config import CacheSettings
from gateway.errors import GatewayError, InvalidAssertion
from gateway.values import Token

K = TypeVar("K")
V = TypeVar("V")

A = TypeVar("A", bound=VerifiedAssertion)
# The exchange of one assertion, bound to it by ``obtain``.
Exchange = Callable[[], Awaitable[Token]]

_POLL_FIRST = 0.02  # seconds between shared-store polls, doubling up to _POLL_MAX
_POLL_MAX = 0.25
# Hot-path keys per ID besides the exchanged bytes: enough for the variants real clients
# produce, and a client sending endless variants only costs itself validations.
_MAX_VARIANTS = 4
# Suffix of the ID under which the shared store records "exchanged": a NUL is never in an
# xs:ID, so no assertion can collide with it.
_EXCHANGED = "\x00exchanged"
# Suffix of the ID under which a lock holder whose exchange failed says so, for this long
# (seconds): the replicas waiting on it stop at once instead of after ``shared_wait``. Short,
# because a later attempt may well succeed.
_FAILED = "\x00failed"
_FAILED_TTL = 3.0


class _Lru(LRUCache[K, V]):
    """An LRU cache that reports what its size bound pushes out."""

    def __init__(self, maxsize: int, on_evict: Callable[[K, V], None]) -> None:
        super().__init__(maxsize)
        self._on_evict = on_evict

    def popitem(self) -> tuple[K, V]:
        key, value = super().popitem()
        self._on_evict(key, value)
        return key, value


@dataclass(slots=True, eq=False)
class _Binding:
    """What this replica knows about one (cache_key, assertion ID)."""

    key: tuple[str, str]
    fingerprint: bytes  # of the signed assertion the ID belongs to
    until: float  # when validation stops accepting it (wall clock)
    entry: CachedToken | None = None  # its token, while served
    digests: list[bytes] = field(default_factory=list)  # hot-path keys pointing at entry
    spent: bool = False  # its token was obtained: no further exchange (bar a re-exchange)


def _refused(reason: str, detail: str) -> InvalidAssertion:
    return InvalidAssertion(reason, detail)


def _remembered(exc: BaseException) -> bool:
    """Whether the negative cache may keep this failure: the error type says so. The
    ``remembered`` attribute is added to the gateway errors on another branch; until it is
    there, the rule it replaces (``invalid_grant``) stands in."""
    if not isinstance(exc, GatewayError):
        return False
    return bool(getattr(exc, "remembered", exc.reason == "invalid_grant"))


def _signed(assertion: VerifiedAssertion) -> bytes:
    """What identifies the signed assertion (the digest for a value built without one)."""
    return assertion.fingerprint or assertion.digest


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
        # (cache_key, assertion ID) -> binding: replay rules and the token itself.
        self._bindings: _Lru[tuple[str, str], _Binding] = _Lru(settings.max_entries, self._evicted)
        # (cache_key, digest of the decoded bytes) -> binding with a token: what the hot path
        # probes. Kept in step with the bindings, so it is bounded with them.
        self._index: dict[tuple[str, bytes], _Binding] = {}
        self._tokens = 0
        # (cache_key, assertion ID) -> until when an invalid_grant answer is remembered.
        self._negative: LRUCache[tuple[str, str], float] = LRUCache(settings.max_entries)
        self._flights: SingleFlight[tuple[str, str], CachedToken] = SingleFlight()
        # Bumped by forget: an exchange started before is not kept after.
        self._generations: dict[str, int] = {}
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.replays = 0
        self.negative_hits = 0

    def __len__(self) -> int:
        """Tokens held in memory."""
        return self._tokens

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
        binding = self._index.get((cache_key, digest))
        if binding is not None:
            entry = binding.entry
            if entry is not None and entry.expires_at > self._clock():
                self._bindings.get(binding.key)  # recently used
                self.hits += 1
                return entry
            self._drop_token(binding)
        self.misses += 1
        return None

    def ttl(self, entry: CachedToken) -> float:
        """Seconds ``entry`` will still be served (0 when it no longer is)."""
        return max(0.0, entry.expires_at - self._clock())

    # --- the miss path -------------------------------------------------------------------

    async def obtain(
        self, cache_key: str, assertion: A, exchange: Callable[[A], Awaitable[Token]]
    ) -> CachedToken:
        """A token for a verified ``assertion``: cached, shared, or from one
        ``exchange(assertion)``."""
        now = self._clock()
        key = (cache_key, assertion.id)
        binding = self._binding(key, now)
        if binding is not None:
            entry = self._served(binding, assertion, now)
            if entry is not None:
                return entry
        running = self._flights.tag(key)
        if running is not None and running != _signed(assertion):
            self.replays += 1
            raise _refused("replay", "assertion ID in flight for another signed assertion")
        remembered = self._negative.get(key)
        if remembered is not None:
            if remembered > now:
                self.negative_hits += 1
                raise _refused("invalid_grant", "refused recently; not asked again")
            self._negative.pop(key, None)
        if binding is None:
            self._bind(key, assertion)
        generation = self._generations.get(cache_key, 0)
        return await self._flights.run(
            key,
            _signed(assertion),
            lambda: self._fill(cache_key, assertion, lambda: exchange(assertion), generation),
        )

    async def purge(self, entry: CachedToken) -> bool:
        """The upstream refused ``entry``'s token: drop it, and let its assertion be
        exchanged once more. True when it was dropped (False: already dropped or replaced)."""
        cache_key = entry.cache_key
        binding = self._bindings.get((cache_key, entry.assertion_id))
        if binding is not None and binding.entry is not None and binding.entry is not entry:
            return False  # replaced by a newer token, which the store may hold: keep both
        # Whether or not this replica still holds it (evicted, expired here, or read from
        # the store by a replica that restarted), the shared copy is that refused token.
        if self._shared is not None:
            await self._shared.delete(cache_key, entry.assertion_id)
            await self._shared.delete(cache_key, entry.assertion_id + _EXCHANGED)
        if binding is None or (binding.entry is None and not binding.spent):
            return False
        binding.spent = False  # one more exchange for this assertion
        self._drop_token(binding)
        return True

    def forget(self, cache_key: str) -> int:
        """Forget every in-memory token, ID binding and remembered refusal under ``cache_key``
        (its trust changed); returns how many tokens went.

        Shared-store entries may stay: they are only read after the assertion has been
        validated again, under the new trust.
        """
        # Exchanges already under way for this cache key finish, but do not store their tokens.
        self._generations[cache_key] = self._generations.get(cache_key, 0) + 1
        # Keys only: reading values through the LRU would reorder it.
        stale = [key for key in self._bindings if key[0] == cache_key]
        dropped = 0
        for key in stale:
            binding = self._bindings.pop(key)
            if binding.entry is not None:
                dropped += 1
                self._drop_token(binding)
        for key in [key for key in self._negative if key[0] == cache_key]:
            del self._negative[key]
        return dropped

    async def close(self) -> None:
        """Cancel exchanges still in flight (shutdown)."""
        await self._flights.close()

    # --- bindings ------------------------------------------------------------------------

    def _binding(self, key: tuple[str, str], now: float) -> _Binding | None:
        """The live binding of ``key``, its token dropped if no longer served."""
        binding = self._bindings.get(key)
        if binding is None:
            return None
        if binding.entry is not None and binding.entry.expires_at <= now:
            self._drop_token(binding)
        if binding.entry is None and binding.until <= now:
            del self._bindings[key]  # the assertion is no longer accepted anywhere
            return None
        return binding

    def _served(
        self, binding: _Binding, assertion: VerifiedAssertion, now: float
    ) -> CachedToken | None:
        """The live token a bound ID gives ``assertion``, None when it may be exchanged, or
        the refusal."""
        if binding.fingerprint != _signed(assertion):
            self.replays += 1
            raise _refused("replay", "assertion ID already used by another signed assertion")
        entry = binding.entry
        if entry is not None:
            self._add_variant(binding, assertion.digest)
            return entry
        if binding.spent:
            raise _refused("spent", "assertion already exchanged and its token is no longer served")
        return None

    def _bind(self, key: tuple[str, str], assertion: VerifiedAssertion) -> _Binding:
        replaced = self._bindings.get(key)
        if replaced is not None:
            self._drop_token(replaced)  # no hot-path key may outlive its binding
        binding = _Binding(key, _signed(assertion), assertion.accepted_until.timestamp())
        self._bindings[key] = binding
        return binding

    def _set_token(self, binding: _Binding, entry: CachedToken, digest: bytes) -> None:
        if binding.entry is not None:
            self._drop_token(binding)
        binding.entry = entry
        self._tokens += 1
        # Only bytes validated here: a token from the shared store was exchanged for bytes
        # another replica checked, and each replica validates before it serves.
        self._add_variant(binding, digest)

    def _add_variant(self, binding: _Binding, digest: bytes) -> None:
        if digest in binding.digests or len(binding.digests) > _MAX_VARIANTS:
            return
        binding.digests.append(digest)
        self._index[(binding.key[0], digest)] = binding

    def _drop_token(self, binding: _Binding) -> None:
        if binding.entry is None:
            return
        cache_key = binding.key[0]
        for digest in binding.digests:
            self._index.pop((cache_key, digest), None)
        binding.digests.clear()
        binding.entry = None
        self._tokens -= 1

    def _evicted(self, key: tuple[str, str], binding: _Binding) -> None:
        if binding.entry is not None:
            self.evictions += 1
            self._drop_token(binding)

    # --- filling -------------------------------------------------------------------------

    async def _fill(
        self, cache_key: str, assertion: VerifiedAssertion, exchange: Exchange, generation: int
    ) -> CachedToken:
        """The single-flight leader's work: shared store, lock, bind, exchange, store."""
        shared = self._shared
        if shared is None:
            exchanged = await self._exchange(cache_key, assertion, exchange)
            return self._keep(assertion, exchanged, generation)
        entry = await self._from_shared(shared, cache_key, assertion)
        if entry is not None:
            return self._keep(assertion, entry, generation)
        async with shared.exchange_lock(cache_key, assertion.id) as owner:
            if owner:
                # Another replica may have finished between our get and the lock.
                entry = await self._from_shared(shared, cache_key, assertion)
                if entry is None:
                    entry = await self._exchange_shared(shared, cache_key, assertion, exchange)
                return self._keep(assertion, entry, generation)
        entry = await self._wait_for_shared(shared, cache_key, assertion)
        if entry is None:
            # The lock holder did not deliver in time (or the store is down): go ourselves.
            entry = await self._exchange_shared(shared, cache_key, assertion, exchange)
        return self._keep(assertion, entry, generation)

    async def _exchange_shared(
        self, shared: SharedStore, cache_key: str, assertion: VerifiedAssertion, exchange: Exchange
    ) -> CachedToken:
        """Bind the ID across replicas, then exchange and publish, unless another replica
        exchanged this signed assertion already (its token, or ``spent``) or bound the ID
        to another one (``replay``)."""
        until = assertion.accepted_until.timestamp()
        bound = await shared.bind_id(cache_key, assertion.id, _signed(assertion), until)
        if bound is not None:
            if bound != _signed(assertion):
                self._rebind(cache_key, assertion, bound)
                self.replays += 1
                raise _refused("replay", "assertion ID bound to another signed assertion")
            exchanged = await shared.get(cache_key, assertion.id + _EXCHANGED)
            if exchanged is not None and exchanged.fingerprint == _signed(assertion):
                entry = await self._from_shared(shared, cache_key, assertion)
                if entry is not None:
                    return entry
                self._mark_spent(cache_key, assertion)
                raise _refused(
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
                    fingerprint=_signed(assertion),
                )
            )
        return entry

    async def _publish_failure(
        self, shared: SharedStore, cache_key: str, assertion: VerifiedAssertion, exc: Exception
    ) -> None:
        """Tell the replicas waiting on this exchange that it failed, and whether with
        ``invalid_grant`` (then they refuse too; anything else they may try themselves)."""
        refused = _remembered(exc)
        await shared.put(
            CachedToken(
                cache_key=cache_key,
                assertion_id=assertion.id + _FAILED,
                digest=b"",
                token=Token(access_token="", expires_in=0.0),
                expires_at=self._clock() + _FAILED_TTL,
                issuer="invalid_grant" if refused else "failed",  # a marker has no issuer
                fingerprint=_signed(assertion),
            )
        )

    async def _exchange(
        self, cache_key: str, assertion: VerifiedAssertion, exchange: Exchange
    ) -> CachedToken:
        try:
            token = await exchange()
        except GatewayError as exc:
            if _remembered(exc) and self._settings.negative_ttl > 0:
                until = self._clock() + self._settings.negative_ttl
                self._negative[(cache_key, assertion.id)] = until
            raise
        return CachedToken(
            cache_key=cache_key,
            assertion_id=assertion.id,
            digest=assertion.digest,
            token=token,
            expires_at=self._expires_at(token, assertion),
            issuer=assertion.issuer,
            fingerprint=_signed(assertion),
        )

    def _expires_at(self, token: Token, assertion: VerifiedAssertion) -> float:
        settings = self._settings
        now = self._clock()
        lifetime = max(0.0, token.expires_in)
        margin = settings.refresh_margin + settings.jitter * self._rng()
        # A token shorter than twice the margin would never be cached at all; keep half.
        expires_at = now + lifetime - min(margin, lifetime / 2)
        if settings.cap_to_assertion:
            # Where validation stops accepting the assertion (the same skew), not the bare
            # NotOnOrAfter: during the skew that would make every new entry born expired.
            expires_at = min(expires_at, assertion.accepted_until.timestamp())
        return expires_at

    def _keep(
        self, assertion: VerifiedAssertion, entry: CachedToken, generation: int
    ) -> CachedToken:
        """Record that ``assertion`` got ``entry`` and put a live entry in memory (a dead one
        is still handed to this one caller), unless the cache key's trust changed while it was
        being obtained (see ``forget``)."""
        cache_key = entry.cache_key
        if self._generations.get(cache_key, 0) != generation:
            return entry
        key = (cache_key, assertion.id)
        binding = self._bindings.get(key)
        if binding is None or binding.fingerprint != _signed(assertion):
            binding = self._bind(key, assertion)  # evicted meanwhile: bind again
        binding.spent = True
        if entry.expires_at > self._clock():
            self._set_token(binding, entry, assertion.digest)
        return entry

    def _rebind(self, cache_key: str, assertion: VerifiedAssertion, bound: bytes) -> None:
        """Another replica bound the ID first: what this one claimed for ``assertion`` when
        the exchange began belongs to ``bound`` instead."""
        binding = self._bindings.get((cache_key, assertion.id))
        if binding is not None and binding.fingerprint == _signed(assertion) and not binding.spent:
            binding.fingerprint = bound

    def _mark_spent(self, cache_key: str, assertion: VerifiedAssertion) -> None:
        key = (cache_key, assertion.id)
        binding = self._bindings.get(key)
        if binding is None or binding.fingerprint != _signed(assertion):
            binding = self._bind(key, assertion)
        binding.spent = True

    async def _from_shared(
        self, shared: SharedStore, cache_key: str, assertion: VerifiedAssertion
    ) -> CachedToken | None:
        entry = await shared.get(cache_key, assertion.id)
        if entry is None or entry.cache_key != cache_key:
            return None
        if entry.fingerprint:
            if entry.fingerprint != _signed(assertion):
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
            if failed is not None and failed.fingerprint == _signed(assertion):
                if failed.issuer == "invalid_grant":
                    # the AS refused this very assertion a moment ago: not asked again
                    if self._settings.negative_ttl > 0:
                        until = self._clock() + self._settings.negative_ttl
                        self._negative[(cache_key, assertion.id)] = until
                    raise _refused("invalid_grant", "refused on another replica; not asked again")
                return None  # the holder gave up: nothing to wait for, try ourselves
            left = deadline - loop.time()
            if left <= 0:
                return None
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, _POLL_MAX)
