"""The Redis tier of the token cache: shared by replicas, encrypted at rest, never in the way.

Rules this module owns:

- **A dead store behaves like an empty one.** Every call is bounded by ``settings.timeout``
  (``asyncio.timeout`` around each command, plus socket timeouts and no client-side retries)
  and never raises for a store fault. The store keeps one state, up or down, logs one line
  per change (logger ``gateway.cache.redis``), naming the cause (the exception's message,
  passwords masked), and tells ``on_state``. While down it retries after 50 ms, then
  backs off by doubling to once per ``retry_interval`` (one caller probes, the others
  return at once), so a dead Redis costs requests nothing and a blip is over quickly.
- **Health is a write and a read** (``ping``: a probe key set and read back), so a cluster
  that refuses keys, or a Sentinel master that is gone or demoted, reads as down.
- **Tokens are encrypted at rest** with AES-256-GCM. Each configured secret
  (``encryption_keys``: key ID → secret string) is stretched into a 256-bit key with
  HKDF-SHA256, so any high-entropy string works (``openssl rand -base64 32`` is a good
  one; secrets under 16 characters are refused). The key ID is stored in clear beside the
  ciphertext: ``active_key`` encrypts new entries, every configured key still decrypts, so
  keys rotate by adding the new one, making it active, and removing the old one after the
  longest token lifetime.
- **Ciphertext is bound to its Redis key**: the key name and key ID are AES-GCM associated
  data, so an entry copied to another key, a changed key ID or a flipped byte all fail
  authentication and read as a miss.
- **Key names reveal nothing**: ``prefix + "t:" + SHA-256(profile, assertion ID)``. A plain
  (domain-separated, length-prefixed) hash rather than an HMAC under an encryption key,
  so names stay stable across key rotation; assertion IDs are random by the SAML spec,
  and the name is useless without the assertion it was derived from.
- Entries carry the same digest binding and expiry as in memory; the Redis key expires
  with the token (``PX`` from ``expires_at``). A wrong digest is returned as-is: the cache
  compares it and refuses.
- **Assertion IDs are bound** to the fingerprint of their signed assertion (``bind_id``):
  ``prefix + "b:" + SHA-256(profile, assertion ID)``, the fingerprint sealed like an entry,
  set only if absent (one Lua script: read, or write with ``PX`` until ``until``), so the
  first replica to bind an ID wins and every other one learns what it is bound to.
- Cross-replica single-flight is a plain lock (``SET NX PX``, renewed while the exchange
  runs, compare-and-delete release). Correctness never depends on it. While Redis is down
  every replica owns its exchanges (no waiting for a result a dead store cannot carry).

URL kinds (``cache.redis.url``), all through redis-py's asyncio client:

- ``redis://[user:pass@]host:port/db``, ``rediss://…`` (TLS; ``ca_file`` is the CA bundle,
  system CAs otherwise), ``unix:///path/redis.sock?db=0`` → ``redis.asyncio.Redis.from_url``.
- ``redis+sentinel://[user:pass@]host:port[,host:port…]/service_name[/db]`` →
  ``redis.asyncio.sentinel.Sentinel([(host, port), …]).master_for(service_name, db=db)``.
  The URL's credentials (if any) authenticate to the sentinels; ``password`` authenticates
  to the master. TLS to the master when ``ca_file`` is set.
- ``redis+cluster://[user:pass@]host:port[,host:port…]`` →
  ``redis.asyncio.cluster.RedisCluster(startup_nodes=[ClusterNode(host, port), …])``; the
  other nodes are discovered. TLS when ``ca_file`` is set. No database number in cluster mode.

``password``, when set, wins over a password in the URL (it comes from a secret reference).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import SecretStr
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from gateway.cache.entry import CachedToken
from gateway.config import RedisSettings, url_password
from gateway.errors import ConfigError
from gateway.oauth.token import Token

logger = logging.getLogger("gateway.cache.redis")

RedisClient = Redis | RedisCluster
_T = TypeVar("_T")

# What a store fault looks like from redis-py (RedisClusterException is not a RedisError).
_FAULTS = (RedisError, RedisClusterException, OSError, TimeoutError)


# One immediate retry, so a pooled connection that went stale (a Redis restart, a failover)
# is replaced inside the same call; the store's timeout still bounds the whole call.
def _one_retry() -> Retry:
    return Retry(NoBackoff(), 1)  # a fresh one per client: redis-py mutates Retry objects


# While down, the first retry comes this soon (seconds), then each wait doubles up to
# retry_interval.
_FIRST_RETRY = 0.05
_PROBE_TTL_MS = 10_000  # a probe key outlives no replica that stopped probing for long
_MASTER_CHECK = 0.5  # seconds between "who is the master?" asks of the sentinels

# the lock call's fault default: tells "Redis did not answer" from "taken" (None)
_STORE_DOWN: object = object()

_MIN_SECRET_CHARS = 16
_HKDF_INFO = b"saml-oauth-gateway/redis-token-store/v1"
_ENVELOPE_VERSION = 1
_NONCE_BYTES = 12
_AAD_TAG = b"samlgw-token-v1\x00"
_NAME_TAG = b"samlgw-key-v1\x00"

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


# --- key names and sealed entries (pure: no I/O) -----------------------------------------


def entry_name(prefix: str, profile: str, assertion_id: str) -> bytes:
    """The Redis key of one cache entry; reveals neither the profile nor the assertion ID."""
    return prefix.encode() + b"t:" + _hash_name(profile, assertion_id)


def lock_name(prefix: str, profile: str, assertion_id: str) -> bytes:
    """The Redis key of the cross-replica exchange lock for one assertion."""
    return prefix.encode() + b"l:" + _hash_name(profile, assertion_id)


def binding_name(prefix: str, profile: str, assertion_id: str) -> bytes:
    """The Redis key binding one assertion ID to its signed assertion's fingerprint."""
    return prefix.encode() + b"b:" + _hash_name(profile, assertion_id)


