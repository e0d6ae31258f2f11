"""An upstream that refuses every token (401 ``invalid_token``) must not let a client drive
the authorization server's call rate (issue 17, attack 9): the refused token is dropped and
the assertion exchanged again once per ``proxy.reexchange_interval``; the other requests get
the upstream's 401 as it is."""

from __future__ import annotations

from pathlib import Path

from integration.helpers import Parts
from integration.helpers import start_stack as start_integration_stack

from gateway.devkit.idp import DemoIdP


async def _refused_requests(
    tmp_path: Path, idp: DemoIdP, parts: Parts, count: int, **settings: object
) -> tuple[list[int], list[str], int]:
    stack = await start_integration_stack(tmp_path, idp, parts, **settings)
    statuses, challenges = [], []
    try:
        headers = stack.assertion()
        for _ in range(count):
            async with stack.session.get(f"{stack.url}/unauthorized", headers=headers) as r:
                statuses.append(r.status)
                challenges.append(r.headers.get("WWW-Authenticate", ""))
    finally:
        await stack.session.close()
        await stack.server.close()
    return statuses, challenges, stack.auth.calls


async def test_an_upstream_refusing_every_token_costs_one_reexchange_per_interval(
    tmp_path: Path, idp: DemoIdP, parts: Parts
) -> None:
    statuses, challenges, exchanges = await _refused_requests(tmp_path, idp, parts, 10)
    assert statuses == [401] * 10
    assert all('error="invalid_token"' in c for c in challenges)  # the upstream's answer
    assert exchanges == 2  # the first exchange, and one after the first refusal


async def test_with_no_interval_each_refusal_buys_an_exchange(
    tmp_path: Path, idp: DemoIdP, parts: Parts
) -> None:
    """The setting is what decides: at 0 the old behaviour comes back."""
    statuses, _, exchanges = await _refused_requests(
        tmp_path, idp, parts, 4, proxy={"reexchange_interval": 0}
    )
    assert statuses == [401] * 4
    assert exchanges == 4
