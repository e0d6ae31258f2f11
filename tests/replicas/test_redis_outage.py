"""Redis dies under load and comes back: no request fails because of it, /readyz and
``gateway_redis_up`` follow it, and once it is back the gateways share tokens again."""

from __future__ import annotations

import asyncio
import itertools

from integration.helpers import Process

from .helpers import Cluster, eventually

ROUNDS = 24
KILL_AT = 8  # Redis is killed while this round's requests are in flight


async def redis_state(cluster: Cluster, gateway: Process) -> tuple[int, str, float | None]:
    status, body = await cluster.readyz(gateway)
    return status, body["redis"], await cluster.metric(gateway, "gateway_redis_up")


async def test_redis_killed_mid_load_fails_no_request_and_sharing_resumes(
    cluster: Cluster,
) -> None:
    auth = cluster.parts.auth
    # A long lock_wait: were a replica to wait on a dead store for another's result, the
    # bounded calls below would time out instead of answering.
    gateways = [cluster.spawn(name, lock_wait=120) for name in ("a", "b")]
    for gateway in gateways:
        assert await redis_state(cluster, gateway) == (200, "up", 1.0)

    # Several long-lived assertions plus a fresh one every round, each sent to both
    # gateways at once, so the outage meets hits, shared hits and brand-new exchanges.
    steady = [cluster.assertion(f"user{i}@example.test") for i in range(4)]
    statuses: list[int] = []
    for round_number in range(ROUNDS):
        fresh = cluster.assertion(f"fresh{round_number}@example.test")
        calls = [(g, a) for g, a in itertools.product(gateways, [*steady, fresh])]
        load = cluster.call_all(calls)
        if round_number == KILL_AT:
            results, _ = await asyncio.gather(load, asyncio.to_thread(cluster.redis.kill))
        else:
            results = await load
        statuses += [status for status, _ in results]
    assert statuses == [200] * (ROUNDS * 10)
    assert auth.refusals == []

    for gateway in gateways:
        # not required for readiness (the default): still ready, but says Redis is down
        assert await redis_state(cluster, gateway) == (200, "down", 0.0)
        assert "redis store is down" in gateway.logs()

    await asyncio.to_thread(cluster.redis.start)  # same port, empty (no persistence)

    async def both_up() -> bool:
        states = [await redis_state(cluster, g) for g in gateways]
        return all(state == (200, "up", 1.0) for state in states)

    assert await eventually(both_up)

    # Shared again: a new assertion, split over both gateways at once, costs one exchange.
    before = auth.calls
    shared = cluster.assertion("after-restart@example.test")
    results = await cluster.call_all([(gateways[i % 2], shared) for i in range(40)])
    assert [status for status, _ in results] == [200] * 40
    assert auth.calls == before + 1
    assert {token for _, token in results} == {auth.issued[-1]}


async def test_readyz_is_503_while_a_required_redis_is_down(cluster: Cluster) -> None:
    gateway = cluster.spawn("a", required_for_readiness=True)
    assert await redis_state(cluster, gateway) == (200, "up", 1.0)

    cluster.redis.kill()
    status, body = await cluster.readyz(gateway)
    assert (status, body) == (503, {"status": "redis_down", "redis": "down"})
    assert await cluster.metric(gateway, "gateway_redis_up") == 0.0
    # not ready for new traffic, yet a request that does arrive is still served
    status, token = await cluster.call(gateway, cluster.assertion())
    assert (status, token) == (200, cluster.parts.auth.issued[-1])

    cluster.redis.start()

    async def ready() -> bool:
        return await redis_state(cluster, gateway) == (200, "up", 1.0)

    assert await eventually(ready)
    status, body = await cluster.readyz(gateway)
    assert body == {"status": "ready", "redis": "up"}