def _hash_name(profile: str, assertion_id: str) -> bytes:
    digest = hashlib.sha256(_NAME_TAG)
    for part in (profile.encode(), assertion_id.encode()):
        # length prefixes: ("ab", "c") and ("a", "bc") must not collide
        digest.update(len(part).to_bytes(4, "big") + part)
    return digest.hexdigest().encode()


def derive_key(secret: str) -> bytes:
    """The AES-256 key for one configured secret (HKDF-SHA256, no salt, fixed info)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(
        secret.encode()
    )


class EntrySealer:
    """Encrypts ``CachedToken`` values for one Redis key name, and opens them again.

    Layout: ``version(1) | len(key_id)(1) | key_id | nonce(12) | AES-GCM(json) + tag(16)``;
    associated data = tag, Redis key name and key ID, so the blob only opens where written.
    """

    def __init__(self, keys: Mapping[str, SecretStr], active_key: str) -> None:
        problems = []
        for key_id, secret in keys.items():
            where = f"cache.redis.encryption_keys.{key_id}"
            if not 0 < len(key_id.encode()) <= 255:
                problems.append(f"{where}: key IDs are 1 to 255 bytes")
            if len(secret.get_secret_value()) < _MIN_SECRET_CHARS:
                problems.append(
                    f"{where}: secret is too short ({_MIN_SECRET_CHARS}+ characters; "
                    "e.g. `openssl rand -base64 32`)"
                )
        if active_key not in keys:
            problems.append(f"cache.redis.active_key: {active_key!r} is not in 'encryption_keys'")
        if problems:
            raise ConfigError(problems)
        self._ciphers = {
            key_id: AESGCM(derive_key(secret.get_secret_value())) for key_id, secret in keys.items()
        }
        self._active = active_key
        self._warned_ids: set[str] = set()

    def __repr__(self) -> str:  # keys must never show up in a log or a traceback
        return f"EntrySealer(active_key={self._active!r}, keys={sorted(self._ciphers)!r})"

    def seal(self, name: bytes, entry: CachedToken) -> bytes:
        return self.seal_bytes(name, json.dumps(_to_json(entry), separators=(",", ":")).encode())

    def open(self, name: bytes, blob: bytes) -> CachedToken | None:
        """The entry, or None (with a log line saying why) when it cannot be trusted."""
        plain = self.open_bytes(name, blob)
        if plain is None:
            return None
        try:
            return _from_json(json.loads(plain))
        except (ValueError, TypeError, KeyError):
            _rejected("malformed payload")
            return None

    def seal_bytes(self, name: bytes, plain: bytes) -> bytes:
        key_id = self._active.encode()
        header = bytes((_ENVELOPE_VERSION, len(key_id))) + key_id
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._ciphers[self._active].encrypt(nonce, plain, _aad(name, key_id))
        return header + nonce + sealed

    def open_bytes(self, name: bytes, blob: bytes) -> bytes | None:
        """The plaintext sealed for ``name``, or None (logged) when it cannot be trusted."""
        if len(blob) < 2 or blob[0] != _ENVELOPE_VERSION:
            _rejected("unknown envelope version")
            return None
        end = 2 + blob[1]
        key_id = blob[2:end]
        nonce, sealed = blob[end : end + _NONCE_BYTES], blob[end + _NONCE_BYTES :]
        if len(nonce) != _NONCE_BYTES or len(sealed) < 16:
            _rejected("truncated envelope")
            return None
        cipher = self._ciphers.get(key_id.decode("utf-8", "replace"))
        if cipher is None:
            shown = key_id.decode("utf-8", "replace")
            # once per key ID: during a rolling key change this is expected, not an attack
            if shown not in self._warned_ids and len(self._warned_ids) < 64:
                self._warned_ids.add(shown)
                logger.warning("redis entry under unknown encryption key id %r ignored", shown)
            return None
        try:
            return cipher.decrypt(nonce, sealed, _aad(name, key_id))
        except InvalidTag:
            _rejected("authentication failed (tampered, moved to another key, or wrong key)")
            return None


def _aad(name: bytes, key_id: bytes) -> bytes:
    return _AAD_TAG + len(name).to_bytes(4, "big") + name + key_id


def _rejected(reason: str) -> None:
    logger.warning("redis entry rejected: %s", reason)


def _to_json(entry: CachedToken) -> dict[str, Any]:
    token = entry.token
    return {
        "p": entry.profile,
        "i": entry.assertion_id,
        "d": base64.b64encode(entry.digest).decode(),
        "x": entry.expires_at,
        "a": token.access_token,
        "n": token.expires_in,
        "s": token.scope,
        "y": token.token_type,
        "r": entry.issuer,
        "f": base64.b64encode(entry.fingerprint).decode(),
    }


def _from_json(data: Any) -> CachedToken:
    if not isinstance(data, dict):
        raise TypeError("payload is not an object")
    strings = (data["p"], data["i"], data["d"], data["a"], data["y"], data["r"])
    numbers = (data["x"], data["n"])
    if not all(isinstance(v, str) for v in strings):
        raise TypeError("expected strings")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers):
        raise TypeError("expected numbers")
    if data["s"] is not None and not isinstance(data["s"], str):
        raise TypeError("scope must be a string")
    fingerprint = data.get("f", "")  # absent in entries written before fingerprints
    if not isinstance(fingerprint, str):
        raise TypeError("expected a string")
    token = Token(
        access_token=data["a"], expires_in=float(data["n"]), scope=data["s"], token_type=data["y"]
    )
    return CachedToken(
        profile=data["p"],
        assertion_id=data["i"],
        digest=base64.b64decode(data["d"], validate=True),
        token=token,
        expires_at=float(data["x"]),
        issuer=data["r"],
        fingerprint=base64.b64decode(fingerprint, validate=True),
    )


# --- connecting ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MultiHostUrl:
    """A ``redis+sentinel://`` or ``redis+cluster://`` URL taken apart."""

    hosts: tuple[tuple[str, int], ...]
    path: tuple[str, ...]  # non-empty path segments: (service_name, db) for sentinel
    username: str | None
    password: str | None = None

    def __repr__(self) -> str:  # the URL password is a secret
        return f"MultiHostUrl(hosts={self.hosts!r}, path={self.path!r})"


