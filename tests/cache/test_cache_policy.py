"""Token cache policy: binding to the digest, lifetime, LRU bound, replay, negative cache."""

from __future__ import annotations

import asyncio

import pytest

from gateway.cache import TokenCache
from gateway.errors import InvalidAssertion, UpstreamError

from .helpers import T0, Clock, Exchange, assertion, settings


async def test_miss_then_hit_by_digest_only() -> None:
    clock, exchange = Clock(), Exchange()
    cache = TokenCache(settings(), clock=clock)
    presented = assertion()
    assert cache.lookup("as", presented.digest) is None
    entry = await cache.obtain("as", presented, exchange)
    assert entry.token.access_token == "tok-1"
    assert (entry.cache_key, entry.assertion_id, entry.digest) == (
        "as",
        presented.id,
        presented.digest,
    )
    assert cache.lookup("as", presented.digest) is entry
    assert cache.lookup("other-as", presented.digest) is None  # the cache key names the AS too
    assert (cache.hits, cache.misses, len(cache)) == (1, 2, 1)
    # obtain again (e.g. a racing caller) is served from memory, no second exchange
    assert await cache.obtain("as", presented, exchange) is entry
    assert exchange.calls == [presented.id]


async def test_lifetime_is_expires_in_minus_margin_and_jitter() -> None:
    clock, exchange = Clock(), Exchange(expires_in=3600)
    cache = TokenCache(settings(refresh_margin=30, jitter=5), clock=clock, rng=lambda: 0.5)
    presented = assertion()
    entry = await cache.obtain("as", presented, exchange)
    assert entry.expires_at == T0 + 3600 - 30 - 2.5
    assert cache.ttl(entry) == 3567.5
    clock.advance(3567.4)
    assert cache.lookup("as", presented.digest) is entry
    clock.advance(0.1)  # the moment the margin starts: never served again
    assert cache.lookup("as", presented.digest) is None
    assert cache.ttl(entry) == 0
    assert len(cache) == 0
    # The assertion is still valid, but it was exchanged: the AS never sees its ID twice.
    with pytest.raises(InvalidAssertion) as raised:
        await cache.obtain("as", presented, exchange)
    assert raised.value.reason == "spent" and raised.value.status == 401
    assert len(exchange.calls) == 1


async def test_jitter_spreads_expiry() -> None:
    values = iter([0.0, 1.0])
    cache = TokenCache(
        settings(refresh_margin=30, jitter=5), clock=Clock(), rng=lambda: next(values)
    )
    first = await cache.obtain("as", assertion(), Exchange())
    second = await cache.obtain("as", assertion(), Exchange())
    assert first.expires_at - second.expires_at == 5


async def test_short_lived_token_keeps_half_its_life() -> None:
    cache = TokenCache(settings(refresh_margin=30), clock=Clock())
    entry = await cache.obtain("as", assertion(), Exchange(expires_in=40))
    assert entry.expires_at == T0 + 20


async def test_zero_lifetime_token_is_used_once_but_not_kept() -> None:
    clock, exchange = Clock(), Exchange(expires_in=0)
    cache = TokenCache(settings(), clock=clock)
    presented = assertion()
    entry = await cache.obtain("as", presented, exchange)
    assert entry.token.access_token == "tok-1"
    assert len(cache) == 0 and cache.lookup("as", presented.digest) is None


async def test_cap_to_assertion_not_on_or_after() -> None:
    clock = Clock()
    presented = assertion(not_on_or_after=T0 + 300)
    capped = TokenCache(settings(cap_to_assertion=True), clock=clock)
    assert (await capped.obtain("as", presented, Exchange())).expires_at == T0 + 300
    free = TokenCache(settings(cap_to_assertion=False), clock=clock)
    assert (await free.obtain("as", presented, Exchange())).expires_at == T0 + 3600 - 30


async def test_lru_bound_evicts_least_recently_used() -> None:
    cache = TokenCache(settings(max_entries=3), clock=Clock())
    exchange = Exchange()
    first, second, third, fourth = (assertion() for _ in range(4))
    for presented in (first, second, third):
        await cache.obtain("as", presented, exchange)
    assert cache.lookup("as", first.digest) is not None  # first is now the most recent
    await cache.obtain("as", fourth, exchange)
    assert len(cache) == 3 and cache.evictions == 1
    assert cache.lookup("as", second.digest) is None  # the least recently used went
    assert cache.lookup("as", first.digest) is not None
    # The evicted entry's ID binding went with it: a new assertion may use the ID.
    reuse = assertion(second.id, body="bob")
    await cache.obtain("as", reuse, exchange)
    assert cache.replays == 0


