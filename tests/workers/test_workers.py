"""``workers: 4`` without Redis: one token cache, one exchange lock and one /metrics view for
the whole host. Every request is its own connection, so the kernel spreads them over the
workers; the tests check they did, or they could not fail."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import sqlite3
import stat
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway.devkit.redis_server import RedisServer, redis_server_binary

from .helpers import WORKERS, Host, json_lines, metric, until


def served_by(lines: list[dict[str, object]]) -> collections.Counter[object]:
    """How many access lines each worker wrote."""
    return collections.Counter(
        line.get("worker") for line in lines if line.get("logger") == "gateway.access"
    )


async def test_a_burst_of_one_assertion_costs_one_exchange_and_metrics_add_up(
    host: Host,
) -> None:
    gateway = await host.start("--log-format", "json")
    assertion = host.assertion()
    statuses = await host.call_all(gateway, [assertion] * 200)
    assert statuses == [200] * 200
    assert host.auth.calls == 1
    assert host.auth.refusals == []
    assert await until(lambda: sum(served_by(json_lines(gateway)).values()) == 200)
    workers = served_by(json_lines(gateway))
    assert set(workers) <= set(range(1, WORKERS + 1))
    assert len(workers) >= 2, workers  # the burst really was split over workers
    # Each scrape is a new connection too, so several workers answer: every one of them
    # reports the whole host.
    for _ in range(8):
        text = await host.scrape(gateway)
        assert metric(text, "gateway_requests_total", route="api", status="200") == 200
        assert metric(text, "gateway_exchanges_total", server="as", outcome="ok") == 1


async def test_fifty_assertions_eight_requests_each_cost_fifty_exchanges(host: Host) -> None:
    gateway = await host.start()
    assertions = [host.assertion(f"user{i}@example.test") for i in range(50)]
    calls = [a for a in assertions for _ in range(8)]
    statuses = await host.call_all(gateway, calls[::2] + calls[1::2])
    assert statuses == [200] * 400
    assert host.auth.calls == 50
    assert sorted(host.auth.assertion_ids) == sorted(set(host.auth.assertion_ids))
    text = await host.scrape(gateway)
    assert metric(text, "gateway_requests_total", route="api", status="200") == 400
    # The cache's own counters reach the shared files within a second of each worker.
    for _ in range(50):  # bounded: ~10 s
        page = await host.scrape(gateway)
        looked_up = sum(
            metric(page, name) or 0
            for name in ("gateway_cache_hits_total", "gateway_cache_misses_total")
        )
        if looked_up == 400:
            break
        await asyncio.sleep(0.2)
    assert looked_up == 400


async def test_a_one_time_use_server_never_sees_an_id_twice(host: Host) -> None:
    gateway = await host.start("--log-format", "text")
    assertions = [host.assertion(f"once{i}@example.test") for i in range(10)]
    for _ in range(2):  # waves: cold, then from the workers' memory or the host store
        statuses = await host.call_all(gateway, [a for a in assertions for _ in range(12)])
        assert statuses == [200] * 120
    assert host.auth.refusals == []
    assert host.auth.calls == 10

    def access_lines() -> list[str]:
        return [line for line in gateway.logs().splitlines() if " gateway.access: " in line]

    assert await until(lambda: len(access_lines()) == 240)  # written after each answer
    access = access_lines()
    named = {line.rsplit(" worker=", 1)[1].split()[0] for line in access if " worker=" in line}
    assert len([line for line in access if " worker=" in line]) == 240
    assert named <= {str(n) for n in range(1, WORKERS + 1)} and len(named) >= 2


async def test_the_runtime_folder_is_private_and_removed_at_exit(host: Host) -> None:
    gateway = await host.start(workers=2)
    folders = list((host.folder / "run").iterdir())
    assert len(folders) == 1
    runtime = folders[0]
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
    assert (runtime / "tokens.sqlite3").is_file()
    assertion = host.assertion("private@example.test")
    assert await host.call_all(gateway, [assertion]) == [200]
    token, assertion_id = host.auth.issued[0], host.auth.assertion_ids[0]
    with contextlib.closing(sqlite3.connect(runtime / "tokens.sqlite3")) as db:
        (rows,) = db.execute("SELECT count(*) FROM tokens").fetchone()
    assert rows >= 1  # the token was stored, sealed
    stored = b"".join(p.read_bytes() for p in runtime.iterdir() if p.name.startswith("tokens"))
    assert token.encode() not in stored and assertion_id.encode() not in stored
    gateway.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(gateway.proc.wait, 15) == 0
    assert not runtime.exists()


async def test_with_redis_the_workers_use_it_and_make_no_store(host: Host, tmp_path: Path) -> None:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (make system-deps)")
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        cache = {
            "backend": "redis",
            "redis": {
                "url": redis.url,
                "encryption_keys": {"k1": "workers-test-secret-0123456789abcdef"},
                "active_key": "k1",
            },
        }
        gateway = await host.start(cache=cache, workers=2)
        (runtime,) = (host.folder / "run").iterdir()
        assert not (runtime / "tokens.sqlite3").exists()
        assertion = host.assertion("redis@example.test")
        assert await host.call_all(gateway, [assertion] * 40) == [200] * 40
        assert host.auth.calls == 1
        client = aioredis.Redis.from_url(redis.url)
        try:
            assert [key async for key in client.scan_iter(match=b"samlgw:t:*")]  # it went there
        finally:
            await client.aclose()
    finally:
        redis.kill()
