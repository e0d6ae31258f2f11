"""What a gateway finds in Redis is only served when it opens with a configured key, under
its own key name, for the same signed assertion; anything else is ignored and the gateway
exchanges for itself (and overwrites the bad entry with a good one), unless the assertion
has been exchanged already: then it is refused, never exchanged a second time."""

from __future__ import annotations

import hashlib
import time

import redis.asyncio as aioredis
from pydantic import SecretStr

from gateway.cache.entry import CachedToken
from gateway.cache.redis import EntrySealer, digest_name, entry_name
from gateway.devkit.idp import new_id
from gateway.values import Token

from .helpers import KEYS, Cluster, digest_of

PREFIX = "samlgw:"
SEALER = EntrySealer({"k1": SecretStr(KEYS["k1"])}, "k1")  # the gateways' own key


async def test_an_entry_bound_to_another_assertion_is_never_served(
    cluster: Cluster, raw_redis: aioredis.Redis
) -> None:
    auth = cluster.parts.auth
    a = cluster.spawn("a")
    profile = cluster.profile("a")
    assertion_id = new_id()
    assertion = cluster.assertion(assertion_id=assertion_id)
    name = entry_name(PREFIX, profile, assertion_id)
    # Sealed with the real key under this assertion's name, but for another assertion's
    # bytes (what a replayed ID with a different assertion would have produced).
    forged = CachedToken(
        cache_key=profile,
        assertion_id=assertion_id,
        digest=hashlib.sha256(b"<another assertion with the same ID/>").digest(),
        token=Token(access_token="forged-token", expires_in=3600),
        expires_at=time.time() + 3600,
    )
    await raw_redis.set(name, SEALER.seal(name, forged), px=60_000)

    status, token = await cluster.call(a, assertion)
    assert (status, token, auth.calls) == (200, auth.issued[0], 1)
    # the forged entry was replaced by the one this exchange produced
    stored = SEALER.open(name, await raw_redis.get(name))
    assert stored is not None
    assert stored.digest == digest_of(assertion)
    assert stored.token.access_token == auth.issued[0]
    assert "forged-token" not in a.logs()


async def test_a_flipped_byte_or_a_moved_entry_is_never_served(
    cluster: Cluster, raw_redis: aioredis.Redis
) -> None:
    auth = cluster.parts.auth
    a, b = cluster.spawn("a"), cluster.spawn("b")
    profile = cluster.profile("a")

    # One byte of the ciphertext flipped: authentication fails on the other gateway, which
    # knows from Redis that this assertion was exchanged: refused, not exchanged again.
    flipped_id = new_id()
    flipped = cluster.assertion(assertion_id=flipped_id)
    assert await cluster.call(a, flipped) == (200, auth.issued[0])
    # both copies: the one under the ID and the one under the digest of the bytes
    for name in (
        entry_name(PREFIX, profile, flipped_id),
        digest_name(PREFIX, profile, digest_of(flipped)),
    ):
        blob = bytearray(await raw_redis.get(name))
        blob[-20] ^= 0x01
        await raw_redis.set(name, bytes(blob), px=60_000)
    assert await cluster.call(b, flipped) == (401, None)
    assert auth.calls == 1

    # A valid blob copied to another assertion's key name: its associated data no longer
    # matches, so it does not open there (and its token is not handed out).
    source_id, target_id = new_id(), new_id()
    source = cluster.assertion(assertion_id=source_id)
    target = cluster.assertion(assertion_id=target_id)
    assert await cluster.call(a, source) == (200, auth.issued[1])
    copied = await raw_redis.get(entry_name(PREFIX, profile, source_id))
    await raw_redis.set(entry_name(PREFIX, profile, target_id), copied, px=60_000)
    assert await cluster.call(b, target) == (200, auth.issued[2])
    assert auth.calls == 3

    # Garbage where an entry should be: the same.
    garbage_id = new_id()
    await raw_redis.set(entry_name(PREFIX, profile, garbage_id), b"\x01\x02k1" + b"x" * 40)
    assert await cluster.call(b, cluster.assertion(assertion_id=garbage_id)) == (
        200,
        auth.issued[3],
    )
    assert auth.calls == 4

    rejected = b.logs()
    assert "redis entry rejected: authentication failed" in rejected
    for token in auth.issued:  # rejections are logged without their contents
        assert token not in rejected
