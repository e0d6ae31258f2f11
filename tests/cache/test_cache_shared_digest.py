"""L2 hits by digest: a replica sent exactly the bytes another replica exchanged serves that
token from the shared store before any validation, bound to the cache key, the expiry and
the replay rules by ID (TokenCache.shared_lookup)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.cache import CachedToken, TokenCache
from gateway.errors import InvalidAssertion

from .helpers import Clock, Exchange, MemoryShared, assertion, settings

KEY = "idp\x1fas\x1f0123456789abcdef"


def replicas(
    clock: Clock, **overrides: object
) -> tuple[MemoryShared, TokenCache, TokenCache, Exchange]:
    shared = MemoryShared(clock)
    a = TokenCache(settings(**overrides), shared=shared, clock=clock)
    b = TokenCache(settings(**overrides), shared=shared, clock=clock)
    return shared, a, b, Exchange()


async def test_the_exchanged_bytes_are_served_on_another_replica_from_one_read() -> None:
    clock = Clock()
    shared, a, b, exchange = replicas(clock)
    presented = assertion()
    obtained = await a.obtain(KEY, presented, exchange)
    assert b.lookup(KEY, presented.digest) is None  # not in B's memory
    served = await b.shared_lookup(KEY, presented.digest)
    assert served == obtained
    assert shared.finds == 1 and len(exchange.calls) == 1
    assert b.lookup(KEY, presented.digest) == obtained  # held by B now: an L1 hit next


async def test_another_cache_key_finds_nothing() -> None:
    clock = Clock()
    _, a, b, exchange = replicas(clock)
    presented = assertion()
    await a.obtain(KEY, presented, exchange)
    # another route's IdP or AS, or the same after a trust change: another key
    assert await b.shared_lookup("idp\x1fother-as\x1f0123456789abcdef", presented.digest) is None
    assert await b.shared_lookup("idp\x1fas\x1ffedcba9876543210", presented.digest) is None


async def test_other_bytes_of_the_same_assertion_are_validated_first() -> None:
    clock = Clock()
    _, a, b, exchange = replicas(clock)
    await a.obtain(KEY, assertion("_v1"), exchange)
    variant = assertion("_v1", variant="\n")  # same signed content, other bytes
    assert await b.shared_lookup(KEY, variant.digest) is None
    # after validation it shares the token by ID, as before
    entry = await b.obtain(KEY, variant, exchange)
    assert entry.token.access_token == "tok-1" and len(exchange.calls) == 1


async def test_an_expired_token_is_never_served_from_the_store() -> None:
    clock = Clock()
    _, a, b, exchange = replicas(clock, refresh_margin=0)
    exchange.expires_in = 60
    presented = assertion()
    await a.obtain(KEY, presented, exchange)
    clock.advance(60)
    assert await b.shared_lookup(KEY, presented.digest) is None


async def test_the_cap_to_the_assertion_holds_for_l2_hits() -> None:
    clock = Clock()
    _, a, b, exchange = replicas(clock, refresh_margin=0, cap_to_assertion=True)
    presented = assertion(not_on_or_after=clock.now + 100)
    await a.obtain(KEY, presented, exchange)  # a 3600 s token, capped at 100 s
    clock.advance(99)
    assert await b.shared_lookup(KEY, presented.digest) is not None
    clock.advance(1)
    assert b.lookup(KEY, presented.digest) is None
    assert await b.shared_lookup(KEY, presented.digest) is None


async def test_an_adopted_token_spends_its_assertion_on_that_replica() -> None:
    clock = Clock()
    _, a, b, exchange = replicas(clock, refresh_margin=0)
    exchange.expires_in = 60
    presented = assertion()
    await a.obtain(KEY, presented, exchange)
    assert await b.shared_lookup(KEY, presented.digest) is not None
    clock.advance(60)  # the token is no longer served; the assertion is still valid
    with pytest.raises(InvalidAssertion) as caught:
        await b.obtain(KEY, presented, exchange)
    assert caught.value.reason == "spent"
    assert len(exchange.calls) == 1


async def test_another_signed_assertion_under_an_adopted_id_is_a_replay() -> None:
    clock = Clock()
    _, a, b, exchange = replicas(clock)
    presented = assertion("_dup", body="alice")
    await a.obtain(KEY, presented, exchange)
    assert await b.shared_lookup(KEY, presented.digest) is not None
    with pytest.raises(InvalidAssertion) as caught:
        await b.obtain(KEY, assertion("_dup", body="mallory"), exchange)
    assert caught.value.reason == "replay"
    assert len(exchange.calls) == 1


async def test_an_id_bound_here_to_another_assertion_is_not_adopted() -> None:
    clock = Clock()
    shared, a, b, exchange = replicas(clock)
    mine = assertion("_dup", body="alice")
    await b.obtain(KEY, mine, exchange)  # B bound the ID first (its store write was lost)
    shared.bindings.clear()
    theirs = assertion("_dup", body="mallory")
    await a.obtain(KEY, theirs, exchange)
    assert await b.shared_lookup(KEY, theirs.digest) is None
    assert b.lookup(KEY, theirs.digest) is None


async def test_purge_removes_the_copy_found_by_digest() -> None:
    clock = Clock()
    _, a, b, exchange = replicas(clock)
    presented = assertion()
    entry = await a.obtain(KEY, presented, exchange)
    assert await a.purge(entry) is True
    assert await b.shared_lookup(KEY, presented.digest) is None


async def test_what_arrives_after_a_trust_change_is_served_but_not_kept() -> None:
    clock = Clock()
    shared, a, b, exchange = replicas(clock)
    presented = assertion()
    await a.obtain(KEY, presented, exchange)

    def reload_lands_during_the_read() -> None:
        b.forget(KEY)

    shared.on_find = reload_lands_during_the_read
    assert await b.shared_lookup(KEY, presented.digest) is not None
    assert b.lookup(KEY, presented.digest) is None


async def test_without_a_shared_store_there_is_no_l2() -> None:
    cache = TokenCache(settings(), clock=Clock())
    assert await cache.shared_lookup(KEY, assertion().digest) is None


async def test_concurrent_requests_with_the_same_bytes_share_one_read() -> None:
    clock = Clock()
    shared, a, b, exchange = replicas(clock)
    presented = assertion()
    await a.obtain(KEY, presented, exchange)
    served = await asyncio.gather(*(b.shared_lookup(KEY, presented.digest) for _ in range(50)))
    assert len({id(entry) for entry in served}) == 1 and served[0] is not None
    assert shared.finds == 1


async def test_a_first_caller_that_goes_away_leaves_the_others_to_validate() -> None:
    clock = Clock()
    shared, a, _, exchange = replicas(clock)
    presented = assertion()
    await a.obtain(KEY, presented, exchange)
    gate = asyncio.Event()

    class SlowStore(MemoryShared):
        async def find(self, cache_key: str, digest: bytes) -> CachedToken | None:
            await gate.wait()
            return await shared.find(cache_key, digest)

    b = TokenCache(settings(), shared=SlowStore(clock), clock=clock)
    first = asyncio.create_task(b.shared_lookup(KEY, presented.digest))
    await asyncio.sleep(0)
    second = asyncio.create_task(b.shared_lookup(KEY, presented.digest))
    await asyncio.sleep(0)
    first.cancel()  # its client disconnected
    assert await asyncio.wait_for(second, 5) is None  # not cancelled with it
    assert first.cancelled()
    gate.set()
    assert await b.shared_lookup(KEY, presented.digest) is not None  # the next one reads
