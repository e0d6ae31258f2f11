"""Honest health: the store's ``ping`` (what ``/readyz`` and ``gateway_redis_up`` report) is up
only while keys can be written and read, on a real Cluster and a real Sentinel setup, and its
down line names the cause without a password.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.cache.redis import RedisTokenStore
from gateway.config import RedisSettings
from gateway.devkit.redis_server import (
    RedisServer,
    redis_server_binary,
    start_cluster,
    start_sentinel,
)

HANG_GUARD = 30  # seconds: a broken store must not hang the suite
SEALING_KEY = "health-test-secret-0123456789abcdef"


def settings(url: str, **overrides: Any) -> RedisSettings:
    values: dict[str, Any] = {
        "url": url,
        "encryption_keys": {"k1": SEALING_KEY},
        "active_key": "k1",
        "timeout": 1.0,
    }
    values.update(overrides)
    return RedisSettings.model_validate(values)


def state_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "gateway.cache.redis" and r.getMessage().startswith("redis store is")
    ]


def cluster_info(port: int) -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"*2\r\n$7\r\nCLUSTER\r\n$4\r\nINFO\r\n")
            return sock.recv(4096)
    except OSError:
        return b""


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


@pytest.fixture
def redis_binary() -> None:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (make system-deps)")


@pytest.fixture
def cluster(redis_binary: None, tmp_path: Path) -> Iterator[list[RedisServer]]:
    nodes = start_cluster(tmp_path / "cluster")
    try:
        yield nodes
    finally:
        for node in nodes:
            node.kill()


async def probe_holder(nodes: list[RedisServer]) -> int:
    """The index of the node holding the store's probe key."""
    holders = []
    for i, node in enumerate(nodes):
        async with aioredis.Redis.from_url(node.url) as raw:
            if await raw.keys("samlgw:h:*"):
                holders.append(i)
    assert len(holders) == 1, holders
    return holders[0]


async def test_a_failed_cluster_reads_as_down_although_nodes_answer_ping(
    cluster: list[RedisServer], fake_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.cache.redis")
    url = ",".join(f"127.0.0.1:{n.port}" for n in cluster)
    states: list[bool] = []
    store = RedisTokenStore(
        settings(f"redis+cluster://{url}"), on_state=states.append, clock=fake_clock
    )
    try:
        async with asyncio.timeout(HANG_GUARD):
            assert await store.ping() is True
            holder = await probe_holder(cluster)
            lost = cluster[(holder + 1) % len(cluster)]  # a node the probe key is not on
            lost.kill()
            survivors = [n for n in cluster if n is not lost]
            await asyncio.to_thread(
                wait_until,
                lambda: all(b"cluster_state:fail" in cluster_info(n.port) for n in survivors),
                "the cluster did not notice the lost node",
            )
            # the node holding the probe key still answers PING: a PING says nothing here
            async with aioredis.Redis.from_url(cluster[holder].url) as raw:
                assert await raw.ping() is True
            fake_clock.advance(2)
            assert await store.ping() is False
            assert not store.healthy

            lost.start()  # same port and nodes.conf: it rejoins
            await asyncio.to_thread(
                wait_until,
                lambda: all(b"cluster_state:ok" in cluster_info(n.port) for n in cluster),
                "the cluster did not recover",
            )
            fake_clock.advance(2)
            assert await store.ping() is True
    finally:
        await store.close()
    assert states == [True, False, True]
    lines = state_lines(caplog)
    assert len(lines) == 3, lines
    assert lines[1].startswith("redis store is down (probe: "), lines[1]
    # the refusal, or (when redis-py re-reads the slot map on it) the lost node by address
    assert (
        "ClusterDownError: The cluster is down" in lines[1]
        or f"connecting to 127.0.0.1:{lost.port}" in lines[1]
    ), lines


async def role(server: RedisServer) -> str:
    """The server's replication role, from a fresh connection (the sentinel's reconfiguration
    closes client connections), or "" while it cannot be asked."""
    try:
        async with aioredis.Redis.from_url(server.url, decode_responses=True) as raw:
            return str((await raw.info("replication"))["role"])
    except aioredis.ConnectionError:
        return ""


async def test_sentinel_health_follows_the_current_master(
    redis_binary: None, tmp_path: Path, fake_clock: Any, entry_factory: Callable[[], Any]
) -> None:
    """After a failover the demoted master still answers PING on the pooled connection; the
    probe is a write, so it finds the new master, and what the store writes lands there."""
    with (
        RedisServer(tmp_path / "a") as first,
        RedisServer(tmp_path / "b") as second,
    ):
        async with aioredis.Redis.from_url(second.url) as raw_second:
            await raw_second.replicaof("127.0.0.1", first.port)
        sentinel = start_sentinel(first, tmp_path / "sentinel", service="tokens")
        store = RedisTokenStore(
            settings(f"redis+sentinel://127.0.0.1:{sentinel.port}/tokens/0"), clock=fake_clock
        )
        try:
            async with asyncio.timeout(HANG_GUARD):
                assert await store.ping() is True
                async with aioredis.Redis.from_url(first.url) as raw_first:
                    assert await raw_first.keys("samlgw:h:*")
                async with aioredis.Redis.from_url(sentinel.url) as raw_sentinel:

                    async def failover_started() -> bool:
                        try:
                            await raw_sentinel.execute_command("SENTINEL FAILOVER", "tokens")
                        except aioredis.ResponseError:
                            return False  # the sentinel does not know the replica yet
                        return True

                    for _ in range(200):
                        if await failover_started():
                            break
                        await asyncio.sleep(0.1)
                    for _ in range(200):
                        address = await raw_sentinel.execute_command(
                            "SENTINEL GET-MASTER-ADDR-BY-NAME", "tokens"
                        )
                        if int(address[1]) == second.port:
                            break
                        await asyncio.sleep(0.1)
                for _ in range(200):  # until the old master is told it is a replica
                    if await role(first) == "slave":
                        break
                    await asyncio.sleep(0.1)
                assert await role(first) == "slave"
                async with aioredis.Redis.from_url(first.url) as raw_first:
                    assert await raw_first.ping() is True  # PING would call it healthy
                fake_clock.advance(2)
                assert await store.ping() is True
                entry = entry_factory()
                await store.put(entry)
                assert await role(second) == "master"
                async with aioredis.Redis.from_url(second.url) as raw_second:
                    assert await raw_second.keys("samlgw:t:*")  # written to the new master
                assert await store.get(entry.cache_key, entry.assertion_id) == entry
        finally:
            await store.close()
            sentinel.kill()


async def test_the_down_line_names_the_cause_and_never_the_password(
    redis_binary: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.cache.redis")
    with RedisServer(tmp_path / "r", password="the-right-password") as server:
        for given in ({"password": "wrong-password-1"}, {}):
            url = f"redis://:wrong-password-2@127.0.0.1:{server.port}/0"
            store = RedisTokenStore(settings(url, **given))
            try:
                assert await store.ping() is False
            finally:
                await store.close()
    lines = state_lines(caplog)
    assert len(lines) == 2, lines
    for line in lines:
        assert "AuthenticationError: invalid username-password pair" in line, line
        assert "wrong-password" not in line and "the-right-password" not in line
    assert "wrong-password" not in caplog.text
