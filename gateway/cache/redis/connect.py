"""Connecting to Redis: one redis-py asyncio client for every URL kind, TLS alike for all.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

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

from gateway.config import RedisSettings
from gateway.errors import ConfigError

RedisClient = Redis | RedisCluster


# One immediate retry, so a pooled connection that went stale (a Redis restart, a failover)
# is replaced inside the same call; the store's timeout still bounds the whole call.
def _one_retry() -> Retry:
    return Retry(NoBackoff(), 1)  # a fresh one per client: redis-py mutates Retry objects


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
            raise ConfigError([f"cache.redis.url: empty host in {public_url(url)!r}"])
        if item.startswith("["):  # [IPv6]:port
            host, _, rest = item[1:].partition("]")
            port_text = rest.removeprefix(":")
        else:
            host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
        try:
            port = int(port_text) if port_text else default_port
        except ValueError:
            raise ConfigError([f"cache.redis.url: bad port in {public_url(url)!r}"]) from None
        if not host or not 0 < port < 65536:
            raise ConfigError([f"cache.redis.url: bad host:port in {public_url(url)!r}"])
        hosts.append((host, port))
    path = tuple(unquote(p) for p in parts.path.split("/") if p)
    return MultiHostUrl(tuple(hosts), path, username, password)


def public_url(url: str) -> str:
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


# What a store fault looks like from redis-py (RedisClusterException is not a RedisError).
FAULTS = (RedisError, RedisClusterException, OSError, TimeoutError)
_MASTER_CHECK = 0.5  # seconds between "who is the master?" asks of the sentinels


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


class SentinelMaster(Redis):
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
            except FAULTS:
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
                    f"/service_name[/db], got {public_url(settings.url)!r}"
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
            target.path[0], redis_class=SentinelMaster, **master_kwargs
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
