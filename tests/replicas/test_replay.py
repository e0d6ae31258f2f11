"""Two gateway processes sharing one Redis agree on what each assertion ID belongs to: a byte
variant on the other gateway shares the token, a different signed assertion reusing the ID
is a replay there too, and neither asks the authorization server again."""

from __future__ import annotations

import asyncio
import base64

from gateway.devkit.idp import new_id

from .helpers import Cluster


def variant(header: str, suffix: bytes = b"\n  ") -> str:
    """The same signed assertion with other bytes (whitespace after the root element)."""
    return base64.b64encode(base64.b64decode(header) + suffix).decode()


async def test_a_byte_variant_on_the_other_gateway_is_not_exchanged_again(
    cluster: Cluster,
) -> None:
    auth = cluster.parts.auth
    a, b = cluster.spawn("a"), cluster.spawn("b")
    assertion = cluster.assertion(assertion_id=new_id())
    assert await cluster.call(a, assertion) == (200, auth.issued[0])
    declared = base64.b64encode(
        b'<?xml version="1.0" encoding="UTF-8"?>\n' + base64.b64decode(assertion)
    ).decode()
    for gateway, header in ((b, variant(assertion)), (b, declared), (a, variant(assertion))):
        assert await cluster.call(gateway, header) == (200, auth.issued[0])
    assert auth.calls == 1


async def test_another_signed_assertion_with_the_id_is_refused_on_the_other_gateway(
    cluster: Cluster,
) -> None:
    auth = cluster.parts.auth
    auth.expires_in = 1  # the gateways serve half of it
    a, b = cluster.spawn("a"), cluster.spawn("b")
    assertion_id = new_id()
    genuine = cluster.assertion("alice@example.test", assertion_id=assertion_id)
    other = cluster.assertion("mallory@example.test", assertion_id=assertion_id)
    assert await cluster.call(a, genuine) == (200, auth.issued[0])
    assert await cluster.call(b, other) == (401, None)
    await asyncio.sleep(1.0)  # the token is over; both assertions are valid for minutes
    assert await cluster.call(b, other) == (401, None)
    # and the genuine one, in any bytes, is spent: exchanged once, on any gateway
    assert await cluster.call(b, variant(genuine)) == (401, None)
    assert await cluster.call(a, genuine) == (401, None)
    assert auth.calls == 1
    log = b.logs_with('"reason":"spent"')
    assert '"reason":"replay"' in log and '"reason":"spent"' in log
