"""Two gateway replicas on a real Sentinel setup (a master, a replica, three sentinels on
loopback) fail over under load: by ``SENTINEL FAILOVER`` and by SIGKILL of the master.

The load is the test's own: workers that each mint a new assertion and send it to replica
a and then to replica b (a *round*: shared when b served the token a obtained, i.e. one
exchange for the two), and workers repeating earlier assertions. What is asserted is
behaviour: no request fails, rounds share before the failover, the sentinels promote the
replica, sharing comes back after ``+switch-master`` (within a generous bound) and stays,
and after ``SENTINEL FAILOVER`` the old master, alive and writable until the sentinels
demote it seconds later, gets no more writes: the replicas share on the new one. How long
recovery took is printed for the record (``pytest -s``) and measured in bench/failover.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from integration.helpers import Parts, Process

from gateway.devkit.idp import DemoIdP
from gateway.devkit.redis_server import RedisServer, SentinelGroup, redis_server_binary

from .helpers import REDIS_PASSWORD, Cluster, eventually

ROUND_WORKERS, REPEAT_WORKERS = 4, 2
MAX_REQUESTS = 6000  # bounds the load whatever happens
AFTER_SWITCH = 8.0  # seconds of load after +switch-master at most: the generous bound
# The load ends once STABLE_ROUNDS rounds in a row have shared, all started SETTLE seconds
# or more after +switch-master: a generous bound on the replicas leaving the old master
# (they ask the sentinels twice a second; the old master itself, after SENTINEL FAILOVER,
# takes writes until the sentinels demote it 8 s or more later).
STABLE_ROUNDS, SETTLE = 20, 3.0


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelGroup]:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (make system-deps)")
    with SentinelGroup(tmp_path / "sentinel", password=REDIS_PASSWORD) as group:
        yield group


@dataclass
class Round:
    started: float  # loop.time()
    ended: float
    statuses: tuple[int, int]
    shared: bool  # both replicas delivered the same token: one exchange for the two


@dataclass
class Load:
    rounds: list[Round]
    statuses: list[int]  # every response, rounds and repeats
    broken_at: float  # when the master was failed over or killed
    switch_at: float
    new_master: int
    settled: bool  # sharing came back (STABLE_ROUNDS after SETTLE) within AFTER_SWITCH


async def under_load(
    cluster: Cluster, a: Process, b: Process, group: SentinelGroup, fail: Callable[[], None]
) -> Load:
    """Rounds and repeats on both replicas while ``fail`` (run in a thread) breaks the master;
    until sharing has been back for STABLE_ROUNDS rounds after SETTLE, or AFTER_SWITCH."""
    loop = asyncio.get_running_loop()
    rounds: list[Round] = []
    statuses: list[int] = []
    repeats = [cluster.assertion(f"repeat{i}@example.test") for i in range(8)]
    stop = asyncio.Event()
    switch: list[float] = []
    broken: list[float] = []

    def sharing_back() -> bool:
        if not switch:
            return False
        after = [r for r in rounds if r.started > switch[0] + SETTLE]
        return len(after) >= STABLE_ROUNDS and all(r.shared for r in after[-STABLE_ROUNDS:])

    async def rounds_worker(worker: int) -> None:
        n = 0
        while not stop.is_set() and len(statuses) < MAX_REQUESTS:
            n += 1
            assertion = cluster.assertion(f"w{worker}-{n}@example.test")
            started = loop.time()
            status_a, token_a = await cluster.call(a, assertion)
            status_b, token_b = await cluster.call(b, assertion)
            statuses.extend((status_a, status_b))
            shared = token_a is not None and token_a == token_b
            rounds.append(Round(started, loop.time(), (status_a, status_b), shared))
            if sharing_back() or (switch and loop.time() > switch[0] + AFTER_SWITCH):
                stop.set()
            await asyncio.sleep(0.01)  # a steady load, not a flood that starves the sentinels

    async def repeats_worker(worker: int) -> None:
        n = worker
        while not stop.is_set() and len(statuses) < MAX_REQUESTS:
            n += 1
            status, _ = await cluster.call((a, b)[n % 2], repeats[n % len(repeats)])
            statuses.append(status)
            await asyncio.sleep(0.01)

    async def break_master() -> tuple[float, int]:
        async with group.switch_master() as switched:
            await asyncio.sleep(1.5)  # some rounds before the failover
            broken.append(loop.time())
            await asyncio.to_thread(fail)
            async with asyncio.timeout(30):
                seen = await switched
        switch.append(seen[0])
        return seen

    async with asyncio.timeout(90):
        workers = [
            *(asyncio.create_task(rounds_worker(i)) for i in range(ROUND_WORKERS)),
            *(asyncio.create_task(repeats_worker(i)) for i in range(REPEAT_WORKERS)),
        ]
        try:
            switch_at, new_master = await break_master()
            await asyncio.wait(workers)
        finally:
            stop.set()
            await asyncio.gather(*workers, return_exceptions=True)
        for worker in workers:
            worker.result()  # a worker that raised fails the test with its error
    return Load(rounds, statuses, broken[0], switch_at, new_master, sharing_back())


def recovered_at(load: Load) -> float | None:
    """When the first round of the final unbroken run of shared rounds after the switch
    started (None when the last round after the switch did not share)."""
    after = [r for r in load.rounds if r.started > load.switch_at]
    start = None
    for r in after:
        if not r.shared:
            start = None
        elif start is None:
            start = r.started
    return start


async def both_ready(cluster: Cluster, a: Process, b: Process) -> bool:
    for gateway in (a, b):
        status, body = await cluster.readyz(gateway)
        if status != 200 or body.get("redis") != "up":
            return False
    return True


async def failover_under_load(
    parts: Parts,
    idp: DemoIdP,
    processes: list[Process],
    tmp_path: Path,
    client: aiohttp.ClientSession,
    group: SentinelGroup,
    how: str,
) -> None:
    cluster = Cluster(parts, idp, group.servers[0], processes, tmp_path, client)
    # a slow answer on a busy machine must not read as a failover (the kill is refused at once)
    a = cluster.spawn("a", url=group.url, timeout=2)
    b = cluster.spawn("b", url=group.url, timeout=2)
    assert await eventually(lambda: both_ready(cluster, a, b), 20)
    first = group.master()
    replica = next(s for s in group.servers if s is not first)
    fail = group.failover if how == "SENTINEL FAILOVER" else first.kill
    load = await under_load(cluster, a, b, group, fail)

    failed = [s for s in load.statuses if s != 200]
    before = [r for r in load.rounds if r.ended < load.broken_at]
    back = recovered_at(load)
    shown = f"{back - load.switch_at:.2f} s" if back is not None else "never"
    print(
        f"\n{how} under load: {len(load.statuses)} requests, {len(failed)} failed; "
        f"{len(load.rounds)} rounds, {sum(not r.shared for r in load.rounds)} not shared; "
        f"+switch-master {load.switch_at - load.broken_at:.2f} s after the {how}, "
        f"sharing back {shown} after +switch-master (the last round not shared started "
        f"{max((r.started - load.switch_at for r in load.rounds if not r.shared), default=0):+.2f}"
        " s from it)"
    )
    assert failed == []
    assert len(before) >= 5 and all(r.shared for r in before)  # it did share before
    assert load.new_master == replica.port
    assert load.settled  # back, and for good, within AFTER_SWITCH of +switch-master
    assert back is not None
    if how == "SENTINEL FAILOVER":
        # The old master is alive and, until the sentinels demote it (seconds later), still
        # takes writes: replicas must have left it, not shared tokens on it.
        await still_on(cluster, a, b, group, first, replica)


async def still_on(
    cluster: Cluster,
    a: Process,
    b: Process,
    group: SentinelGroup,
    old: RedisServer,
    new: RedisServer,
) -> None:
    """Rounds now share on the new master, and not one write reaches the old one."""
    old_writes, new_writes = group.master_writes(old), group.master_writes(new)
    assert new_writes is not None
    for n in range(10):
        assertion = cluster.assertion(f"after{n}@example.test")
        (status_a, token_a), (status_b, token_b) = [
            await cluster.call(gateway, assertion) for gateway in (a, b)
        ]
        assert (status_a, status_b) == (200, 200)
        assert token_a == token_b
    assert (group.master_writes(new) or 0) > new_writes
    if old_writes is not None and (now := group.master_writes(old)) is not None:
        assert now == old_writes
    else:  # demoted: it takes no writes any more, and counts what it replicates
        print("the old master was demoted before the check")


async def test_sentinel_failover_under_load_fails_no_request_and_shares_again(
    parts: Parts,
    idp: DemoIdP,
    processes: list[Process],
    tmp_path: Path,
    client: aiohttp.ClientSession,
    sentinels: SentinelGroup,
) -> None:
    await failover_under_load(
        parts, idp, processes, tmp_path, client, sentinels, "SENTINEL FAILOVER"
    )


async def test_master_killed_under_load_fails_no_request_and_shares_again(
    parts: Parts,
    idp: DemoIdP,
    processes: list[Process],
    tmp_path: Path,
    client: aiohttp.ClientSession,
    sentinels: SentinelGroup,
) -> None:
    await failover_under_load(parts, idp, processes, tmp_path, client, sentinels, "SIGKILL")


SENTINEL_PASSWORD = "sentinel-password-0123456789"


async def test_sentinels_that_require_a_password(
    parts: Parts,
    idp: DemoIdP,
    processes: list[Process],
    tmp_path: Path,
    client: aiohttp.ClientSession,
) -> None:
    """The URL's password authenticates to the sentinels, for the first lookup and for the
    master checks after a failover; it never shows in a log line."""
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (make system-deps)")
    with SentinelGroup(
        tmp_path / "sentinel", password=REDIS_PASSWORD, sentinel_password=SENTINEL_PASSWORD
    ) as group:
        cluster = Cluster(parts, idp, group.servers[0], processes, tmp_path, client)
        a = cluster.spawn("a", url=group.url, timeout=2)
        b = cluster.spawn("b", url=group.url, timeout=2)
        assert await eventually(lambda: both_ready(cluster, a, b), 20)
        first = group.master()
        replica = next(s for s in group.servers if s is not first)
        async with group.switch_master() as switched:
            await asyncio.to_thread(group.failover)
            async with asyncio.timeout(30):
                _, port = await switched
        assert port == replica.port

        async def shares_on_the_new_master() -> bool:
            before = group.master_writes(replica) or 0
            assertion = cluster.assertion()
            (status_a, token_a), (status_b, token_b) = [
                await cluster.call(gateway, assertion) for gateway in (a, b)
            ]
            assert (status_a, status_b) == (200, 200)
            return token_a == token_b and (group.master_writes(replica) or 0) > before

        assert await eventually(shares_on_the_new_master, 10)
        await still_on(cluster, a, b, group, first, replica)
    for gateway in (a, b):
        assert SENTINEL_PASSWORD not in gateway.logs()
