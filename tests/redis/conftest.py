"""Fixtures for the Redis store tests: a real redis-server per test on a free loopback port.

The server runner itself lives in ``gateway.devkit.redis_server`` so the multi-replica
gateway tests and the benchmarks can drive the same thing.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.cache.entry import CachedToken
from gateway.cache.redis import RedisTokenStore
from gateway.config import RedisSettings
from gateway.devkit.redis_server import RedisServer, redis_server_binary
from gateway.values import Token

KEY_1 = "first-test-secret-0123456789abcdef"
KEY_2 = "second-test-secret-fedcba9876543210"


class FakeClock:
    """A monotonic clock the test moves by hand (for the back-off window)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (make system-deps)")
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
async def raw_redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A plain client on the same server, to look at and tamper with what the store wrote."""
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def settings_for(redis_server: RedisServer) -> Callable[..., RedisSettings]:
    def make(**overrides: Any) -> RedisSettings:
        values: dict[str, Any] = {
            "url": redis_server.url,
            "encryption_keys": {"k1": KEY_1},
            "active_key": "k1",
            "timeout": 0.5,
            "lock_ttl": 5,
        }
        values.update(overrides)
        return RedisSettings.model_validate(values)

    return make


@pytest.fixture
async def make_store(
    settings_for: Callable[..., RedisSettings],
) -> AsyncIterator[Callable[..., RedisTokenStore]]:
    """Build stores (one per replica) that are closed when the test ends."""
    stores: list[RedisTokenStore] = []

    def make(settings: RedisSettings | None = None, **kwargs: Any) -> RedisTokenStore:
        store = RedisTokenStore(settings or settings_for(), **kwargs)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


def make_entry(
    assertion_id: str = "_a1b2c3",
    *,
    cache_key: str = "okta",
    assertion: bytes = b"<saml:Assertion ID='_a1b2c3'/>",
    lifetime: float = 300,
    access_token: str = "at-secret-value",
) -> CachedToken:
    return CachedToken(
        cache_key=cache_key,
        assertion_id=assertion_id,
        digest=hashlib.sha256(assertion).digest(),
        token=Token(access_token=access_token, expires_in=lifetime, scope="read write"),
        expires_at=time.time() + lifetime,
    )


@pytest.fixture
def entry_factory() -> Callable[..., CachedToken]:
    return make_entry
