"""An L2 hit by digest between two gateway processes: the second gateway serves the token
the first obtained for exactly those bytes without validating them again (its access line
says hit on its very first request), and replay detection by assertion ID still spans both."""

from __future__ import annotations

from gateway.devkit.idp import new_id

from .helpers import Cluster


async def test_the_same_bytes_on_another_gateway_are_a_hit_at_once(cluster: Cluster) -> None:
    a, b = cluster.spawn("a"), cluster.spawn("b")
    assertion = cluster.assertion()
    first = await cluster.call(a, assertion)
    assert first[0] == 200 and cluster.parts.auth.calls == 1
    assert await cluster.call(b, assertion) == first
    # B never validated: its one access line is a cache hit, not a miss
    log = b.logs_with('"status":200')
    assert log.count('"cache":"hit"') == 1 and '"cache":"miss"' not in log
    assert cluster.parts.auth.calls == 1


async def test_another_signed_assertion_under_the_id_is_still_refused_on_both(
    cluster: Cluster,
) -> None:
    a, b = cluster.spawn("a"), cluster.spawn("b")
    assertion_id = new_id()
    original = cluster.assertion(assertion_id=assertion_id)
    assert (await cluster.call(a, original))[0] == 200
    assert (await cluster.call(b, original))[0] == 200  # adopted on B by digest
    forged = cluster.assertion("mallory@example.test", assertion_id=assertion_id)
    for gateway in (a, b):
        assert (await cluster.call(gateway, forged))[0] == 401
    assert cluster.parts.auth.calls == 1