def parse_multi_host_url(url: str, default_port: int) -> MultiHostUrl:
    """Split ``scheme://[user:pass@]host[:port][,host[:port]…]/path`` (urlsplit can't)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    username = password = None
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        user, _, pwd = userinfo.partition(":")
        username, password = unquote(user) or None, unquote(pwd) or None
    hosts = []
    for item in netloc.split(","):
        if not item:
            raise ConfigError([f"cache.redis.url: empty host in {_public_url(url)!r}"])
        if item.startswith("["):  # [IPv6]:port
            host, _, rest = item[1:].partition("]")
            port_text = rest.removeprefix(":")
        else:
            host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
        try:
            port = int(port_text) if port_text else default_port
        except ValueError:
            raise ConfigError([f"cache.redis.url: bad port in {_public_url(url)!r}"]) from None
        if not host or not 0 < port < 65536:
            raise ConfigError([f"cache.redis.url: bad host:port in {_public_url(url)!r}"])
        hosts.append((host, port))
    path = tuple(unquote(p) for p in parts.path.split("/") if p)
    return MultiHostUrl(tuple(hosts), path, username, password)


def _public_url(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    userinfo, host = parts.netloc.rsplit("@", 1)
    user = userinfo.partition(":")[0]
    return parts._replace(netloc=f"{user}@{host}" if user else host).geturl()


class _AskSentinels:
    """Mixed into redis-py's sentinel connections: every (re)connect asks the sentinels where
    the master is. redis-py asks only when the pool hands out an unconnected connection; its
    retry after a broken command reconnects to the old address, which after a failover may
    still answer and take writes until the sentinels demote it."""

    async def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        pool: Any = getattr(self, "connection_pool")  # noqa: B009  (set by redis-py)
        if not getattr(self, "is_connected"):  # noqa: B009
            self.host, self.port = await pool.get_master_address()
        await super().connect_check_health(*args, **kwargs)  # type: ignore[misc]


class _MasterConnection(_AskSentinels, SentinelManagedConnection):
    pass


class _MasterTLSConnection(_AskSentinels, SentinelManagedSSLConnection):
    pass


class _SentinelMaster(Redis):
    """The master client of a Sentinel setup. It asks the sentinels who the master is every
    ``_MASTER_CHECK`` seconds and, when that changes, drops its connections to the old one,
    since a master failed over while it is alive keeps taking writes for seconds until the
    sentinels demote it, and replicas left on it would share nothing with those on the new
    one. Closing it also closes the sentinel clients."""

    _follower: asyncio.Task[None] | None = None
    on_switch: Callable[[], None] | None = None  # told when the master changed

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if self._follower is None:  # started by the first command: a loop is running then
            self._follower = asyncio.create_task(self._follow_master(), name="redis-sentinel")
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]

    async def _follow_master(self) -> None:
        pool: Any = self.connection_pool
        known = None
        while True:
            await asyncio.sleep(_MASTER_CHECK)
            try:
                address = await pool.sentinel_manager.discover_master(pool.service_name)
            except _FAULTS:
                continue  # no master now: the store's own calls fail and back off
            if known is not None and address != known:
                # in use: dropped when released (the command in flight ends first);
                # idle: dropped now; either reconnects through the sentinels
                await pool.update_active_connections_for_reconnect()
                await pool.disconnect(inuse_connections=False)
                if self.on_switch is not None:
                    self.on_switch()
            known = address

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.wait([self._follower])
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        await super().aclose(close_connection_pool)
        for sentinel in getattr(manager, "sentinels", ()):
            await sentinel.aclose()


def uses_tls(settings: RedisSettings) -> bool:
    """Whether the data connections (the master, the cluster nodes) speak TLS: always for
    ``rediss://``; for sentinel and cluster URLs, which have no TLS scheme of their own,
    when ``ca_file`` or ``cert_file`` is set. ``redis://`` with either is a config error."""
    scheme = urlsplit(settings.url).scheme
    return scheme == "rediss" or (
        scheme in ("redis+sentinel", "redis+cluster")
        and (settings.ca_file is not None or settings.cert_file is not None)
    )