async def test_reused_id_with_other_bytes_is_a_replay() -> None:
    clock, exchange = Clock(), Exchange()
    cache = TokenCache(settings(), clock=clock)
    original = assertion("_same")
    forged = assertion("_same", body="mallory")
    await cache.obtain("as", original, exchange)
    with pytest.raises(InvalidAssertion) as raised:
        await cache.obtain("as", forged, exchange)
    assert raised.value.reason == "replay" and raised.value.status == 401
    assert exchange.calls == ["_same"]  # the AS was not asked
    assert cache.replays == 1
    # The same ID at another AS profile is a different key.
    await cache.obtain("other", forged, exchange)
    # The binding outlives the token: a replay for as long as the original is accepted ...
    clock.advance(3600)
    assert cache.lookup("as", original.digest) is None
    with pytest.raises(InvalidAssertion) as raised:
        await cache.obtain("as", forged, exchange)
    assert raised.value.reason == "replay" and cache.replays == 2
    # ... and no longer once validation would refuse the original.
    clock.advance(86400)
    later = assertion("_same", body="mallory", not_on_or_after=clock.now + 300)
    await cache.obtain("as", later, exchange)
    assert len(exchange.calls) == 3


async def test_failed_exchange_is_not_cached() -> None:
    exchange = Exchange()
    exchange.error = UpstreamError("as_server_error", "HTTP 500")
    cache = TokenCache(settings(), clock=Clock())
    presented = assertion()
    for _ in range(2):
        with pytest.raises(UpstreamError):
            await cache.obtain("as", presented, exchange)
    assert len(exchange.calls) == 2 and len(cache) == 0
    exchange.error = None
    assert (await cache.obtain("as", presented, exchange)).token.access_token == "tok-3"


async def test_invalid_grant_is_remembered_for_negative_ttl() -> None:
    clock, exchange = Clock(), Exchange()
    exchange.error = InvalidAssertion("invalid_grant", "expired")
    cache = TokenCache(settings(negative_ttl=30), clock=clock)
    presented = assertion()
    with pytest.raises(InvalidAssertion):
        await cache.obtain("as", presented, exchange)
    for _ in range(5):
        with pytest.raises(InvalidAssertion) as raised:
            await cache.obtain("as", presented, exchange)
        assert raised.value.reason == "invalid_grant"
    assert len(exchange.calls) == 1 and cache.negative_hits == 5
    # Other assertions are not affected.
    exchange.error = None
    await cache.obtain("as", assertion(), exchange)
    clock.advance(30)
    assert (await cache.obtain("as", presented, exchange)).token is not None
    assert len(exchange.calls) == 3


async def test_negative_cache_can_be_disabled() -> None:
    exchange = Exchange()
    exchange.error = InvalidAssertion("invalid_grant")
    cache = TokenCache(settings(negative_ttl=0), clock=Clock())
    presented = assertion()
    for _ in range(2):
        with pytest.raises(InvalidAssertion):
            await cache.obtain("as", presented, exchange)
    assert len(exchange.calls) == 2


async def test_purge_drops_one_entry() -> None:
    cache = TokenCache(settings(), clock=Clock())
    exchange = Exchange()
    kept, purged = assertion(), assertion()
    await cache.obtain("as", kept, exchange)
    entry = await cache.obtain("as", purged, exchange)
    assert await cache.purge(entry) is True
    assert await cache.purge(entry) is False
    assert cache.lookup("as", purged.digest) is None
    assert cache.lookup("as", kept.digest) is not None
    await cache.obtain("as", purged, exchange)  # a fresh exchange, not a replay
    assert len(exchange.calls) == 3 and cache.replays == 0


def test_cache_and_codecs_stay_free_of_network_libraries() -> None:
    import subprocess
    import sys

    code = (
        "import sys, gateway.cache, gateway.oauth, gateway.oauth.grant, gateway.oauth.client_auth;"
        "print(sorted(m for m in ('aiohttp', 'redis') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


async def test_forget_drops_only_that_cache_keys_tokens() -> None:
    cache = TokenCache(settings(), clock=Clock())
    exchange = Exchange()
    first, second = assertion("_one"), assertion("_two")
    await cache.obtain("idp-a", first, exchange)
    await cache.obtain("idp-b", second, exchange)
    assert cache.forget("idp-a") == 1
    assert cache.lookup("idp-a", first.digest) is None
    assert cache.lookup("idp-b", second.digest) is not None
    # The ID is free again under that cache key: the same assertion is exchanged afresh.
    await cache.obtain("idp-a", first, exchange)
    assert len(exchange.calls) == 3 and cache.replays == 0


async def test_an_exchange_under_way_when_trust_changes_is_not_kept() -> None:
    cache = TokenCache(settings(), clock=Clock())
    exchange = Exchange()
    exchange.gate = asyncio.Event()
    presented = assertion()
    pending = asyncio.create_task(cache.obtain("idp-a", presented, exchange))
    await exchange.started.wait()
    cache.forget("idp-a")  # a reload changed this IdP's trust meanwhile
    exchange.gate.set()
    entry = await pending  # this caller, validated under the old trust, gets its answer
    assert entry.token.access_token == "tok-1"
    assert cache.lookup("idp-a", presented.digest) is None  # but nobody else is served it
