"""A slow or dead Redis costs requests nothing, is logged once, and is recovered from.

The back-off clock is a fake one moved by hand, so nothing here depends on timing; the
``asyncio.timeout`` blocks only turn a hang into a failure.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.cache.entry import CachedToken
from gateway.cache.redis import RedisTokenStore
from gateway.config import RedisSettings
from gateway.devkit.redis_server import RedisServer, free_port

StoreFactory = Callable[..., RedisTokenStore]
EntryFactory = Callable[..., CachedToken]
HANG_GUARD = 10  # seconds; a hang fails the test instead of stalling the suite


def state_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "gateway.cache.redis" and "redis store is" in r.getMessage()
    ]


async def every_call_is_a_miss(store: RedisTokenStore, entry: CachedToken) -> None:
    assert await store.get(entry.cache_key, entry.assertion_id) is None
    await store.put(entry)
    await store.delete(entry.cache_key, entry.assertion_id)
    async with store.exchange_lock(entry.cache_key, entry.assertion_id) as owned:
        assert owned is True  # nobody can deliver through a dead store: go at once
    assert await store.ping() is False


async def connections_received(raw: aioredis.Redis) -> int:
    stats: dict[str, Any] = await raw.info("stats")
    return int(stats["total_connections_received"])


async def test_killed_redis_reads_as_empty_logs_once_and_recovers(
    make_store: StoreFactory,
    entry_factory: EntryFactory,
    redis_server: RedisServer,
    fake_clock: Any,  # conftest.FakeClock
    caplog: pytest.LogCaptureFixture,
) -> None:
    states: list[bool] = []
    store = make_store(on_state=states.append, clock=fake_clock)
    entry = entry_factory()
    caplog.set_level(logging.INFO, logger="gateway.cache.redis")
    async with asyncio.timeout(HANG_GUARD):
        await store.put(entry)
        assert store.healthy and states == [True]

        redis_server.kill()
        for _ in range(5):
            await every_call_is_a_miss(store, entry)
            fake_clock.advance(1.5)  # past the window: re-probes
        assert not store.healthy
        assert states == [True, False]

        redis_server.start()  # same port, empty (no persistence)
        fake_clock.advance(1.5)
        await store.put(entry)
        assert await store.get(entry.cache_key, entry.assertion_id) == entry
        assert store.healthy
    assert states == [True, False, True]
    lines = state_lines(caplog)
    assert len(lines) == 3, lines
    assert lines[0] == "redis store is up"
    assert lines[1].startswith("redis store is down (get: ")
    assert lines[2] == "redis store is up"


async def test_inside_the_backoff_window_calls_do_not_touch_redis(
    make_store: StoreFactory,
    entry_factory: EntryFactory,
    redis_server: RedisServer,
    fake_clock: Any,  # conftest.FakeClock
) -> None:
    store = make_store(clock=fake_clock, retry_interval=1.0)
    entry = entry_factory()
    async with asyncio.timeout(HANG_GUARD):
        redis_server.kill()
        assert await store.get(entry.cache_key, entry.assertion_id) is None
        redis_server.start()
        async with aioredis.Redis.from_url(redis_server.url) as raw:
            before = await connections_received(raw)
            fake_clock.advance(0.04)  # the first retry is 0.05 s after the failure
            for _ in range(20):
                await store.put(entry)
                assert await store.get(entry.cache_key, entry.assertion_id) is None
            assert await connections_received(raw) == before
            assert await raw.dbsize() == 0  # the puts were skipped, not queued
            fake_clock.advance(0.02)
            await store.put(entry)
            assert await store.get(entry.cache_key, entry.assertion_id) == entry
            assert await connections_received(raw) > before


async def test_one_caller_probes_while_the_others_return_at_once(
    make_store: StoreFactory,
    entry_factory: EntryFactory,
    redis_server: RedisServer,
    fake_clock: Any,  # conftest.FakeClock
) -> None:
    store = make_store(clock=fake_clock)
    entry = entry_factory()
    await store.put(entry)
    async with asyncio.timeout(HANG_GUARD), aioredis.Redis.from_url(redis_server.url) as raw:
        before = await gets_processed(raw) + await connections_received(raw)
        redis_server.pause()
        try:
            assert await store.get(entry.cache_key, entry.assertion_id) is None  # times out
            fake_clock.advance(1.5)
            results = await asyncio.gather(
                *(store.get(entry.cache_key, entry.assertion_id) for _ in range(50))
            )
        finally:
            redis_server.resume()
        # what reached the server once it woke up: GETs sent and connections opened
        touched = await gets_processed(raw) + await connections_received(raw) - before
    assert results == [None] * 50
    # the first call and one probe (each with at most one client retry), not 51 calls
    assert 0 < touched <= 6, touched


async def gets_processed(raw: aioredis.Redis) -> int:
    stats: dict[str, Any] = await raw.info("commandstats")
    return int(stats.get("cmdstat_get", {}).get("calls", 0))


async def test_unresponsive_redis_is_cut_off_by_the_timeout(
    make_store: StoreFactory,
    settings_for: Callable[..., RedisSettings],
    entry_factory: EntryFactory,
    redis_server: RedisServer,
    fake_clock: Any,  # conftest.FakeClock
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = make_store(settings_for(timeout=0.2), clock=fake_clock)
    entry = entry_factory()
    await store.put(entry)
    caplog.set_level(logging.INFO, logger="gateway.cache.redis")
    async with asyncio.timeout(HANG_GUARD):
        redis_server.pause()  # accepts bytes, answers nothing: a stalled or overloaded Redis
        try:
            await every_call_is_a_miss(store, entry)
        finally:
            redis_server.resume()
        fake_clock.advance(1.5)
        # the server kept its data; the store picks up where it left off
        assert await store.get(entry.cache_key, entry.assertion_id) == entry
    lines = state_lines(caplog)
    assert (
        lines[0] == "redis store is down (get: timed out); serving without it, "
        "retrying in 0.05 s, backing off to every 1 s"
    )
    assert lines[1:] == ["redis store is up"]


async def test_redis_unreachable_from_the_start(
    make_store: StoreFactory,
    settings_for: Callable[..., RedisSettings],
    entry_factory: EntryFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    states: list[bool] = []
    settings = settings_for(url=f"redis://127.0.0.1:{free_port()}/0")
    store = make_store(settings, on_state=states.append)
    assert not store.healthy  # unknown is not ready
    caplog.set_level(logging.INFO, logger="gateway.cache.redis")
    async with asyncio.timeout(HANG_GUARD):
        await every_call_is_a_miss(store, entry_factory())
    assert states == [False]
    assert len(state_lines(caplog)) == 1


async def test_a_failing_observer_does_not_break_the_store(
    make_store: StoreFactory, entry_factory: EntryFactory, caplog: pytest.LogCaptureFixture
) -> None:
    def observer(up: bool) -> None:
        raise ValueError("metric backend broke")

    store = make_store(on_state=observer)
    entry = entry_factory()
    with caplog.at_level(logging.ERROR, logger="gateway.cache.redis"):
        await store.put(entry)
        assert await store.get(entry.cache_key, entry.assertion_id) == entry
    assert store.healthy
    assert [r.getMessage() for r in caplog.records] == ["redis store state observer failed"]


async def test_store_with_a_password(
    tmp_path: Any,
    settings_for: Callable[..., RedisSettings],
    entry_factory: EntryFactory,
) -> None:
    with RedisServer(tmp_path / "auth", password="correct-horse-battery") as server:
        good = RedisTokenStore(settings_for(url=server.url, password="correct-horse-battery"))
        bad = RedisTokenStore(settings_for(url=server.url, password="wrong-password-here"))
        try:
            entry = entry_factory()
            await good.put(entry)
            assert await good.get(entry.cache_key, entry.assertion_id) == entry
            assert await bad.get(entry.cache_key, entry.assertion_id) is None
            assert not bad.healthy
        finally:
            await good.close()
            await bad.close()


async def test_retries_back_off_from_50_ms_to_the_retry_interval(
    make_store: StoreFactory,
    settings_for: Callable[..., RedisSettings],
    entry_factory: EntryFactory,
    fake_clock: Any,  # conftest.FakeClock
) -> None:
    """After a connection error the first retry comes 50 ms later, each next one twice as
    late, up to ``retry_interval``; counted at a real socket that accepts and hangs up."""
    accepted = 0

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = make_store(settings_for(url=f"redis://127.0.0.1:{port}/0"), clock=fake_clock)
    entry = entry_factory()
    try:
        async with asyncio.timeout(HANG_GUARD):
            assert await store.get(entry.cache_key, entry.assertion_id) is None
            windows = []
            for expected in (0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0):
                before = accepted
                fake_clock.advance(expected - 0.01)
                assert await store.get(entry.cache_key, entry.assertion_id) is None
                inside = accepted - before
                fake_clock.advance(0.02)
                assert await store.get(entry.cache_key, entry.assertion_id) is None
                await asyncio.sleep(0)  # let the server count the connection
                windows.append((expected, inside, accepted - before > 0))
        assert windows == [(w, 0, True) for w in (0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0)]
        assert not store.healthy
    finally:
        server.close()
        await server.wait_closed()
