"""How each Redis URL kind maps onto a redis-py asyncio client, and real Sentinel/Cluster runs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection

from gateway.cache.entry import CachedToken
from gateway.cache.redis import RedisTokenStore, connect_redis
from gateway.cache.redis.connect import parse_multi_host_url
from gateway.config import RedisSettings
from gateway.devkit.redis_server import (
    RedisServer,
    free_port,
    redis_server_binary,
    start_cluster,
    start_sentinel,
)
from gateway.errors import ConfigError

KEYS = {"k1": "first-test-secret-0123456789abcdef"}
EntryFactory = Callable[..., CachedToken]


def settings(url: str, **overrides: Any) -> RedisSettings:
    # allow_insecure: these tests map URLs onto clients, passwords to made-up hosts included.
    return RedisSettings.model_validate(
        {"url": url, "encryption_keys": KEYS, "active_key": "k1", "allow_insecure": True}
        | overrides
    )


def test_multi_host_url_is_taken_apart() -> None:
    parsed = parse_multi_host_url(
        "redis+sentinel://u:p%40ss@s1:26380,s2,[::1]:26381/mymaster/2", default_port=26379
    )
    assert parsed.hosts == (("s1", 26380), ("s2", 26379), ("::1", 26381))
    assert parsed.path == ("mymaster", "2")
    assert (parsed.username, parsed.password) == ("u", "p@ss")
    assert "p@ss" not in repr(parsed)


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://:hunter2-secret@s1,,s2/mymaster",
        "redis+sentinel://:hunter2-secret@s1:notaport/mymaster",
        "redis+sentinel://:hunter2-secret@s1:70000/mymaster",
    ],
)
def test_bad_multi_host_urls_name_the_key_and_hide_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_multi_host_url(url, default_port=26379)
    assert str(caught.value).startswith("cache.redis.url: ")
    assert "hunter2-secret" not in str(caught.value)


async def test_plain_url_with_password_from_settings() -> None:
    client = connect_redis(settings("redis://:in-url@127.0.0.1:7000/3", password="from-secret"))
    try:
        assert isinstance(client, Redis)
        kwargs = client.connection_pool.connection_kwargs
        assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("127.0.0.1", 7000, 3)
        assert kwargs["password"] == "from-secret"  # the secret reference wins
        assert kwargs["socket_timeout"] == 0.25
    finally:
        await client.aclose()


async def test_tls_url_uses_the_ca_file(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    client = connect_redis(settings("rediss://redis.internal:6380/0", ca_file=str(ca)))
    try:
        assert isinstance(client, Redis)
        assert client.connection_pool.connection_class is SSLConnection
        assert client.connection_pool.connection_kwargs["ssl_ca_certs"] == str(ca)
    finally:
        await client.aclose()


async def test_unix_socket_url() -> None:
    client = connect_redis(settings("unix:///run/redis/redis.sock?db=1"))
    try:
        assert isinstance(client, Redis)
        assert client.connection_pool.connection_class is UnixDomainSocketConnection
        assert client.connection_pool.connection_kwargs["path"] == "/run/redis/redis.sock"
    finally:
        await client.aclose()


async def test_sentinel_url_maps_onto_master_for() -> None:
    client = connect_redis(
        settings("redis+sentinel://s1:26380,s2/mymaster/4", password="master-secret")
    )
    try:
        assert isinstance(client, Redis)
        pool: Any = client.connection_pool
        assert pool.service_name == "mymaster"
        assert pool.connection_kwargs["db"] == 4
        assert pool.connection_kwargs["password"] == "master-secret"
        sentinels = pool.sentinel_manager.sentinels
        hosts = [
            (
                s.connection_pool.connection_kwargs["host"],
                s.connection_pool.connection_kwargs["port"],
            )
            for s in sentinels
        ]
        assert hosts == [("s1", 26380), ("s2", 26379)]
    finally:
        await client.aclose()


async def test_cluster_url_maps_onto_startup_nodes() -> None:
    client = connect_redis(settings("redis+cluster://n1:7000,n2:7001", password="cluster-pw"))
    try:
        assert isinstance(client, RedisCluster)
        assert sorted(client.nodes_manager.startup_nodes) == ["n1:7000", "n2:7001"]
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://s1:26379",
        "redis+sentinel://s1:26379/mymaster/zero",
        "redis+sentinel://s1:26379/a/1/extra",
        "redis+cluster://n1:7000/0",
    ],
)
def test_malformed_sentinel_and_cluster_urls_are_config_errors(url: str) -> None:
    # The config refuses these at load (tests/test_config_preflight.py); connect_redis
    # refuses them too, for settings built without validation.
    unchecked = settings("redis://127.0.0.1:6379/0").model_copy(update={"url": url})
    with pytest.raises(ConfigError, match=r"^cache\.redis\.url: "):
        connect_redis(unchecked)


@pytest.fixture
def redis_binary() -> None:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (make system-deps)")


async def test_store_through_a_real_sentinel(
    redis_binary: None, tmp_path: Path, entry_factory: EntryFactory
) -> None:
    with RedisServer(tmp_path / "master") as master:
        sentinel = start_sentinel(master, tmp_path / "sentinel", service="tokens")
        try:
            url = f"redis+sentinel://127.0.0.1:{sentinel.port}/tokens/0"
            store = RedisTokenStore(settings(url, timeout=1))
            try:
                entry = entry_factory()
                await store.put(entry)
                assert await store.get(entry.cache_key, entry.assertion_id) == entry
                async with store.exchange_lock(entry.cache_key, entry.assertion_id) as owned:
                    assert owned
            finally:
                await store.close()
        finally:
            sentinel.kill()


@pytest.fixture
def cluster(redis_binary: None, tmp_path: Path) -> Iterator[list[RedisServer]]:
    nodes = start_cluster(tmp_path / "cluster")
    try:
        yield nodes
    finally:
        for node in nodes:
            node.kill()


async def test_store_through_a_real_cluster(
    cluster: list[RedisServer], entry_factory: EntryFactory
) -> None:
    url = f"redis+cluster://127.0.0.1:{cluster[0].port},127.0.0.1:{cluster[1].port}"
    replica_a = RedisTokenStore(settings(url, timeout=1))
    replica_b = RedisTokenStore(settings(url, timeout=1))
    try:
        async with asyncio.timeout(10):
            entries = [entry_factory(f"_id{i}") for i in range(20)]  # spread over slots
            for entry in entries:
                await replica_a.put(entry)
            for entry in entries:
                assert await replica_b.get(entry.cache_key, entry.assertion_id) == entry
            async with replica_a.exchange_lock("okta", "_id3") as owned_a:
                async with replica_b.exchange_lock("okta", "_id3") as owned_b:
                    assert (owned_a, owned_b) == (True, False)
            assert replica_a.healthy and replica_b.healthy
    finally:
        await replica_a.close()
        await replica_b.close()


@pytest.mark.parametrize("scheme", ["redis+sentinel", "redis+cluster"])
async def test_unreachable_sentinel_or_cluster_reads_as_empty(
    scheme: str, entry_factory: EntryFactory
) -> None:
    path = "/tokens/0" if scheme == "redis+sentinel" else ""
    store = RedisTokenStore(settings(f"{scheme}://127.0.0.1:{free_port()}{path}"))
    entry = entry_factory()
    try:
        async with asyncio.timeout(10):
            await store.put(entry)
            assert await store.get(entry.cache_key, entry.assertion_id) is None
            async with store.exchange_lock(entry.cache_key, entry.assertion_id) as owned:
                assert owned is True  # a dead store is an empty one: this replica goes
        assert not store.healthy
    finally:
        await store.close()
