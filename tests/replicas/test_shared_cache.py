"""Two gateway processes share tokens through one Redis: one exchange per assertion, and a
gateway that starts with an empty memory still serves what the other one obtained."""

from __future__ import annotations

import asyncio

from gateway.devkit.idp import new_id

from .helpers import Cluster


async def test_a_burst_split_over_two_gateways_costs_one_exchange(cluster: Cluster) -> None:
    a, b = cluster.spawn("a"), cluster.spawn("b")
    assertion = cluster.assertion()
    results = await cluster.call_all([(a if i % 2 else b, assertion) for i in range(200)])
    assert [status for status, _ in results] == [200] * 200
    assert cluster.parts.auth.calls == 1
    # every request, on either gateway, carried the one token the exchange produced
    assert {token for _, token in results} == {cluster.parts.auth.issued[0]}
    # both gateways really served their half (one access line per request)
    for gateway in (a, b):
        assert gateway.logs_with('"status":200', 100).count('"status":200') == 100


async def test_a_restarted_gateway_serves_the_token_without_an_exchange(
    cluster: Cluster,
) -> None:
    auth = cluster.parts.auth
    auth.one_time_use = True  # a second exchange of the same assertion would be refused
    a = cluster.spawn("a")
    assertion = cluster.assertion(assertion_id=new_id())
    status, token = await cluster.call(a, assertion)
    assert (status, token, auth.calls) == (200, auth.issued[0], 1)

    a.proc.terminate()
    assert await asyncio.to_thread(a.proc.wait, 15) == 0
    restarted = cluster.spawn("a")  # same config, empty memory
    other = cluster.spawn("b")  # never saw the assertion
    for gateway in (restarted, other, restarted):
        assert await cluster.call(gateway, assertion) == (200, auth.issued[0])
    assert auth.calls == 1
    assert auth.refusals == []
