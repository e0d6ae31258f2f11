"""Two ``TokenCache`` replicas over one real redis-server: what the lock holder tells the
waiting replicas when its exchange fails, and ``purge`` reaching Redis from any replica."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import redis.asyncio as aioredis

from gateway.cache import TokenCache
from gateway.cache.redis import RedisTokenStore, entry_name
from gateway.config import CacheSettings
from gateway.devkit.redis_server import RedisServer
from gateway.errors import GatewayError, InvalidAssertion
from gateway.saml.assertion import Assertion
from gateway.values import Token

StoreFactory = Callable[..., RedisTokenStore]
_ids = itertools.count(1)
LONG_WAIT = 60.0  # a waiting replica's shared_wait: far beyond the test's own guard
GUARD = 20.0  # seconds: the whole test, so a replica that waits LONG_WAIT fails it


def an_assertion() -> Assertion:
    assertion_id = f"_r{next(_ids):06d}{time.time_ns()}"
    signed = f'<saml:Assertion ID="{assertion_id}"><NameID>alice</NameID></saml:Assertion>'
    return Assertion(
        id=assertion_id,
        issuer="https://idp.test",
        subject="alice",
        audiences=("https://as.test",),
        recipient="https://as.test/token",
        not_on_or_after=datetime.now(UTC) + timedelta(hours=1),
        digest=hashlib.sha256(signed.encode()).digest(),
        raw=signed.encode(),
        fingerprint=hashlib.sha256(signed.encode()).digest(),
        clock_skew=timedelta(0),
    )


class AuthorizationServer:
    """The exchange both replicas call: counts calls; the first one can be held and failed."""

    def __init__(self) -> None:
        self.calls = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.first_fails_with: GatewayError | None = None

    async def exchange(self, presented: Assertion) -> Token:
        self.calls += 1
        if self.calls == 1:
            self.started.set()
            await asyncio.wait_for(self.release.wait(), GUARD)
            if self.first_fails_with is not None:
                raise self.first_fails_with
        return Token(access_token=f"tok-{self.calls}", expires_in=3600)


def replica(store: RedisTokenStore) -> TokenCache:
    return TokenCache(
        CacheSettings.model_validate({"jitter": 0}), shared=store, shared_wait=LONG_WAIT
    )


async def holder_fails(
    make_store: StoreFactory, failure: GatewayError
) -> tuple[AuthorizationServer, asyncio.Task[object], asyncio.Task[object]]:
    server = AuthorizationServer()
    server.first_fails_with = failure
    holder, waiter = replica(make_store()), replica(make_store())
    presented = an_assertion()
    held = asyncio.create_task(holder.obtain("as", presented, server.exchange))
    await asyncio.wait_for(server.started.wait(), GUARD)  # the holder has the lock
    waiting = asyncio.create_task(waiter.obtain("as", presented, server.exchange))
    await asyncio.sleep(0.1)  # the waiter found the lock taken and polls the store
    server.release.set()
    _, pending = await asyncio.wait([held, waiting], timeout=GUARD)
    for task in pending:  # a replica still waiting fails the test; do not leak it
        task.cancel()
    await asyncio.wait([held, waiting])
    return server, held, waiting


async def test_invalid_grant_stops_the_waiting_replica_at_once(make_store: StoreFactory) -> None:
    refused = InvalidAssertion("invalid_grant", "the AS refused the assertion")
    server, held, waiting = await holder_fails(make_store, refused)
    assert not waiting.cancelled(), "the waiting replica waited for the lock holder"
    for task in (held, waiting):
        error = task.exception()
        assert isinstance(error, InvalidAssertion) and error.reason == "invalid_grant"
    assert server.calls == 1  # the waiter did not ask the AS again


async def test_other_failures_let_the_waiting_replica_try_at_once(
    make_store: StoreFactory,
) -> None:
    server, held, waiting = await holder_fails(make_store, GatewayError("AS unreachable"))
    assert not waiting.cancelled(), "the waiting replica waited for the lock holder"
    assert isinstance(held.exception(), GatewayError)
    token = waiting.result()
    assert token.token.access_token == "tok-2"  # type: ignore[attr-defined]
    assert server.calls == 2


async def test_purge_deletes_from_redis_on_a_replica_that_never_held_the_entry(
    make_store: StoreFactory, redis_server: RedisServer
) -> None:
    server = AuthorizationServer()
    server.release.set()
    first, other = replica(make_store()), replica(make_store())
    presented = an_assertion()
    entry = await first.obtain("as", presented, server.exchange)
    name = entry_name("samlgw:", "as", presented.id)
    exchanged = entry_name("samlgw:", "as", presented.id + "\x00exchanged")
    async with aioredis.Redis.from_url(redis_server.url) as raw:
        assert await raw.exists(name, exchanged) == 2
        # the upstream refused the token on a replica that got it with the request only
        await other.purge(entry)
        assert await raw.exists(name, exchanged) == 0
    again = await other.obtain("as", presented, server.exchange)
    assert again.token.access_token == "tok-2"  # exchanged once more, not "spent"
