"""The cross-replica exchange lock on a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from gateway.cache.redis import RedisTokenStore, lock_name
from gateway.config import RedisSettings

StoreFactory = Callable[..., RedisTokenStore]
LOCK = lock_name("samlgw:", "okta", "_a1b2c3")


async def test_lock_is_exclusive_between_two_replicas(make_store: StoreFactory) -> None:
    replica_a, replica_b = make_store(), make_store()
    async with replica_a.exchange_lock("okta", "_a1b2c3") as owned_a:
        assert owned_a is True
        async with replica_b.exchange_lock("okta", "_a1b2c3") as owned_b:
            assert owned_b is False
        # another assertion is another lock
        async with replica_b.exchange_lock("okta", "_other") as owned_other:
            assert owned_other is True
    async with replica_b.exchange_lock("okta", "_a1b2c3") as owned_b:
        assert owned_b is True


async def test_lock_is_released_when_the_exchange_fails(
    make_store: StoreFactory, raw_redis: aioredis.Redis
) -> None:
    store = make_store()
    with pytest.raises(RuntimeError, match="exchange failed"):
        async with store.exchange_lock("okta", "_a1b2c3") as owned:
            assert owned
            raise RuntimeError("exchange failed")
    assert await raw_redis.exists(LOCK) == 0


async def test_lock_is_released_only_by_its_owner(
    make_store: StoreFactory, raw_redis: aioredis.Redis
) -> None:
    replica_a, replica_b = make_store(), make_store()
    lock_a = replica_a.exchange_lock("okta", "_a1b2c3")
    assert await lock_a.__aenter__() is True
    # A's lock lapses (say A stalled past lock_ttl) and B takes over
    await raw_redis.delete(LOCK)
    async with replica_b.exchange_lock("okta", "_a1b2c3") as owned_b:
        assert owned_b
        b_token = await raw_redis.get(LOCK)
        # A finishes while B still exchanges: A's release must leave B's lock alone
        await lock_a.__aexit__(None, None, None)
        assert await raw_redis.get(LOCK) == b_token
    # B's own release removes it
    assert await raw_redis.exists(LOCK) == 0


async def test_outer_release_does_not_delete_a_foreign_lock(
    make_store: StoreFactory, raw_redis: aioredis.Redis
) -> None:
    store = make_store()
    async with store.exchange_lock("okta", "_a1b2c3") as owned:
        assert owned
        await raw_redis.set(LOCK, b"someone-else")
    assert await raw_redis.get(LOCK) == b"someone-else"


async def test_lock_is_renewed_while_a_long_exchange_runs(
    make_store: StoreFactory,
    settings_for: Callable[..., RedisSettings],
    raw_redis: aioredis.Redis,
) -> None:
    # Renewal every lock_ttl/3 = 0.4 s leaves 0.8 s of slack per renewal even on a loaded
    # machine; each Redis call has a 2 s budget so a slow one is not taken for a dead store.
    settings = settings_for(lock_ttl=1.2, timeout=2)
    replica_a, replica_b = make_store(settings), make_store(settings)
    async with replica_a.exchange_lock("okta", "_a1b2c3") as owned:
        assert owned
        # an exchange three lock lifetimes long: without renewal B would get in
        for _ in range(6):
            await asyncio.sleep(0.6)
            async with replica_b.exchange_lock("okta", "_a1b2c3") as owned_b:
                assert owned_b is False
            assert await raw_redis.pttl(LOCK) > 0
    assert await raw_redis.exists(LOCK) == 0


async def test_unrenewed_lock_expires_so_a_crashed_owner_blocks_nobody(
    make_store: StoreFactory,
    settings_for: Callable[..., RedisSettings],
    raw_redis: aioredis.Redis,
) -> None:
    # a replica that died mid-exchange: its lock is a bare SET NX PX that nobody renews
    await raw_redis.set(LOCK, b"dead-replica", nx=True, px=200)
    store = make_store(settings_for(lock_ttl=0.2))
    async with store.exchange_lock("okta", "_a1b2c3") as owned:
        assert owned is False
    for _ in range(100):  # bounded: at most ~5 s
        if not await raw_redis.exists(LOCK):
            break
        await asyncio.sleep(0.05)
    async with store.exchange_lock("okta", "_a1b2c3") as owned:
        assert owned is True


async def test_cancelled_owner_still_releases(
    make_store: StoreFactory, raw_redis: aioredis.Redis
) -> None:
    store = make_store()
    holding = asyncio.Event()

    async def exchange() -> None:
        async with store.exchange_lock("okta", "_a1b2c3") as owned:
            assert owned
            holding.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(exchange())
    async with asyncio.timeout(5):
        await holding.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await raw_redis.exists(LOCK) == 0
