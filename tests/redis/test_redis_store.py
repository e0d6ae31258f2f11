"""The Redis store against a real redis-server: round trips, expiry, tampering, rotation."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr

from gateway.cache.entry import CachedToken, SharedStore
from gateway.cache.redis import RedisTokenStore, digest_name, entry_name
from gateway.config import RedisSettings
from gateway.errors import ConfigError

KEY_1 = "first-test-secret-0123456789abcdef"
KEY_2 = "second-test-secret-fedcba9876543210"

StoreFactory = Callable[..., RedisTokenStore]
EntryFactory = Callable[..., CachedToken]


async def only_key(raw: aioredis.Redis, pattern: bytes = b"samlgw:t:*") -> bytes:
    keys = [key async for key in raw.scan_iter(match=pattern)]
    assert len(keys) == 1, keys
    return keys[0]


async def test_satisfies_the_shared_store_protocol(make_store: StoreFactory) -> None:
    store: SharedStore = make_store()  # mypy would refuse a store that does not fit
    assert await store.get("okta", "_missing") is None


async def test_put_then_get_round_trips_every_field(
    make_store: StoreFactory, entry_factory: EntryFactory
) -> None:
    store = make_store()
    entry = entry_factory()
    await store.put(entry)
    assert await store.get(entry.cache_key, entry.assertion_id) == entry
    assert await store.get("other-key", entry.assertion_id) is None
    assert await store.get(entry.cache_key, "_other-id") is None
    assert store.healthy
    assert await store.ping()


async def test_delete_removes_the_entry(
    make_store: StoreFactory, entry_factory: EntryFactory
) -> None:
    store = make_store()
    entry = entry_factory()
    await store.put(entry)
    await store.delete(entry.cache_key, entry.assertion_id)
    assert await store.get(entry.cache_key, entry.assertion_id) is None


async def test_redis_sees_neither_token_nor_assertion_id(
    make_store: StoreFactory, entry_factory: EntryFactory, raw_redis: aioredis.Redis
) -> None:
    store = make_store()
    entry = entry_factory("_visible-id", access_token="at-plain-text-marker")
    await store.put(entry)
    key = await only_key(raw_redis)
    blob = await raw_redis.get(key)
    assert b"_visible-id" not in key and b"okta" not in key
    assert b"at-plain-text-marker" not in blob and b"_visible-id" not in blob
    assert key == entry_name("samlgw:", "okta", "_visible-id")


async def test_key_expires_with_the_token(
    make_store: StoreFactory, entry_factory: EntryFactory, raw_redis: aioredis.Redis
) -> None:
    store = make_store()
    await store.put(entry_factory(lifetime=120))
    ttl_ms = await raw_redis.pttl(await only_key(raw_redis))
    assert 110_000 < ttl_ms <= 120_000


async def test_already_expired_entry_is_not_written(
    make_store: StoreFactory, entry_factory: EntryFactory, raw_redis: aioredis.Redis
) -> None:
    store = make_store()
    await store.put(entry_factory(lifetime=-1))
    assert await raw_redis.dbsize() == 0


async def test_entry_past_expires_at_is_not_served(
    make_store: StoreFactory, entry_factory: EntryFactory
) -> None:
    entry = entry_factory(lifetime=60)
    await make_store().put(entry)
    # a replica whose wall clock is past expires_at (Redis has not expired the key yet)
    late = make_store(wall_clock=lambda: entry.expires_at + 1)
    assert await late.get(entry.cache_key, entry.assertion_id) is None


async def test_entry_for_another_assertion_is_returned_for_the_cache_to_refuse(
    make_store: StoreFactory, entry_factory: EntryFactory
) -> None:
    store = make_store()
    await store.put(entry_factory(assertion=b"<the assertion that was exchanged/>"))
    got = await store.get("okta", "_a1b2c3")
    assert got is not None
    assert got.digest == hashlib.sha256(b"<the assertion that was exchanged/>").digest()
    assert got.digest != hashlib.sha256(b"<a forged assertion reusing the ID/>").digest()


@pytest.mark.parametrize("position", [0, 1, 5, 20, -1])
async def test_any_flipped_byte_reads_as_a_miss(
    position: int,
    make_store: StoreFactory,
    entry_factory: EntryFactory,
    raw_redis: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = make_store()
    await store.put(entry_factory())
    key = await only_key(raw_redis)
    blob = bytearray(await raw_redis.get(key))
    blob[position] ^= 0x01
    await raw_redis.set(key, bytes(blob))
    with caplog.at_level(logging.WARNING, logger="gateway.cache.redis"):
        assert await store.get("okta", "_a1b2c3") is None
    assert caplog.records, "a rejected entry leaves a log line"
    assert all("at-secret-value" not in r.getMessage() for r in caplog.records)
    assert store.healthy  # a bad entry is not a store fault


async def test_entry_moved_to_another_key_reads_as_a_miss(
    make_store: StoreFactory, entry_factory: EntryFactory, raw_redis: aioredis.Redis
) -> None:
    store = make_store()
    await store.put(entry_factory("_victim"))
    blob = await raw_redis.get(entry_name("samlgw:", "okta", "_victim"))
    await raw_redis.set(entry_name("samlgw:", "okta", "_attacker"), blob)
    await raw_redis.set(entry_name("samlgw:", "salesforce", "_victim"), blob)
    assert await store.get("okta", "_attacker") is None
    assert await store.get("salesforce", "_victim") is None
    assert await store.get("okta", "_victim") is not None


@pytest.mark.parametrize(
    "garbage", [b"", b"\x01", b"not an entry at all", b"\x01\x02k1" + b"\0" * 40]
)
async def test_garbage_reads_as_a_miss(
    garbage: bytes, make_store: StoreFactory, raw_redis: aioredis.Redis
) -> None:
    store = make_store()
    await raw_redis.set(entry_name("samlgw:", "okta", "_a1b2c3"), garbage)
    assert await store.get("okta", "_a1b2c3") is None


async def test_changed_key_id_reads_as_a_miss(
    make_store: StoreFactory,
    settings_for: Callable[..., RedisSettings],
    entry_factory: EntryFactory,
    raw_redis: aioredis.Redis,
) -> None:
    # both IDs are known, and the secrets are equal: only the associated data catches it
    keys = {"k1": KEY_1, "k2": KEY_1}
    store = make_store(settings_for(encryption_keys=keys, active_key="k1"))
    await store.put(entry_factory())
    key = await only_key(raw_redis)
    blob = await raw_redis.get(key)
    assert blob[2:4] == b"k1"
    await raw_redis.set(key, blob[:2] + b"k2" + blob[4:])
    assert await store.get("okta", "_a1b2c3") is None


async def test_unknown_key_id_reads_as_a_miss_and_is_logged_once(
    make_store: StoreFactory,
    settings_for: Callable[..., RedisSettings],
    entry_factory: EntryFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer = make_store(settings_for(encryption_keys={"k2": KEY_2}, active_key="k2"))
    reader = make_store(settings_for(encryption_keys={"k1": KEY_1}, active_key="k1"))
    await writer.put(entry_factory())
    with caplog.at_level(logging.WARNING, logger="gateway.cache.redis"):
        for _ in range(3):
            assert await reader.get("okta", "_a1b2c3") is None
    assert [r.getMessage() for r in caplog.records] == [
        "redis entry under unknown encryption key id 'k2' ignored"
    ]


async def test_key_rotation_old_entries_still_read_new_ones_use_the_new_key(
    make_store: StoreFactory,
    settings_for: Callable[..., RedisSettings],
    entry_factory: EntryFactory,
    raw_redis: aioredis.Redis,
) -> None:
    before = make_store(settings_for(encryption_keys={"k1": KEY_1}, active_key="k1"))
    old = entry_factory("_old")
    await before.put(old)

    after = make_store(settings_for(encryption_keys={"k1": KEY_1, "k2": KEY_2}, active_key="k2"))
    assert await after.get("okta", "_old") == old
    new = entry_factory("_new")
    await after.put(new)
    blob = await raw_redis.get(entry_name("samlgw:", "okta", "_new"))
    assert blob[1:2] == b"\x02" and blob[2:4] == b"k2"
    assert await after.get("okta", "_new") == new
    # a replica not yet given k2 cannot read it (and treats it as a miss)
    assert await before.get("okta", "_new") is None
    # once k1 is retired, its entries are misses, not errors
    retired = make_store(settings_for(encryption_keys={"k2": KEY_2}, active_key="k2"))
    assert await retired.get("okta", "_old") is None
    assert await retired.get("okta", "_new") == new


async def test_two_replicas_share_entries(
    make_store: StoreFactory, entry_factory: EntryFactory
) -> None:
    replica_a, replica_b = make_store(), make_store()
    entry = entry_factory()
    await replica_a.put(entry)
    assert await replica_b.get("okta", "_a1b2c3") == entry
    await replica_b.delete("okta", "_a1b2c3")
    assert await replica_a.get("okta", "_a1b2c3") is None


async def test_key_prefix_separates_deployments(
    make_store: StoreFactory,
    settings_for: Callable[..., RedisSettings],
    entry_factory: EntryFactory,
) -> None:
    blue = make_store(settings_for(key_prefix="blue:"))
    green = make_store(settings_for(key_prefix="green:"))
    await blue.put(entry_factory())
    assert await green.get("okta", "_a1b2c3") is None
    assert await blue.get("okta", "_a1b2c3") is not None


def test_short_secrets_are_refused_naming_the_key(
    settings_for: Callable[..., RedisSettings],
) -> None:
    # The config refuses such a key at load (tests/test_config_preflight.py); the store
    # refuses it too, for settings built without validation.
    weak = settings_for().model_copy(
        update={"encryption_keys": {"weak": SecretStr("short")}, "active_key": "weak"}
    )
    with pytest.raises(ConfigError, match=r"cache\.redis\.encryption_keys\.weak: secret is too"):
        RedisTokenStore(weak)


def test_repr_shows_no_secret(settings_for: Callable[..., RedisSettings]) -> None:
    settings = settings_for(password="redis-password-value")
    store = RedisTokenStore(settings)
    text = repr(store) + repr(store._sealer)
    assert KEY_1 not in text and "redis-password-value" not in text


async def test_the_copy_found_by_digest_opens_only_under_its_own_name(
    make_store: StoreFactory,
    entry_factory: EntryFactory,
    raw_redis: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = make_store()
    entry = entry_factory()
    other = entry_factory("_other-id", assertion=b"<saml:Assertion ID='_other-id'/>")
    await store.put(entry)
    await store.put(other)
    by_id = await raw_redis.get(entry_name("samlgw:", entry.cache_key, entry.assertion_id))
    by_digest = digest_name("samlgw:", other.cache_key, other.digest)
    assert await raw_redis.pttl(by_digest) > 0  # expires with the token
    # A copy moved under another digest's name (by someone with Redis access but no key)
    # fails authentication: a replica never serves a token for bytes it was not made for.
    await raw_redis.set(by_digest, by_id)
    with caplog.at_level(logging.WARNING, logger="gateway.cache.redis"):
        assert await store.find(other.cache_key, other.digest) is None
    assert "authentication failed" in caplog.text
    assert await store.find(entry.cache_key, entry.digest) == entry
