"""Two gateway processes share tokens through one Redis: one exchange per assertion."""

from __future__ import annotations

import asyncio

from .conftest import Cluster


async def test_a_burst_split_over_two_gateways_costs_one_exchange(cluster: Cluster) -> None:
    a, b = cluster.spawn("a"), cluster.spawn("b")
    assertion = cluster.assertion()
    results = await asyncio.gather(
        *(cluster.call(a if i % 2 else b, assertion) for i in range(200))
    )
    assert [status for status, _ in results] == [200] * 200
    assert cluster.parts.auth.calls == 1
    # every request, on either gateway, carried the one token the exchange produced
    assert {token for _, token in results} == {cluster.parts.auth.issued[0]}