def tls_options(settings: RedisSettings) -> dict[str, Any]:
    """redis-py's TLS keywords, the same for every URL kind: the server's certificate is
    verified against ``ca_file`` (system CAs without it) and must name the host connected
    to; ``cert_file``/``key_file`` answer a server that asks for a client certificate."""
    return {
        "ssl": True,
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
        "ssl_ca_certs": settings.ca_file,
        "ssl_certfile": settings.cert_file,
        "ssl_keyfile": settings.key_file,
    }


def connect_redis(settings: RedisSettings) -> RedisClient:
    """A redis-py asyncio client for any URL kind this gateway accepts (see module doc).

    Connections are lazy: nothing is contacted here. Socket timeouts are the store's
    ``timeout`` and redis-py's own retries are off, since the store bounds every call.
    """
    scheme = urlsplit(settings.url).scheme
    password = settings.password.get_secret_value() if settings.password else None
    common: dict[str, Any] = {
        "socket_timeout": settings.timeout,
        "socket_connect_timeout": settings.timeout,
        "decode_responses": False,
    }
    tls = tls_options(settings)
    if scheme in ("redis", "rediss", "unix"):
        extra = dict(common, retry=_one_retry())
        url = settings.url
        if password is not None:
            extra["password"] = password
            url = _without_password(url)  # from_url lets the URL's password win otherwise
        if scheme == "rediss":
            tls.pop("ssl")  # the scheme says it; from_url refuses the key with it
            extra.update(tls)
        return Redis.from_url(url, **extra)
    if scheme == "redis+sentinel":
        target = parse_multi_host_url(settings.url, default_port=26379)
        if not 1 <= len(target.path) <= 2:
            raise ConfigError(
                [
                    "cache.redis.url: expected redis+sentinel://host:port[,host:port]"
                    f"/service_name[/db], got {_public_url(settings.url)!r}"
                ]
            )
        try:
            db = int(target.path[1]) if len(target.path) == 2 else 0
        except ValueError:
            raise ConfigError(["cache.redis.url: the database must be a number"]) from None
        sentinel_kwargs = dict(common, username=target.username, password=target.password)
        # redis-py leaves Sentinel's constructor unannotated
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(target.hosts), sentinel_kwargs=sentinel_kwargs, retry=_one_retry()
        )
        master_kwargs = dict(common, db=db, password=password, connection_class=_MasterConnection)
        if uses_tls(settings):
            master_kwargs.update(tls, connection_class=_MasterTLSConnection)
        client: Redis = sentinel.master_for(
            target.path[0], redis_class=_SentinelMaster, **master_kwargs
        )
        return client
    if scheme == "redis+cluster":
        target = parse_multi_host_url(settings.url, default_port=6379)
        if target.path:
            raise ConfigError(["cache.redis.url: a cluster URL has no path (no database)"])
        kwargs = dict(common, username=target.username, password=password or target.password)
        if uses_tls(settings):
            kwargs.update(tls)
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.hosts],
            retry=_one_retry(),
            **kwargs,
        )
    raise ConfigError([f"cache.redis.url: unsupported scheme {scheme!r}"])


