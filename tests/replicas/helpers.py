"""Two (or more) real gateway processes in front of one real redis-server on loopback.

The fake authorization server, the upstream, the signing IdP and the process runner come
from the integration suite (importable as the ``integration`` package because ``tests/`` is
on ``sys.path``); this module adds the Redis server, configs that point at it, and a client
that reports which token the upstream received.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from integration.helpers import (  # the fixtures are re-exported for this folder
    AUDIENCE,
    Parts,
    Process,
    echoed_headers,
    gateway_yaml,
    idp,
    parts,
    processes,
    spawn_gateway,
)

from gateway.cache import TokenCache
from gateway.config import load_config
from gateway.devkit.idp import DemoIdP
from gateway.devkit.redis_server import RedisServer, redis_server_binary
from gateway.metrics import Metrics
from gateway.pipeline import Pipeline

__all__ = ["idp", "parts", "processes"]

KEYS = {
    "k1": "replica-test-secret-one-0123456789abcdef",
    "k2": "replica-test-secret-two-fedcba9876543210",
}
REDIS_PASSWORD = "replica-redis-password-0123456789"
# The upstream runs in the test's own event loop, next to 200 client requests: give its
# accept queue room on a shared 2-core machine (the defaults here are 1 s to connect).
ROUTE = {"timeouts": {"connect": 10, "read": 20, "total": 30}}


def cache_profile(config_path: Path) -> str:
    """The token-cache key of the one route in a gateway config: it names Redis entries."""
    config = load_config(config_path)
    runtime = Pipeline(config, TokenCache(config.cache), Metrics())
    return runtime.cache_key(config.routes[0])


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (make system-deps)")
    server = RedisServer(tmp_path / "redis", password=REDIS_PASSWORD)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
async def raw_redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A plain client on the same server, to look at and tamper with what gateways wrote."""
    client = aioredis.Redis.from_url(redis_server.url, password=REDIS_PASSWORD)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    # no per-host limit: a burst must reach both gateways at once
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    try:
        yield session
    finally:
        await session.close()


def digest_of(header: str) -> bytes:
    """What the cache binds an entry to: SHA-256 of the decoded assertion."""
    return hashlib.sha256(base64.b64decode(header)).digest()


def redis_cache(
    folder: Path,
    url: str,
    keys: Mapping[str, str],
    active: str,
    **settings: Any,
) -> dict[str, Any]:
    """A ``cache:`` section whose secrets are ``${file:…}`` references, as in production."""
    (folder / "redis-password").write_text(REDIS_PASSWORD)
    references = {}
    for key_id, secret in keys.items():
        (folder / f"redis-key-{key_id}").write_text(secret)
        references[key_id] = f"${{file:redis-key-{key_id}}}"
    redis: dict[str, Any] = {
        "url": url,
        "password": "${file:redis-password}",
        "encryption_keys": references,
        "active_key": active,
        "timeout": 0.5,
        "lock_ttl": 5,
        "lock_wait": 5,
    }
    redis.update(settings)
    return {"backend": "redis", "redis": redis}


@dataclass
class Cluster:
    """What a replica test drives: parts, Redis, and a way to start gateway processes."""

    parts: Parts
    idp: DemoIdP
    redis: RedisServer
    processes: list[Process]
    root: Path
    session: aiohttp.ClientSession

    def profile(self, name: str = "a") -> str:
        """The cache key the gateway ``name`` (already spawned) files its tokens under."""
        return cache_profile(self.root / name / "gateway.yaml")

    def spawn(
        self,
        name: str,
        *,
        keys: Mapping[str, str] | None = None,
        active: str = "k1",
        url: str | None = None,
        **settings: Any,
    ) -> Process:
        """Start one gateway process (its own folder and config) sharing this Redis (or the
        store at ``url``: a Sentinel setup)."""
        folder = self.root / name
        folder.mkdir(exist_ok=True)
        keys = keys or {"k1": KEYS["k1"]}
        cache = redis_cache(folder, url or self.redis.url, keys, active, **settings)
        path = gateway_yaml(
            folder,
            self.parts.auth.token_url,
            self.parts.upstream_url,
            self.idp,
            cache=cache,
            route=ROUTE,
        )
        process = spawn_gateway(path)
        self.processes.append(process)
        return process

    def assertion(self, subject: str = "alice@example.test", **kwargs: Any) -> str:
        """A freshly signed assertion, base64 as the header carries it."""
        raw = self.idp.issue(
            subject,
            audience=AUDIENCE,
            recipient=self.parts.auth.token_url,
            now=datetime.now(UTC),
            **kwargs,
        )
        return base64.b64encode(raw).decode()

    async def call(self, gateway: Process, assertion: str) -> tuple[int, str | None]:
        """(status, the bearer token the upstream received or None)."""
        async with self.session.get(
            f"{gateway.url}/echo", headers={"X-SAML-Assertion": assertion}
        ) as response:
            if response.status != 200:
                await response.read()
                return response.status, None
            seen = echoed_headers(await response.json())
        return 200, seen["authorization"].removeprefix("Bearer ")

    async def call_all(
        self, calls: list[tuple[Process, str]], timeout: float = 30
    ) -> list[tuple[int, str | None]]:
        """Send all at once; bounded so a stuck gateway fails the test instead of hanging it."""
        async with asyncio.timeout(timeout):
            return await asyncio.gather(*(self.call(g, a) for g, a in calls))

    async def readyz(self, gateway: Process) -> tuple[int, dict[str, Any]]:
        async with self.session.get(f"{gateway.admin}/readyz") as response:
            return response.status, await response.json()

    async def metric(self, gateway: Process, name: str) -> float | None:
        async with self.session.get(f"{gateway.admin}/metrics") as response:
            text = await response.text()
        for line in text.splitlines():
            key, _, value = line.rpartition(" ")
            if key == name:
                return float(value)
        return None


@pytest.fixture
def cluster(
    parts: Parts,
    idp: DemoIdP,
    redis_server: RedisServer,
    processes: list[Process],
    tmp_path: Path,
    client: aiohttp.ClientSession,
) -> Cluster:
    return Cluster(parts, idp, redis_server, processes, tmp_path, client)


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> bool:
    """Poll ``check`` until it holds or ``seconds`` pass (bounded; no timing asserted)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        if await check():
            return True
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.1)
