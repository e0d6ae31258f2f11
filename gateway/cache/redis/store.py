"""The Redis tier of the token cache: shared by replicas, encrypted at rest, never in the way.

Rules this module owns (sealing: ``sealing.py``; URL kinds and TLS: ``connect.py``):

- **A dead store behaves like an empty one.** Every call is bounded by ``settings.timeout``
  (``asyncio.timeout`` around each command, plus socket timeouts and no client-side retries)
  and never raises for a store fault. The store keeps one state, up or down, logs one line
  per change (logger ``gateway.cache.redis``), naming the cause (the exception's message,
  passwords masked), and tells ``on_state``. While down it retries after 50 ms, then
  backs off by doubling to once per ``retry_interval`` (one caller probes, the others
  return at once), so a dead Redis costs requests nothing and a blip is over quickly.
- **Health is a write and a read** (``ping``: a probe key set and read back), so a cluster
  that refuses keys, or a Sentinel master that is gone or demoted, reads as down.
- Entries carry the same digest binding and expiry as in memory; the Redis key expires
  with the token (``PX`` from ``expires_at``). A wrong digest is returned as-is: the cache
  compares it and refuses.
- **Assertion IDs are bound** to the fingerprint of their signed assertion (``bind_id``):
  ``prefix + "b:" + SHA-256(cache_key, assertion ID)``, the fingerprint sealed like an entry,
  set only if absent (one Lua script: read, or write with ``PX`` until ``until``), so the
  first replica to bind an ID wins and every other one learns what it is bound to.
- Cross-replica single-flight is a plain lock (``SET NX PX``, renewed while the exchange
  runs, compare-and-delete release). Correctness never depends on it. While Redis is down
  every replica owns its exchanges (no waiting for a result a dead store cannot carry).

"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import TypeVar

from redis.exceptions import RedisError

from gateway.cache.entry import CachedToken
from gateway.cache.redis.connect import (
    FAULTS,
    RedisClient,
    SentinelMaster,
    connect_redis,
    public_url,
)
from gateway.cache.redis.sealing import (
    EntrySealer,
    binding_name,
    digest_name,
    entry_name,
    lock_name,
    rejected,
)
from gateway.config import RedisSettings, url_password

logger = logging.getLogger("gateway.cache.redis")

_T = TypeVar("_T")

# While down, the first retry comes this soon (seconds), then each wait doubles up to
# retry_interval.
_FIRST_RETRY = 0.05
_PROBE_TTL_MS = 10_000  # a probe key outlives no replica that stopped probing for long

# the lock call's fault default: tells "Redis did not answer" from "taken" (None)
_STORE_DOWN: object = object()

# Both scripts touch only KEYS[1], so they run unchanged on a cluster.
_RENEW_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
# Read the live binding, or record ours: atomic, so two replicas never both "win".
_BIND_LUA = """
local bound = redis.call('get', KEYS[1])
if bound then
  return bound