# --- the store ----------------------------------------------------------------------------


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
        if isinstance(self._client, _SentinelMaster):  # a new master: probe it at once
            self._client.on_switch = self._retry_now
        # one probe key per store, so replicas probing at once never read each other's
        self._probe_name = self._prefix.encode() + b"h:" + secrets.token_hex(8).encode()

    def __repr__(self) -> str:
        return f"RedisTokenStore(url={_public_url(self._settings.url)!r}, healthy={self.healthy})"

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

    async def get(self, profile: str, assertion_id: str) -> CachedToken | None:
        name = entry_name(self._prefix, profile, assertion_id)
        blob = await self._call("get", lambda: self._client.get(name), None)
        if not isinstance(blob, bytes):
            return None
        entry = self._sealer.open(name, blob)
        if entry is None:
            return None
        if (entry.profile, entry.assertion_id) != (profile, assertion_id):
            _rejected("entry belongs to another assertion")
            return None
        if entry.expires_at <= self._wall():
            return None
        return entry

    async def put(self, entry: CachedToken) -> None:
        ttl_ms = math.ceil((entry.expires_at - self._wall()) * 1000)
        if ttl_ms <= 0:
            return
        name = entry_name(self._prefix, entry.profile, entry.assertion_id)
        blob = self._sealer.seal(name, entry)
        await self._call("put", lambda: self._client.set(name, blob, px=ttl_ms), None)

    async def delete(self, profile: str, assertion_id: str) -> None:
        name = entry_name(self._prefix, profile, assertion_id)
        await self._call("delete", lambda: self._client.delete(name), None)

    async def bind_id(
        self, profile: str, assertion_id: str, fingerprint: bytes, until: float
    ) -> bytes | None:
        """Record that ``assertion_id`` belongs to the signed assertion ``fingerprint`` until
        ``until`` (time.time() seconds), unless a live binding exists. Returns the fingerprint
        already bound (equal to ``fingerprint`` or not), or None when this call recorded it or
        the store is down."""
        ttl_ms = math.ceil((until - self._wall()) * 1000)
        if ttl_ms <= 0:
            return None  # nothing left to bind: the assertion is no longer accepted
        name = binding_name(self._prefix, profile, assertion_id)
        blob = self._sealer.seal_bytes(name, fingerprint)
        bound = await self._call("bind", lambda: self._bind(keys=[name], args=[blob, ttl_ms]), None)
        if not isinstance(bound, bytes):
            return None
        # A binding that does not open (tampered, or under a key no longer listed) names no
        # assertion we can compare with: like a store fault, it binds nothing.
        return self._sealer.open_bytes(name, bound)

    @asynccontextmanager
    async def exchange_lock(self, profile: str, assertion_id: str) -> AsyncIterator[bool]:
        """Yields True when this replica owns the exchange (or Redis is down), False when
        another replica does. Renewed every ``lock_ttl / 3`` while held, released only by us."""
        name = lock_name(self._prefix, profile, assertion_id)
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
        renewal = asyncio.create_task(self._keep_lock(name, owner), name="redis-lock-renewal")
        try:
            yield True
        finally:
            renewal.cancel()
            # asyncio.wait neither raises the task's CancelledError nor swallows ours
            await asyncio.wait([renewal])
            await self._call("unlock", lambda: self._release(keys=[name], args=[owner]), None)

    async def _keep_lock(self, name: bytes, owner: bytes) -> None:
        interval = self._lock_ttl_ms / 3000
        ttl = self._lock_ttl_ms
        while True:
            await asyncio.sleep(interval)
            renewed = await self._call(
                "lock renewal", lambda: self._renew(keys=[name], args=[owner, ttl]), None
            )
            if renewed == 0:
                # expired and possibly taken by another replica: at worst two exchanges
                logger.info("exchange lock lost before the exchange finished")
                return

    async def close(self) -> None:
        with suppress(*_FAULTS):
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
        except _FAULTS as exc:
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
