"""The token cache's bookkeeping, synchronous and without I/O: tokens, ID bindings, remembered
refusals and generations, on a clock that is handed in. ``TokenCache`` (cache.py) is the
async shell around it (single-flight, the shared store); the rules are in its docstring.

Rules this module owns:
- Every (cache_key, assertion ID) seen on the miss path has a binding: the fingerprint of
  the signed assertion it belongs to, until validation stops accepting it, its token while
  that is served, and whether a token was ever obtained (``spent``). The bindings are an
  LRU of ``max_entries``; a binding pushed out takes its token with it.
- The hot-path index (cache_key, digest) → binding holds only bindings with a live token,
  the exchanged bytes and a few validated byte variants of each (``_MAX_VARIANTS``), so it
  is bounded with the bindings and never outlives one.
- A refusal the error type marks as ``remembered`` is kept per (cache_key, assertion ID)
  for ``negative_ttl`` seconds.
- ``forget(cache_key)`` bumps the key's generation: what an exchange started before brings
  back is handed to its callers but not kept.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from cachetools import LRUCache

from gateway.cache.entry import CachedToken, VerifiedAssertion
from gateway.config import CacheSettings
from gateway.errors import InvalidAssertion
from gateway.values import Token

K = TypeVar("K")
V = TypeVar("V")
Key = tuple[str, str]  # (cache_key, assertion ID)

# Hot-path keys per ID besides the exchanged bytes: enough for the variants real clients
# produce, and a client sending endless variants only costs itself validations.
_MAX_VARIANTS = 4


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

    key: Key
    fingerprint: bytes  # of the signed assertion the ID belongs to
    until: float  # when validation stops accepting it (wall clock)
    entry: CachedToken | None = None  # its token, while served
    digests: list[bytes] = field(default_factory=list)  # hot-path keys pointing at entry
    spent: bool = False  # its token was obtained: no further exchange (bar a re-exchange)


def signed(assertion: VerifiedAssertion) -> bytes:
    """What identifies the signed assertion (the digest for a value built without one)."""
    return assertion.fingerprint or assertion.digest


def refused(reason: str, detail: str) -> InvalidAssertion:
    return InvalidAssertion(reason, detail)


class CacheTable:
    """Tokens, ID bindings, remembered refusals and generations of one process."""

    def __init__(
        self,
        settings: CacheSettings,
        *,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._rng = rng
        self._bindings: _Lru[Key, _Binding] = _Lru(settings.max_entries, self._evicted)
        # (cache_key, digest of the decoded bytes) -> binding with a token: what the hot
        # path probes. Kept in step with the bindings, so it is bounded with them.
        self._index: dict[tuple[str, bytes], _Binding] = {}
        self._tokens = 0
        # (cache_key, assertion ID) -> until when a refusal is remembered.
        self._negative: LRUCache[Key, float] = LRUCache(settings.max_entries)
        self._generations: dict[str, int] = {}
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.replays = 0
        self.negative_hits = 0

    def __len__(self) -> int:
        """Tokens held."""
        return self._tokens

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

    # --- before an exchange --------------------------------------------------------------

    def served(self, cache_key: str, assertion: VerifiedAssertion) -> CachedToken | None:
        """The live token a bound ID gives ``assertion`` (its bytes then point at it too),
        None when it may be exchanged; raises ``replay`` or ``spent``."""
        key = (cache_key, assertion.id)
        binding = self._live(key, self._clock())
        if binding is None:
            return None
        if binding.fingerprint != signed(assertion):
            self.replays += 1
            raise refused("replay", "assertion ID already used by another signed assertion")
        entry = binding.entry
        if entry is not None:
            self._add_variant(binding, assertion.digest)
            return entry
        if binding.spent:
            raise refused("spent", "assertion already exchanged and its token is no longer served")
        return None

    def admit(self, cache_key: str, assertion: VerifiedAssertion) -> int:
        """Let ``assertion`` be exchanged: raises a remembered refusal, else binds its ID
        (when unbound) and returns the cache key's generation, for ``keep``."""
        key = (cache_key, assertion.id)
        now = self._clock()
        remembered = self._negative.get(key)
        if remembered is not None:
            if remembered > now:
                self.negative_hits += 1
                raise refused("invalid_grant", "refused recently; not asked again")
            self._negative.pop(key, None)
        if self._live(key, now) is None:
            self._bind(key, assertion)
        return self._generations.get(cache_key, 0)

    def replay_in_flight(self) -> InvalidAssertion:
        """The refusal for an ID whose exchange is running for another signed assertion."""
        self.replays += 1
        return refused("replay", "assertion ID in flight for another signed assertion")

    def replay_elsewhere(
        self, cache_key: str, assertion: VerifiedAssertion, bound: bytes
    ) -> InvalidAssertion:
        """Another replica bound the ID first, to ``bound``: what this one claimed for
        ``assertion`` belongs to ``bound`` instead. Returns the refusal."""
        binding = self._bindings.get((cache_key, assertion.id))
        if binding is not None and binding.fingerprint == signed(assertion) and not binding.spent:
            binding.fingerprint = bound
        self.replays += 1
        return refused("replay", "assertion ID bound to another signed assertion")

    def remember_refusal(self, cache_key: str, assertion_id: str) -> None:
        """The AS refused this assertion: not asked again for ``negative_ttl``."""
        if self._settings.negative_ttl > 0:
            until = self._clock() + self._settings.negative_ttl
            self._negative[(cache_key, assertion_id)] = until

    # --- after an exchange ---------------------------------------------------------------

    def entry(self, cache_key: str, assertion: VerifiedAssertion, token: Token) -> CachedToken:
        """The entry for a token just obtained for ``assertion``, with its expiry: until
        ``expires_in`` minus the margin minus jitter (never more than half the life),
        capped where validation stops accepting the assertion when so configured."""
        settings = self._settings
        now = self._clock()
        lifetime = max(0.0, token.expires_in)
        margin = settings.refresh_margin + settings.jitter * self._rng()
        # A token shorter than twice the margin would never be cached at all; keep half.
        expires_at = now + lifetime - min(margin, lifetime / 2)
        accepted_until = assertion.accepted_until.timestamp()
        if settings.cap_to_assertion:
            # Where validation stops accepting the assertion (the same skew), not the bare
            # NotOnOrAfter: during the skew that would make every new entry born expired.
            expires_at = min(expires_at, accepted_until)
        return CachedToken(
            cache_key=cache_key,
            assertion_id=assertion.id,
            digest=assertion.digest,
            token=token,
            expires_at=expires_at,
            issuer=assertion.issuer,
            fingerprint=signed(assertion),
            accepted_until=accepted_until,
        )

    def keep(
        self, assertion: VerifiedAssertion, entry: CachedToken, generation: int
    ) -> CachedToken:
        """Record that ``assertion`` got ``entry`` and hold a live entry (a dead one is still
        handed to this one caller), unless the cache key's trust changed while it was being
        obtained (see ``forget``)."""
        cache_key = entry.cache_key
        if self._generations.get(cache_key, 0) != generation:
            return entry
        binding = self._claimed(cache_key, assertion)
        binding.spent = True
        if entry.expires_at > self._clock():
            self._set_token(binding, entry, assertion.digest)
        return entry

    def generation(self, cache_key: str) -> int:
        return self._generations.get(cache_key, 0)

    def adopt(self, entry: CachedToken, generation: int) -> CachedToken | None:
        """Hold ``entry``, which another replica obtained for exactly the bytes of
        ``entry.digest`` (the shared store found it by them), as if obtained here: its ID
        bound to its fingerprint, spent, its bytes on the hot path. None when it may not be
        served: expired, without a fingerprint, or its ID bound here to another signed
        assertion (validation then decides, and the replay rules with it). Handed back but
        not held when the cache key's trust changed meanwhile (see ``forget``)."""
        now = self._clock()
        if entry.expires_at <= now or not entry.fingerprint:
            return None
        if self._generations.get(entry.cache_key, 0) != generation:
            return entry
        key = (entry.cache_key, entry.assertion_id)
        binding = self._live(key, now)
        if binding is None:
            until = max(entry.accepted_until, entry.expires_at)
            binding = _Binding(key, entry.fingerprint, until)
            self._bindings[key] = binding
        elif binding.fingerprint != entry.fingerprint:
            return None
        binding.spent = True
        if binding.entry is None:
            self._set_token(binding, entry, entry.digest)
            return entry
        self._add_variant(binding, entry.digest)  # the same assertion's token, held already
        return binding.entry

    def mark_spent(self, cache_key: str, assertion: VerifiedAssertion) -> None:
        """Another replica exchanged this assertion and its token is no longer served."""
        self._claimed(cache_key, assertion).spent = True

    # --- revocation ----------------------------------------------------------------------

    def superseded(self, entry: CachedToken) -> bool:
        """Whether a newer token replaced ``entry`` (the store may hold it: keep both)."""
        binding = self._bindings.get((entry.cache_key, entry.assertion_id))
        return binding is not None and binding.entry is not None and binding.entry is not entry

    def purge(self, entry: CachedToken) -> bool:
        """The upstream refused ``entry``'s token: drop it, and let its assertion be
        exchanged once more. True when it was dropped (False: already dropped)."""
        binding = self._bindings.get((entry.cache_key, entry.assertion_id))
        if binding is None or (binding.entry is None and not binding.spent):
            return False
        binding.spent = False  # one more exchange for this assertion
        self._drop_token(binding)
        return True

    def forget(self, cache_key: str) -> int:
        """Forget every token, ID binding and remembered refusal under ``cache_key`` (its
        trust changed); returns how many tokens went."""
        # Exchanges already under way for this cache key finish, but do not keep their tokens.
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

    # --- bindings ------------------------------------------------------------------------

    def _live(self, key: Key, now: float) -> _Binding | None:
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

    def _claimed(self, cache_key: str, assertion: VerifiedAssertion) -> _Binding:
        """The binding of ``assertion``'s ID to it, bound again if evicted or rebound."""
        key = (cache_key, assertion.id)
        binding = self._bindings.get(key)
        if binding is None or binding.fingerprint != signed(assertion):
            binding = self._bind(key, assertion)
        return binding

    def _bind(self, key: Key, assertion: VerifiedAssertion) -> _Binding:
        replaced = self._bindings.get(key)
        if replaced is not None:
            self._drop_token(replaced)  # no hot-path key may outlive its binding
        binding = _Binding(key, signed(assertion), assertion.accepted_until.timestamp())
        self._bindings[key] = binding
        return binding

    def _set_token(self, binding: _Binding, entry: CachedToken, digest: bytes) -> None:
        if binding.entry is not None:
            self._drop_token(binding)
        binding.entry = entry
        self._tokens += 1
        # Bytes validated here, or (``adopt``) the very bytes another replica validated.
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

    def _evicted(self, key: Key, binding: _Binding) -> None:
        if binding.entry is not None:
            self.evictions += 1
            self._drop_token(binding)
