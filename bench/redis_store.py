"""The cost of the Redis tier: an L2 hit, a write, and a dead store, on loopback.

Starts a throwaway redis-server on a free loopback port, then times (per call, median and
p99 over a few thousand sequential calls):

- raw GET: redis-py's own round trip for the same blob (the floor we build on);
- store.get on a hit: round trip + AES-GCM open + JSON decode (the L2-hit cost);
- store.put: seal + SET PX;
- open only: the crypto and decoding part of a hit, without Redis;
- store.get with Redis dead, inside the back-off window (should cost next to nothing).

Bounded: well under 60 s on a shared 2-core machine.

    .venv/bin/python bench/redis_store.py
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis.asyncio as aioredis

from gateway.cache.entry import CachedToken
from gateway.cache.redis import RedisTokenStore, entry_name
from gateway.config import RedisSettings
from gateway.devkit.redis_server import RedisServer, redis_server_binary
from gateway.values import Token

CALLS = 3000
WARMUP = 200


async def timed(work: Callable[[], Awaitable[object]], calls: int = CALLS) -> list[float]:
    for _ in range(WARMUP):
        await work()
    samples = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        await work()
        samples.append((time.perf_counter_ns() - start) / 1000)
    return samples


def report(name: str, samples: list[float]) -> float:
    median = statistics.median(samples)
    p99 = statistics.quantiles(samples, n=100)[98]
    print(f"{name:<34} median {median:8.1f} µs   p99 {p99:8.1f} µs")
    return median


async def main() -> int:
    if redis_server_binary() is None:
        print("redis-server is not installed (make system-deps)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(Path(directory) / "redis")
        server.start()
        try:
            return await measure(server)
        finally:
            server.kill()


async def measure(server: RedisServer) -> int:
    settings = RedisSettings.model_validate(
        {
            "url": server.url,
            "encryption_keys": {"bench": "bench-secret-0123456789abcdef0123"},
            "active_key": "bench",
        }
    )
    store = RedisTokenStore(settings)
    # a realistic JWT-sized access token (~900 bytes)
    entry = CachedToken(
        cache_key="okta",
        assertion_id="_" + "a1" * 20,
        digest=hashlib.sha256(b"assertion").digest(),
        token=Token(access_token="x" * 900, expires_in=3600, scope="openid profile api"),
        expires_at=time.time() + 3600,
    )
    raw = aioredis.Redis.from_url(server.url)
    try:
        await store.put(entry)
        name = entry_name(settings.key_prefix, entry.cache_key, entry.assertion_id)
        blob = await raw.get(name)
        print(f"redis-server on loopback, {CALLS} sequential calls each, entry {len(blob)} bytes")
        floor = report("raw redis-py GET", await timed(lambda: raw.get(name)))
        hit = report(
            "store.get (L2 hit)",
            await timed(lambda: store.get(entry.cache_key, entry.assertion_id)),
        )
        report("store.put", await timed(lambda: store.put(entry)))

        async def open_only() -> object:
            return store._sealer.open(name, blob)

        report("open only (AES-GCM + JSON)", await timed(open_only))
        print(f"L2 hit / raw GET: {hit / floor:.2f}x")

        server.kill()
        await store.get(entry.cache_key, entry.assertion_id)  # notices; starts the back-off
        report(
            "store.get, Redis dead (back-off)",
            await timed(lambda: store.get(entry.cache_key, entry.assertion_id)),
        )
    finally:
        await raw.aclose()
        await store.close()
    return 0


if __name__ == "__main__":
    logging.basicConfig(format="  (log) %(name)s: %(message)s", stream=sys.stdout)
    sys.exit(asyncio.run(main()))
