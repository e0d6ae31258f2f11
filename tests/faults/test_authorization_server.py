"""The authorization server misbehaves; the gateway (a real process) answers in bounded time,
keeps serving cached tokens, leaks no connection and stays up.

Configured AS budget (``gateway_yaml``): connect 1 s, total 2 s per attempt, 3 attempts,
deadline 3 s. Every bound below is that deadline plus ``SLACK``: a bound on a hang, not a
speed test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.devkit.idp import DemoIdP

from .helpers import (
    SLACK,
    SOCKET_SLACK,
    Backstage,
    Gateway,
    Parts,
    client_session,
    fetch,
    gateway_yaml,
    header_for,
    issue,
    metric,
)

AS_DEADLINE = 3.0  # retries.deadline in gateway_yaml
AS_ATTEMPT = 2.0  # timeouts.total in gateway_yaml
BOUND = AS_DEADLINE + SLACK


@dataclass
class Stack:
    gateway: Gateway
    parts: Parts
    idp: DemoIdP
    cached: dict[str, str]  # headers of an assertion whose token is cached
    pooled: int = SOCKET_SLACK  # idle keep-alive connections a test may leave in the pools

    def fresh(self) -> dict[str, str]:
        return header_for(issue(self.idp, self.parts.auth.token_url))

    def reset(self) -> None:
        self.parts.auth.mode = "ok"
        self.parts.auth.fail_next = 0


@pytest.fixture(scope="module")
def stack(
    backstage: Backstage, idp: DemoIdP, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    parts = Parts.start(backstage)
    folder: Path = tmp_path_factory.mktemp("as-faults")
    path = gateway_yaml(folder, parts.auth.token_url, parts.upstream_url, idp)
    with Gateway.running(path) as gateway:
        cached = header_for(issue(idp, parts.auth.token_url, "cached@example.test"))

        async def warm() -> None:
            async with client_session() as session:
                for _ in range(2):  # a miss, then a hit: both pools are open now
                    answer = await fetch(session, f"{gateway.url}/hello", headers=cached)
                    assert answer.status == 200

        asyncio.run(warm())
        yield Stack(gateway, parts, idp, cached)
    parts.stop()


@pytest.fixture
def s(stack: Stack) -> Iterator[Stack]:
    stack.reset()
    stack.pooled = SOCKET_SLACK
    # Idle pooled connections of an earlier test may still be open: count from here.
    baseline = stack.gateway.sockets()
    yield stack
    stack.reset()
    # No connection leaks once the fault is over, and the process is still there.
    assert stack.gateway.alive()
    stack.gateway.assert_no_leak(baseline, stack.pooled)


async def assert_cached_served(s: Stack) -> None:
    """The cached assertion still gets through without the authorization server."""
    calls = s.parts.auth.calls
    async with client_session() as session:
        answer = await fetch(session, f"{s.gateway.url}/hello", headers=s.cached)
    assert answer.status == 200
    assert answer.body == b"hello"
    assert s.parts.auth.calls == calls


@pytest.mark.parametrize(
    ("mode", "status", "attempts", "retry_after"),
    [
        ("server_error", 502, 3, None),  # 5xx is retried, then reported as a bad gateway
        ("garbage", 502, 1, None),  # 200 with a body that is not JSON
        ("html", 502, 1, None),  # a login page instead of a token endpoint
        ("rate_limited", 503, 1, "7"),  # 429: back off, with the server's Retry-After
        ("temporarily_unavailable", 503, 1, "7"),
        ("invalid_client", 502, 1, None),  # our credentials: an operator's problem
        ("invalid_grant", 401, 1, None),  # the caller's assertion: never retried
    ],
)
async def test_error_answers(
    s: Stack, mode: str, status: int, attempts: int, retry_after: str | None
) -> None:
    s.parts.auth.mode = mode
    calls = s.parts.auth.calls
    async with client_session() as session:
        answer = await fetch(session, f"{s.gateway.url}/hello", headers=s.fresh())
    assert answer.status == status
    assert answer.seconds < BOUND
    assert s.parts.auth.calls - calls == attempts
    assert answer.headers.get("Retry-After") == retry_after
    body = answer.json()
    assert set(body) == {"error", "error_description", "request_id"}
    assert mode not in body["error_description"]  # the AS's words stay in the logs
    await assert_cached_served(s)


async def test_refused_connections_then_recovery(s: Stack, backstage: Backstage) -> None:
    auth = s.parts.auth
    port = int(auth.token_url.rsplit(":", 1)[1].split("/")[0])
    backstage.run(auth.stop())
    try:
        fresh = s.fresh()
        async with client_session() as session:
            answer = await fetch(session, f"{s.gateway.url}/hello", headers=fresh)
            assert answer.status == 502
            assert answer.seconds < BOUND
            await assert_cached_served(s)
    finally:
        backstage.run(auth.start(port=port))
    async with client_session() as session:
        # A failure is not cached: the same assertion goes through once the server is back.
        answer = await fetch(session, f"{s.gateway.url}/hello", headers=fresh)
    assert answer.status == 200


async def test_hanging_server(s: Stack) -> None:
    s.parts.auth.mode = "hang"
    async with client_session() as session:
        hanging = asyncio.create_task(fetch(session, f"{s.gateway.url}/hello", headers=s.fresh()))
        # While one exchange hangs, cached tokens are served without waiting for it.
        await asyncio.sleep(0.2)
        await assert_cached_served(s)
        answer = await hanging
    assert answer.status == 504
    # A read timeout is not retried (the server may have consumed the assertion).
    assert AS_ATTEMPT * 0.9 < answer.seconds < AS_ATTEMPT + SLACK


async def test_slow_server_under_concurrency(s: Stack) -> None:
    s.parts.auth.mode, s.parts.auth.delay = "slow", 1.0  # below the 2 s attempt timeout
    shared = s.fresh()
    distinct = [s.fresh() for _ in range(10)]
    # Concurrent exchanges and forwards each open a pooled connection that may stay idle.
    s.pooled = SOCKET_SLACK + 30 + 11
    calls = s.parts.auth.calls
    async with client_session() as session:
        answers = await asyncio.gather(
            *(fetch(session, f"{s.gateway.url}/hello", headers=shared) for _ in range(10)),
            *(fetch(session, f"{s.gateway.url}/hello", headers=h) for h in distinct),
            *(fetch(session, f"{s.gateway.url}/hello", headers=s.cached) for _ in range(10)),
        )
    assert [a.status for a in answers] == [200] * 30
    assert max(a.seconds for a in answers) < BOUND
    # Ten callers of one assertion shared one exchange; each distinct assertion had its own.
    assert s.parts.auth.calls - calls == 1 + len(distinct)


async def test_slower_than_the_attempt_timeout(s: Stack) -> None:
    s.parts.auth.mode, s.parts.auth.delay = "slow", AS_ATTEMPT + 1.0
    s.pooled = SOCKET_SLACK + 5 + 5
    async with client_session() as session:
        answers = await asyncio.gather(
            *(fetch(session, f"{s.gateway.url}/hello", headers=s.fresh()) for _ in range(5))
        )
        await assert_cached_served(s)
    assert [a.status for a in answers] == [504] * 5
    assert max(a.seconds for a in answers) < BOUND


async def test_recovers_after_transient_failures(s: Stack) -> None:
    s.parts.auth.fail_next = 2  # two 500s, then a token: within the 3 attempts
    async with client_session() as session:
        answer = await fetch(session, f"{s.gateway.url}/hello", headers=s.fresh())
        text = (await fetch(session, f"{s.gateway.admin}/metrics")).body.decode()
    assert answer.status == 200
    assert answer.seconds < BOUND
    assert metric(text, "gateway_exchanges_total", server="as", outcome="ok") >= 2
