"""The miss path through a SharedStore (the seam the Redis store plugs into)."""

from __future__ import annotations

import asyncio
import dataclasses

from gateway.cache import CachedToken, TokenCache
from gateway.values import Token

from .helpers import T0, Clock, Exchange, MemoryShared, assertion, settings


def _entry(
    presented: object, token: str = "from-replica", expires_at: float = T0 + 600
) -> CachedToken:
    return CachedToken(
        cache_key="as",
        assertion_id=presented.id,  # type: ignore[attr-defined]
        digest=presented.digest,  # type: ignore[attr-defined]
        token=Token(access_token=token, expires_in=600),
        expires_at=expires_at,
    )


async def test_owner_exchanges_and_publishes() -> None:
    shared, exchange = MemoryShared(), Exchange()
    cache = TokenCache(settings(), shared=shared, clock=Clock())
    presented = assertion()
    entry = await cache.obtain("as", presented, exchange)
    assert shared.entries[("as", presented.id)] == entry
    assert shared.bindings[("as", presented.id)][0] == presented.fingerprint
    # the token, and the record that this assertion has been exchanged
    assert shared.puts == 2 and len(exchange.calls) == 1
    assert shared.gets == 2  # before the lock, and again once it is held


async def test_entry_from_another_replica_is_served_without_exchange() -> None:
    shared, exchange = MemoryShared(), Exchange()
    presented = assertion()
    shared.entries[("as", presented.id)] = _entry(presented)
    cache = TokenCache(settings(), shared=shared, clock=Clock())
    entry = await cache.obtain("as", presented, exchange)
    assert entry.token.access_token == "from-replica"
    assert exchange.calls == []
    assert cache.lookup("as", presented.digest) == entry  # now in memory too


async def test_shared_entry_for_other_bytes_is_never_served() -> None:
    shared, exchange = MemoryShared(), Exchange()
    presented = assertion("_dup")
    other = assertion("_dup", body="mallory")
    shared.entries[("as", "_dup")] = _entry(other, token="not-yours")
    cache = TokenCache(settings(), shared=shared, clock=Clock())
    entry = await cache.obtain("as", presented, exchange)
    assert entry.token.access_token == "tok-1"
    assert exchange.calls == ["_dup"]
    assert shared.entries[("as", "_dup")].digest == presented.digest


async def test_expired_shared_entry_is_ignored() -> None:
    shared, exchange = MemoryShared(), Exchange()
    presented = assertion()
    shared.entries[("as", presented.id)] = _entry(presented, expires_at=T0 - 1)
    cache = TokenCache(settings(), shared=shared, clock=Clock())
    assert (await cache.obtain("as", presented, exchange)).token.access_token == "tok-1"


async def test_non_owner_waits_for_the_lock_holder() -> None:
    shared, exchange = MemoryShared(), Exchange()
    shared.never_owner = True
    presented = assertion()
    cache = TokenCache(settings(), shared=shared, shared_wait=5, clock=Clock())

    async def other_replica_delivers() -> None:
        await asyncio.sleep(0.1)
        shared.entries[("as", presented.id)] = _entry(presented)

    delivery = asyncio.create_task(other_replica_delivers())
    entry = await asyncio.wait_for(cache.obtain("as", presented, exchange), 5)
    await delivery
    assert entry.token.access_token == "from-replica"
    assert exchange.calls == []


async def test_non_owner_exchanges_itself_after_the_bounded_wait() -> None:
    shared, exchange = MemoryShared(), Exchange()
    shared.never_owner = True
    presented = assertion()
    cache = TokenCache(settings(), shared=shared, shared_wait=0.1, clock=Clock())
    entry = await asyncio.wait_for(cache.obtain("as", presented, exchange), 5)
    assert entry.token.access_token == "tok-1"
    assert shared.entries[("as", presented.id)] == entry


async def test_two_replicas_make_one_exchange() -> None:
    shared, exchange = MemoryShared(), Exchange()
    exchange.gate = asyncio.Event()
    replicas = [TokenCache(settings(), shared=shared, clock=Clock()) for _ in range(2)]
    presented = assertion()
    tasks = [
        asyncio.create_task(replica.obtain("as", presented, exchange))
        for replica in replicas
        for _ in range(10)
    ]
    await asyncio.wait_for(exchange.started.wait(), 5)
    await asyncio.sleep(0.05)
    exchange.gate.set()
    entries = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert len(exchange.calls) == 1
    assert {e.token.access_token for e in entries} == {"tok-1"}


async def test_purge_reaches_the_shared_store() -> None:
    shared = MemoryShared()
    cache = TokenCache(settings(), shared=shared, clock=Clock())
    presented = assertion()
    entry = await cache.obtain("as", presented, Exchange())
    assert await cache.purge(entry)
    assert shared.deleted == [("as", presented.id), ("as", presented.id + "\x00exchanged")]
    assert ("as", presented.id) not in shared.entries


async def test_short_token_is_not_published() -> None:
    shared = MemoryShared()
    cache = TokenCache(settings(), shared=shared, clock=Clock())
    entry = await cache.obtain("as", assertion(), Exchange(expires_in=0))
    assert dataclasses.is_dataclass(entry)
    assert all(key[1].endswith("\x00exchanged") for key in shared.entries)  # no token
