"""Encryption keys rotate without a re-exchange: entries sealed under k1 are still served
after k2 becomes active (k1 still listed), and once k1 is removed they are ignored.

The authorization server accepts each assertion ID once, so a token that was not served
from Redis would show up as a refused exchange.
"""

from __future__ import annotations

import asyncio
import signal

import redis.asyncio as aioredis
import yaml
from integration.helpers import Process

from gateway.cache.redis import entry_name
from gateway.devkit.idp import new_id

from .helpers import KEYS, Cluster, eventually, redis_cache


async def sealed_with(raw: aioredis.Redis, profile: str, assertion_id: str) -> str:
    """The key ID stored in clear in front of an entry's ciphertext."""
    blob = await raw.get(entry_name("samlgw:", profile, assertion_id))
    return bytes(blob[2 : 2 + blob[1]]).decode()


async def reload_with_both_keys(cluster: Cluster, gateway: Process) -> None:
    """Make k2 active (k1 still listed) in the running gateway's file, then SIGHUP."""
    path = cluster.root / "a" / "gateway.yaml"
    config = yaml.safe_load(path.read_text())
    config["cache"] = redis_cache(path.parent, cluster.redis.url, KEYS, "k2")
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    gateway.proc.send_signal(signal.SIGHUP)

    async def reloaded() -> bool:
        return "config reloaded" in gateway.logs()

    assert await eventually(reloaded)


async def test_entries_sealed_under_the_old_key_are_read_after_rotation(
    cluster: Cluster, raw_redis: aioredis.Redis
) -> None:
    auth = cluster.parts.auth
    auth.one_time_use = True
    ids = {name: new_id() for name in ("first", "during_reload", "after_restart")}
    assertions = {name: cluster.assertion(assertion_id=i) for name, i in ids.items()}

    a = cluster.spawn("a")  # k1 only
    profile = cluster.profile("a")  # the same before and after: cache settings are not in it
    assert await cluster.call(a, assertions["first"]) == (200, auth.issued[0])
    assert await sealed_with(raw_redis, profile, ids["first"]) == "k1"

    # A reload does not swap cache settings (the cache outlives reloads); it says so, and
    # keeps sealing with the key it started with.
    await reload_with_both_keys(cluster, a)
    assert "config key 'cache' changed: it takes effect at the next restart" in a.logs()
    assert await cluster.call(a, assertions["during_reload"]) == (200, auth.issued[1])
    assert await sealed_with(raw_redis, profile, ids["during_reload"]) == "k1"

    # The restart applies it: k2 seals new entries, k1 still opens the old ones.
    a.proc.terminate()
    assert await asyncio.to_thread(a.proc.wait, 15) == 0
    a = cluster.spawn("a", keys=KEYS, active="k2")
    assert await cluster.call(a, assertions["first"]) == (200, auth.issued[0])
    assert await cluster.call(a, assertions["during_reload"]) == (200, auth.issued[1])
    assert await cluster.call(a, assertions["after_restart"]) == (200, auth.issued[2])
    assert await sealed_with(raw_redis, profile, ids["after_restart"]) == "k2"
    assert auth.calls == 3

    # A replica that no longer lists k1 ignores k1 entries: it exchanges itself (which
    # this one-time-use server refuses) and never serves what it cannot open.
    b = cluster.spawn("b", keys={"k2": KEYS["k2"]}, active="k2")
    assert await cluster.call(b, assertions["after_restart"]) == (200, auth.issued[2])
    assert await cluster.call(b, assertions["first"]) == (401, None)
    assert auth.calls == 4
    assert len(auth.refusals) == 1
    assert "redis entry under unknown encryption key id 'k1' ignored" in b.logs()
