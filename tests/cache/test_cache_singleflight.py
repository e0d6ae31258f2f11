"""Single-flight: one exchange per assertion under concurrency; cancellation is contained."""

from __future__ import annotations

import asyncio
import gc

import pytest

from gateway.cache import TokenCache
from gateway.config import AuthorizationServer
from gateway.devkit.authorization_server import FakeAuthorizationServer
from gateway.errors import InvalidAssertion, UpstreamError
from gateway.oauth.client import TokenClient

from .helpers import Clock, Exchange, assertion, settings


async def test_200_concurrent_requests_make_one_exchange(fake_as: FakeAuthorizationServer) -> None:
    fake_as.mode, fake_as.delay = "slow", 0.2  # keep the exchange open while callers pile up
    profile = AuthorizationServer.model_validate(
        {
            "token_url": fake_as.token_url,
            "audience": "x",
            "client_id": "gateway",
            "client_secret": "s3cret",
        }
    )
    client = TokenClient({"as": profile})
    cache = TokenCache(settings())
    presented = assertion()

    async def request() -> str:
        entry = cache.lookup("as", presented.digest)
        if entry is None:
            entry = await cache.obtain("as", presented, lambda a: client.exchange("as", a.raw))
        return entry.token.access_token

    try:
        tokens = await asyncio.wait_for(asyncio.gather(*(request() for _ in range(200))), 10)
    finally:
        await client.close()
    assert fake_as.calls == 1  # the AS enforces one-time use: a second call would fail
    assert set(tokens) == {fake_as.issued[0]}
    assert cache.waiters == 0 and cache.in_flight == 0


async def test_waiters_are_counted_while_they_wait() -> None:
    exchange = Exchange()
    exchange.gate = asyncio.Event()
    cache = TokenCache(settings(), clock=Clock())
    presented = assertion()
    tasks = [asyncio.create_task(cache.obtain("as", presented, exchange)) for _ in range(5)]
    await asyncio.wait_for(exchange.started.wait(), 5)
    await asyncio.sleep(0)
    assert cache.waiters == 4 and cache.in_flight == 1
    exchange.gate.set()
    entries = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert len({id(e) for e in entries}) == 1
    assert cache.waiters == 0 and len(exchange.calls) == 1


async def test_cancelled_callers_do_not_cancel_the_exchange() -> None:
    exchange = Exchange()
    exchange.gate = asyncio.Event()
    cache = TokenCache(settings(), clock=Clock())
    presented = assertion()
    leader = asyncio.create_task(cache.obtain("as", presented, exchange))
    await asyncio.wait_for(exchange.started.wait(), 5)
    follower = asyncio.create_task(cache.obtain("as", presented, exchange))
    survivor = asyncio.create_task(cache.obtain("as", presented, exchange))
    await asyncio.sleep(0)
    leader.cancel()  # the caller that started the exchange disconnects…
    follower.cancel()  # …and so does a waiter
    with pytest.raises(asyncio.CancelledError):
        await leader
    with pytest.raises(asyncio.CancelledError):
        await follower
    gc.collect()  # the running exchange must not depend on its callers' references
    exchange.gate.set()
    entry = await asyncio.wait_for(survivor, 5)
    assert entry.token.access_token == "tok-1"
    assert len(exchange.calls) == 1


async def test_exchange_finishes_and_is_cached_when_every_caller_left() -> None:
    exchange = Exchange()
    exchange.gate = asyncio.Event()
    cache = TokenCache(settings(), clock=Clock())
    presented = assertion()
    only = asyncio.create_task(cache.obtain("as", presented, exchange))
    await asyncio.wait_for(exchange.started.wait(), 5)
    only.cancel()
    with pytest.raises(asyncio.CancelledError):
        await only
    gc.collect()
    exchange.gate.set()
    for _ in range(100):  # bounded: a few loop turns let the shielded exchange finish
        if cache.in_flight == 0:
            break
        await asyncio.sleep(0.01)
    assert cache.lookup("as", presented.digest) is not None
    assert len(exchange.calls) == 1


async def test_every_waiter_sees_the_failure_and_it_is_not_kept() -> None:
    exchange = Exchange()
    exchange.gate = asyncio.Event()
    exchange.error = UpstreamError("as_server_error")
    cache = TokenCache(settings(), clock=Clock())
    presented = assertion()
    tasks = [asyncio.create_task(cache.obtain("as", presented, exchange)) for _ in range(3)]
    await asyncio.wait_for(exchange.started.wait(), 5)
    exchange.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, UpstreamError) for r in results)
    assert cache.in_flight == 0
    exchange.error = None
    await cache.obtain("as", presented, exchange)
    assert len(exchange.calls) == 2


async def test_other_assertion_with_an_id_in_flight_is_a_replay() -> None:
    exchange = Exchange()
    exchange.gate = asyncio.Event()
    cache = TokenCache(settings(), clock=Clock())
    original = asyncio.create_task(cache.obtain("as", assertion("_x"), exchange))
    await asyncio.wait_for(exchange.started.wait(), 5)
    with pytest.raises(InvalidAssertion) as raised:
        await cache.obtain("as", assertion("_x", body="mallory"), exchange)
    assert raised.value.reason == "replay" and cache.replays == 1
    exchange.gate.set()
    await asyncio.wait_for(original, 5)
    assert exchange.calls == ["_x"]


async def test_close_cancels_exchanges_in_flight() -> None:
    exchange = Exchange()
    exchange.gate = asyncio.Event()
    cache = TokenCache(settings(), clock=Clock())
    caller = asyncio.create_task(cache.obtain("as", assertion(), exchange))
    await asyncio.wait_for(exchange.started.wait(), 5)
    await cache.close()
    assert cache.in_flight == 0
    with pytest.raises(asyncio.CancelledError):
        await caller