end
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""
_RELEASE_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class RedisTokenStore:
    """``SharedStore`` on Redis (see the module doc for the rules it keeps).

    ``on_state(up)`` is called on every state change (for a gauge); ``clock`` (monotonic)
    times the back-off, ``wall_clock`` is compared with ``CachedToken.expires_at``;
    ``retry_interval`` is the least time between probes while down; ``client`` replaces
    the one ``connect_redis`` would build. ``healthy`` is False until Redis first answers,
    so call ``ping()`` at startup when Redis is required for readiness.
    """

    def __init__(
        self,
        settings: RedisSettings,
        *,
        on_state: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        retry_interval: float = 1.0,
        client: RedisClient | None = None,
    ) -> None:
        self._settings = settings
        self._sealer = EntrySealer(settings.encryption_keys, settings.active_key)
        self._client = client if client is not None else connect_redis(settings)
        self._renew = self._client.register_script(_RENEW_LUA)
        self._release = self._client.register_script(_RELEASE_LUA)
        self._bind = self._client.register_script(_BIND_LUA)
        self._on_state = on_state
        self._clock = clock
        self._wall = wall_clock
        self._retry_interval = retry_interval
        self._prefix = settings.key_prefix
        self._timeout = settings.timeout
        self._lock_ttl_ms = max(1, int(settings.lock_ttl * 1000))
        # Passwords that an exception's message could repeat (a URL, an AUTH argument).
        self._secrets = [
            p
            for p in (
                settings.password.get_secret_value() if settings.password else None,
                url_password(settings.url),
            )
            if p
        ]
        self._up: bool | None = None  # unknown until the first call answers
        self._retry_at = 0.0
        self._backoff = min(_FIRST_RETRY, retry_interval)
        if isinstance(self._client, SentinelMaster):  # a new master: probe it at once
            self._client.on_switch = self._retry_now
        # one probe key per store, so replicas probing at once never read each other's
        self._probe_name = self._prefix.encode() + b"h:" + secrets.token_hex(8).encode()

    def __repr__(self) -> str:
        return f"RedisTokenStore(url={public_url(self._settings.url)!r}, healthy={self.healthy})"

    @property
    def healthy(self) -> bool:
        """True once Redis has answered and until a call fails (for /readyz)."""
        return self._up is True

    async def ping(self) -> bool:
        """Whether keys can be written and read now: a probe key set and read back. A PING
        would be answered by a cluster node while the cluster refuses keys, or by a Sentinel
        master since demoted to a read-only replica."""
        nonce = secrets.token_hex(8).encode()

        async def probe() -> bool:
            await self._client.set(self._probe_name, nonce, px=_PROBE_TTL_MS)
            if await self._client.get(self._probe_name) != nonce:
                raise RedisError("the probe key did not read back what was written")
            return True

        return await self._call("probe", probe, False)

    async def get(self, cache_key: str, assertion_id: str) -> CachedToken | None:
        name = entry_name(self._prefix, cache_key, assertion_id)
        entry = await self._read("get", name)
        if entry is not None and (entry.cache_key, entry.assertion_id) != (cache_key, assertion_id):
            rejected("entry belongs to another assertion")
            return None
        return entry

    async def find(self, cache_key: str, digest: bytes) -> CachedToken | None:
        name = digest_name(self._prefix, cache_key, digest)
        entry = await self._read("find", name)
        if entry is not None and (entry.cache_key, entry.digest) != (cache_key, digest):
            rejected("entry belongs to other bytes")
            return None
        return entry

    async def _read(self, op: str, name: bytes) -> CachedToken | None:
        """The live entry sealed under ``name``, or None (absent, expired, not opening)."""
        blob = await self._call(op, lambda: self._client.get(name), None)
        if not isinstance(blob, bytes):
            return None
        entry = self._sealer.open(name, blob)
        if entry is None or entry.expires_at <= self._wall():
            return None
        return entry

    async def put(self, entry: CachedToken) -> None:
        ttl_ms = math.ceil((entry.expires_at - self._wall()) * 1000)
        if ttl_ms <= 0:
            return
        # Each copy sealed for its own name (the associated data), so neither opens as the
        # other; markers (no digest) are found by ID only.
        names = [entry_name(self._prefix, entry.cache_key, entry.assertion_id)]
        if entry.digest:
            names.append(digest_name(self._prefix, entry.cache_key, entry.digest))
        blobs = [(name, self._sealer.seal(name, entry)) for name in names]

        async def store() -> None:
            # one command per key: on a cluster the two names live in different slots
            for name, blob in blobs:
                await self._client.set(name, blob, px=ttl_ms)

        await self._call("put", store, None)

    async def delete(self, cache_key: str, assertion_id: str, digest: bytes = b"") -> None:
        names = [entry_name(self._prefix, cache_key, assertion_id)]
        if digest:
            names.append(digest_name(self._prefix, cache_key, digest))

        async def remove() -> None:
            for name in names:
                await self._client.delete(name)

        await self._call("delete", remove, None)

    async def bind_id(
        self, cache_key: str, assertion_id: str, fingerprint: bytes, until: float
    ) -> bytes | None:
        """See ``SharedStore.bind_id``."""
        ttl_ms = math.ceil((until - self._wall()) * 1000)
        if ttl_ms <= 0:
            return None  # nothing left to bind: the assertion is no longer accepted
        name = binding_name(self._prefix, cache_key, assertion_id)
        blob = self._sealer.seal_bytes(name, fingerprint)
        bound = await self._call("bind", lambda: self._bind(keys=[name], args=[blob, ttl_ms]), None)
        if not isinstance(bound, bytes):
            return None
        # A binding that does not open (tampered, or under a key no longer listed) names no
        # assertion we can compare with: like a store fault, it binds nothing.
        return self._sealer.open_bytes(name, bound)

    @asynccontextmanager
    async def exchange_lock(self, cache_key: str, assertion_id: str) -> AsyncIterator[bool]:
        """Yields True when this replica owns the exchange (or Redis is down), False when
        another replica does. Renewed every ``lock_ttl / 3`` while held, released only by us."""
        name = lock_name(self._prefix, cache_key, assertion_id)
        owner = secrets.token_hex(16).encode()
        ttl = self._lock_ttl_ms
        acquired = await self._call(
            "lock", lambda: self._client.set(name, owner, nx=True, px=ttl), _STORE_DOWN
        )
        if acquired is _STORE_DOWN:
            # A dead store is an empty one: waiting for a result it cannot deliver would
            # cost every new assertion ``lock_wait`` seconds, so this replica goes itself.
            yield True
            return
        if not acquired:
            yield False
            return
        released = asyncio.Event()
        renewal = asyncio.create_task(
            self._keep_lock(name, owner, released), name="redis-lock-renewal"
        )
        try:
            yield True
        finally:
            released.set()
            renewal.cancel()
            # asyncio.wait neither raises the task's CancelledError nor swallows ours; bounded,
            # and the flag ends the loop, should a cancellation be lost inside a command
            # (seen once on a loaded machine: the release then waited forever).
            await asyncio.wait([renewal], timeout=self._timeout + self._lock_ttl_ms / 3000)
            await self._call("unlock", lambda: self._release(keys=[name], args=[owner]), None)

    async def _keep_lock(self, name: bytes, owner: bytes, released: asyncio.Event) -> None:
        interval = self._lock_ttl_ms / 3000
        ttl = self._lock_ttl_ms
        while not released.is_set():
            await asyncio.sleep(interval)
            if released.is_set():
                return
            renewed = await self._call(
                "lock renewal", lambda: self._renew(keys=[name], args=[owner, ttl]), None
            )
            if renewed == 0:
                # expired and possibly taken by another replica: at worst two exchanges
                logger.info("exchange lock lost before the exchange finished")
                return

    async def close(self) -> None:
        with suppress(*FAULTS):
            async with asyncio.timeout(self._timeout):
                await self._client.aclose()

    # --- fault handling -------------------------------------------------------------------

    async def _call(self, op: str, command: Callable[[], Awaitable[_T]], default: _T) -> _T:
        if self._up is False:
            now = self._clock()
            if now < self._retry_at:
                return default
            # this caller probes; the others keep returning at once until it answers
            self._retry_at = now + self._backoff
        try:
            async with asyncio.timeout(self._timeout):
                result = await command()
        except FAULTS as exc:
            self._failed(op, exc)
            return default
        if self._up is not True:
            self._backoff = min(_FIRST_RETRY, self._retry_interval)
            self._set_state(True, "redis store is up")
        return result

    def _retry_now(self) -> None:
        self._retry_at = 0.0
        self._backoff = min(_FIRST_RETRY, self._retry_interval)

    def _failed(self, op: str, exc: BaseException) -> None:
        # A blip (a restart, a failover) is over in well under a second: retry soon, then
        # less and less often, never less than once per retry_interval.
        self._retry_at = self._clock() + self._backoff
        retry_in = self._backoff
        self._backoff = min(self._backoff * 2, self._retry_interval)
        if self._up is not False:
            self._set_state(
                False,
                f"redis store is down ({op}: {self._cause(exc)}); serving without it, "
                f"retrying in {retry_in:g} s, backing off to every {self._retry_interval:g} s",
            )

    def _cause(self, exc: BaseException) -> str:
        """What went wrong, for the log: the exception's own words (a refused connection, a
        certificate that does not verify, a name mismatch), never a password."""
        if isinstance(exc, TimeoutError) and not str(exc):
            return "timed out"
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text[:300]

    def _set_state(self, up: bool, message: str) -> None:
        self._up = up
        (logger.info if up else logger.warning)(message)
        if self._on_state is not None:
            try:
                self._on_state(up)
            except Exception:  # an observer (a metric) must not break the store
                logger.exception("redis store state observer failed")
