"""The ``SharedStore`` contract, run against every real store: the SQLite file the workers
of one host share and a real redis-server. Each test builds two stores on one backend, as
two workers (or replicas) would."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.cache import CachedToken, TokenCache
from gateway.cache.entry import SharedStore
from gateway.cache.redis import RedisTokenStore, lock_name
from gateway.cache.sqlite import SqliteTokenStore, create_database, new_secret
from gateway.config import RedisSettings
from gateway.devkit.redis_server import RedisServer, free_port, redis_server_binary
from gateway.values import Token

from .helpers import Exchange, assertion, settings

REDIS_KEY = "contract-test-secret-0123456789abcdef"


@dataclass
class Backend:
    """One store backend: ``make`` builds a store on it, ``dead_lock`` plants the lock of a
    holder that died, ``down`` builds a store whose backend does not answer."""

    kind: str
    make: Callable[..., SharedStore]
    dead_lock: Callable[[str, str, float], Awaitable[None]]
    down: Callable[[], SharedStore]


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


def _redis_settings(url: str, lock_ttl: float, timeout: float = 0.5) -> RedisSettings:
    return RedisSettings.model_validate(
        {
            "url": url,
            "encryption_keys": {"k1": REDIS_KEY},
            "active_key": "k1",
            "timeout": timeout,
            "lock_ttl": lock_ttl,
        }
    )


@pytest.fixture(params=["sqlite", "redis"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    stores: list[SharedStore] = []

    def kept(store: SharedStore) -> SharedStore:
        stores.append(store)
        return store

    if request.param == "sqlite":
        database, secret = create_database(tmp_path), new_secret()

        def make_sqlite(lock_ttl: float = 5, **kwargs: Any) -> SharedStore:
            kwargs.setdefault("lock_wait", 0.3)
            return kept(SqliteTokenStore(database, secret, lock_ttl=lock_ttl, **kwargs))

        async def dead_sqlite_lock(cache_key: str, assertion_id: str, ttl: float) -> None:
            with sqlite3.connect(database) as db:
                db.execute(
                    "INSERT INTO locks VALUES (?, ?, ?)",
                    (lock_name("", cache_key, assertion_id), b"dead", time.monotonic() + ttl),
                )

        yield Backend(
            "sqlite",
            make_sqlite,
            dead_sqlite_lock,
            lambda: kept(SqliteTokenStore(tmp_path / "gone" / "tokens.sqlite3", secret)),
        )
    else:
        server = request.getfixturevalue("redis_server")

        def make_redis(lock_ttl: float = 5, timeout: float = 0.5, **kwargs: Any) -> SharedStore:
            kwargs.pop("lock_wait", None)  # Redis answers "taken" at once
            settings = _redis_settings(server.url, lock_ttl, timeout)
            return kept(RedisTokenStore(settings, **kwargs))

        async def dead_redis_lock(cache_key: str, assertion_id: str, ttl: float) -> None:
            store = RedisTokenStore(_redis_settings(server.url, 5))
            name = lock_name("samlgw:", cache_key, assertion_id)
            await store._client.set(name, b"dead", px=int(ttl * 1000))
            await store.close()

        yield Backend(
            "redis",
            make_redis,
            dead_redis_lock,
            lambda: kept(RedisTokenStore(_redis_settings(f"redis://127.0.0.1:{free_port()}/0", 5))),
        )
    for store in stores:
        await store.close()


def entry(
    assertion_id: str = "_contract",
    *,
    cache_key: str = "okta",
    body: bytes = b"<saml:Assertion ID='_contract'/>",
    lifetime: float = 300,
    access_token: str = "at-contract",
) -> CachedToken:
    return CachedToken(
        cache_key=cache_key,
        assertion_id=assertion_id,
        digest=hashlib.sha256(body).digest(),
        token=Token(access_token=access_token, expires_in=lifetime, scope="read"),
        expires_at=time.time() + lifetime,
        issuer="https://idp.test",
    )


# --- entries ---------------------------------------------------------------------------------


async def test_an_entry_put_by_one_store_is_read_by_another(backend: Backend) -> None:
    writer, reader = backend.make(), backend.make()
    stored = entry()
    await writer.put(stored)
    assert await reader.get("okta", "_contract") == stored
    assert await reader.get("other", "_contract") is None
    assert await reader.get("okta", "_other") is None


async def test_delete_removes_the_entry_for_every_store(backend: Backend) -> None:
    a, b = backend.make(), backend.make()
    await a.put(entry())
    await b.delete("okta", "_contract")
    assert await a.get("okta", "_contract") is None


async def test_an_entry_is_never_served_past_its_expiry(backend: Backend) -> None:
    await backend.make().put(entry(lifetime=300))
    later = backend.make(wall_clock=lambda: time.time() + 301)
    assert await later.get("okta", "_contract") is None
    await backend.make().put(entry("_dead", lifetime=-1))
    assert await backend.make().get("okta", "_dead") is None


async def test_a_token_is_found_by_the_digest_of_its_bytes_by_another_store(
    backend: Backend,
) -> None:
    writer, reader = backend.make(), backend.make()
    stored = entry(body=b"<the exchanged bytes/>")
    await writer.put(stored)
    assert await reader.find("okta", stored.digest) == stored
    assert await reader.find("other", stored.digest) is None  # another cache key
    assert await reader.find("okta", hashlib.sha256(b"<other bytes/>").digest()) is None
    later = backend.make(wall_clock=lambda: time.time() + 301)
    assert await later.find("okta", stored.digest) is None  # expired


async def test_delete_with_the_digest_removes_both_copies(backend: Backend) -> None:
    a, b = backend.make(), backend.make()
    stored = entry()
    await a.put(stored)
    await b.delete("okta", "_contract")
    assert await a.find("okta", stored.digest) == stored  # by ID only: the copy stays
    await a.put(stored)
    await b.delete("okta", "_contract", stored.digest)
    assert await a.get("okta", "_contract") is None
    assert await a.find("okta", stored.digest) is None


async def test_an_entry_without_a_digest_is_kept_by_id_only(backend: Backend) -> None:
    store = backend.make()
    marker = dataclasses.replace(entry(), digest=b"")
    await store.put(marker)
    assert await store.get("okta", "_contract") == marker
    assert await store.find("okta", b"") is None


async def test_an_entry_comes_back_with_its_digest_for_the_cache_to_compare(
    backend: Backend,
) -> None:
    store = backend.make()
    await store.put(entry(body=b"<the one that was exchanged/>"))
    got = await store.get("okta", "_contract")
    assert got is not None
    assert got.digest == hashlib.sha256(b"<the one that was exchanged/>").digest()


async def test_a_later_put_replaces_the_entry(backend: Backend) -> None:
    a, b = backend.make(), backend.make()
    await a.put(entry(access_token="first"))
    await b.put(entry(access_token="second"))
    got = await a.get("okta", "_contract")
    assert got is not None and got.token.access_token == "second"


# --- the exchange lock -----------------------------------------------------------------------


async def test_the_lock_is_exclusive_between_two_stores(backend: Backend) -> None:
    a, b = backend.make(), backend.make()
    async with a.exchange_lock("okta", "_contract") as owned_a:
        assert owned_a is True
        async with b.exchange_lock("okta", "_contract") as owned_b:
            assert owned_b is False
        async with b.exchange_lock("okta", "_other") as owned_other:
            assert owned_other is True  # another assertion is another lock
        async with b.exchange_lock("other", "_contract") as owned_key:
            assert owned_key is True  # and so is another cache key
    async with b.exchange_lock("okta", "_contract") as owned_b:
        assert owned_b is True


async def test_only_one_of_many_concurrent_takers_owns_the_lock(backend: Backend) -> None:
    stores = [backend.make() for _ in range(4)]
    inside = asyncio.Event()

    async def take(store: SharedStore) -> bool:
        async with store.exchange_lock("okta", "_contract") as owned:
            if owned:
                await inside.wait()  # hold it until every other taker has answered
            return owned

    tasks = [asyncio.create_task(take(s)) for s in stores for _ in range(3)]
    done: set[asyncio.Task[bool]] = set()
    async with asyncio.timeout(10):
        while len(done) < len(tasks) - 1:
            done = {t for t in tasks if t.done()}
            await asyncio.sleep(0.02)
        inside.set()
        results = await asyncio.gather(*tasks)
    assert sorted(results) == [False] * (len(tasks) - 1) + [True]


async def test_the_lock_is_released_when_the_exchange_fails(backend: Backend) -> None:
    a, b = backend.make(), backend.make()
    with pytest.raises(RuntimeError, match="exchange failed"):
        async with a.exchange_lock("okta", "_contract") as owned:
            assert owned
            raise RuntimeError("exchange failed")
    async with b.exchange_lock("okta", "_contract") as owned_b:
        assert owned_b is True


async def test_a_cancelled_owner_still_releases(backend: Backend) -> None:
    a, b = backend.make(), backend.make()
    holding = asyncio.Event()

    async def exchange() -> None:
        async with a.exchange_lock("okta", "_contract") as owned:
            assert owned
            holding.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(exchange())
    async with asyncio.timeout(5):
        await holding.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with b.exchange_lock("okta", "_contract") as owned_b:
        assert owned_b is True


async def test_the_lock_is_renewed_while_a_long_exchange_runs(backend: Backend) -> None:
    # renewal every 0.4 s leaves 0.8 s of slack each time, even on a loaded machine
    a, b = backend.make(lock_ttl=1.2, timeout=2), backend.make(lock_ttl=1.2, timeout=2)
    async with a.exchange_lock("okta", "_contract") as owned:
        assert owned
        for _ in range(4):  # 2.4 s: twice the lock's lifetime
            await asyncio.sleep(0.6)
            async with b.exchange_lock("okta", "_contract") as owned_b:
                assert owned_b is False


async def test_the_lock_of_a_holder_that_died_expires(backend: Backend) -> None:
    await backend.dead_lock("okta", "_contract", 0.3)
    store = backend.make()
    async with store.exchange_lock("okta", "_contract") as owned:
        assert owned is False
    for _ in range(50):  # bounded: at most ~5 s
        async with store.exchange_lock("okta", "_contract") as owned:
            if owned:
                break
        await asyncio.sleep(0.1)
    assert owned is True


# --- assertion-ID bindings -------------------------------------------------------------------


async def test_the_first_binding_of_an_id_wins_on_every_store(backend: Backend) -> None:
    a, b = backend.make(), backend.make()
    until = time.time() + 60
    assert await a.bind_id("okta", "_contract", b"first", until) is None
    assert await b.bind_id("okta", "_contract", b"first", until) == b"first"
    assert await b.bind_id("okta", "_contract", b"second", until) == b"first"
    assert await a.bind_id("okta", "_other", b"second", until) is None
    assert await a.bind_id("other", "_contract", b"second", until) is None


async def test_a_binding_ends_at_its_time(backend: Backend) -> None:
    a, b = backend.make(), backend.make()
    assert await a.bind_id("okta", "_contract", b"first", time.time() + 0.3) is None
    await asyncio.sleep(0.5)
    assert await b.bind_id("okta", "_contract", b"second", time.time() + 60) is None
    assert await a.bind_id("okta", "_contract", b"first", time.time() + 60) == b"second"
    assert await a.bind_id("okta", "_past", b"x", time.time() - 1) is None
    assert await a.bind_id("okta", "_past", b"y", time.time() + 60) is None  # bound nothing


async def test_concurrent_bindings_have_exactly_one_winner(backend: Backend) -> None:
    stores = [backend.make() for _ in range(3)]
    until = time.time() + 60
    fingerprints = [secrets.token_bytes(32) for _ in range(12)]
    async with asyncio.timeout(10):
        answers = await asyncio.gather(
            *(
                stores[i % 3].bind_id("okta", "_contract", fingerprint, until)
                for i, fingerprint in enumerate(fingerprints)
            )
        )
    winners = [fp for fp, answer in zip(fingerprints, answers, strict=True) if answer is None]
    assert len(winners) == 1
    assert all(answer == winners[0] for answer in answers if answer is not None)


# --- a store that does not answer ------------------------------------------------------------


async def test_a_dead_store_behaves_like_an_empty_one(backend: Backend) -> None:
    store = backend.down()
    async with asyncio.timeout(5):
        await store.put(entry())
        assert await store.get("okta", "_contract") is None
        await store.delete("okta", "_contract")
        async with store.exchange_lock("okta", "_contract") as owned:
            assert owned is True  # nobody can deliver through it: go yourself
        assert await store.bind_id("okta", "_contract", b"f", time.time() + 60) is None


# --- two token caches (two workers) on one store ---------------------------------------------


async def test_two_caches_on_one_store_exchange_a_burst_once(backend: Backend) -> None:
    exchange = Exchange()
    exchange.gate = asyncio.Event()
    caches = [
        TokenCache(settings(), shared=backend.make(lock_wait=5), shared_wait=5) for _ in (1, 2)
    ]
    presented = assertion(not_on_or_after=time.time() + 3600)
    tasks = [
        asyncio.create_task(caches[i % 2].obtain("okta", presented, exchange)) for i in range(20)
    ]
    async with asyncio.timeout(10):
        await exchange.started.wait()
        await asyncio.sleep(0.2)  # both caches are waiting: one on the exchange, one on it
        exchange.gate.set()
        entries = await asyncio.gather(*tasks)
    assert len(exchange.calls) == 1
    assert {e.token.access_token for e in entries} == {"tok-1"}
