"""``bind_id`` against a real redis-server: first binder wins, atomically, sealed, bounded."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable

import redis.asyncio as aioredis

from gateway.cache.redis import RedisTokenStore, binding_name
from gateway.config import RedisSettings
from gateway.devkit.redis_server import free_port

StoreFactory = Callable[..., RedisTokenStore]

SIGNED = hashlib.sha256(b"what the IdP signed").digest()
OTHER = hashlib.sha256(b"another signed assertion with the same ID").digest()


async def test_first_binding_wins_and_every_later_call_learns_it(
    make_store: StoreFactory,
) -> None:
    replica_a, replica_b = make_store(), make_store()
    until = time.time() + 60
    assert await replica_a.bind_id("okta", "_id1", SIGNED, until) is None  # recorded
    assert await replica_a.bind_id("okta", "_id1", SIGNED, until) == SIGNED
    assert await replica_b.bind_id("okta", "_id1", OTHER, until) == SIGNED  # a replay
    assert await replica_b.bind_id("okta", "_id2", OTHER, until) is None  # another ID
    assert await replica_b.bind_id("salesforce", "_id1", OTHER, until) is None  # cache key


async def test_concurrent_binders_agree_on_one_winner(make_store: StoreFactory) -> None:
    stores = [make_store() for _ in range(8)]
    until = time.time() + 60
    fingerprints = [hashlib.sha256(bytes([n])).digest() for n in range(8)]
    answers = await asyncio.gather(
        *(s.bind_id("okta", "_race", f, until) for s, f in zip(stores, fingerprints, strict=True))
    )
    winners = [f for f, answer in zip(fingerprints, answers, strict=True) if answer is None]
    assert len(winners) == 1
    assert all(answer == winners[0] for answer in answers if answer is not None)


async def test_binding_lapses_at_until(make_store: StoreFactory, raw_redis: aioredis.Redis) -> None:
    store = make_store()
    assert await store.bind_id("okta", "_short", SIGNED, time.time() + 60) is None
    ttl = await raw_redis.pttl(binding_name("samlgw:", "okta", "_short"))
    assert 55_000 < ttl <= 60_000
    # an instant already past binds nothing and writes nothing
    assert await store.bind_id("okta", "_past", SIGNED, time.time() - 1) is None
    assert not await raw_redis.exists(binding_name("samlgw:", "okta", "_past"))
    assert await store.bind_id("okta", "_lapse", SIGNED, time.time() + 0.2) is None
    for _ in range(100):  # bounded: at most ~5 s
        if not await raw_redis.exists(binding_name("samlgw:", "okta", "_lapse")):
            break
        await asyncio.sleep(0.05)
    assert await store.bind_id("okta", "_lapse", OTHER, time.time() + 60) is None


async def test_redis_sees_neither_the_id_nor_the_fingerprint(
    make_store: StoreFactory, raw_redis: aioredis.Redis
) -> None:
    store = make_store()
    await store.bind_id("okta", "_visible-id", SIGNED, time.time() + 60)
    keys = [key async for key in raw_redis.scan_iter(match=b"samlgw:b:*")]
    assert keys == [binding_name("samlgw:", "okta", "_visible-id")]
    assert b"_visible-id" not in keys[0] and b"okta" not in keys[0]
    blob = await raw_redis.get(keys[0])
    assert SIGNED not in blob and SIGNED.hex().encode() not in blob


async def test_a_tampered_binding_binds_nothing(
    make_store: StoreFactory, raw_redis: aioredis.Redis
) -> None:
    store = make_store()
    name = binding_name("samlgw:", "okta", "_t")
    await store.bind_id("okta", "_t", SIGNED, time.time() + 60)
    blob = bytearray(await raw_redis.get(name))
    blob[-1] ^= 0x01
    await raw_redis.set(name, bytes(blob), px=60_000)
    assert await store.bind_id("okta", "_t", OTHER, time.time() + 60) is None
    # and a binding copied under another ID's name does not open there either
    await store.bind_id("okta", "_source", SIGNED, time.time() + 60)
    copied = await raw_redis.get(binding_name("samlgw:", "okta", "_source"))
    await raw_redis.set(binding_name("samlgw:", "okta", "_target"), copied, px=60_000)
    assert await store.bind_id("okta", "_target", OTHER, time.time() + 60) is None


async def test_a_dead_store_binds_nothing_and_says_so_with_none(
    settings_for: Callable[..., RedisSettings], make_store: StoreFactory
) -> None:
    dead = make_store(settings_for(url=f"redis://127.0.0.1:{free_port()}/0", timeout=0.2))
    assert await dead.bind_id("okta", "_down", SIGNED, time.time() + 60) is None
    assert not dead.healthy
