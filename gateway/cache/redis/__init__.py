"""The Redis tier of the token cache, one concern per module: ``sealing`` (what an entry
looks like at rest and what its key is called), ``connect`` (a client for every URL kind),
``store`` (``RedisTokenStore``: the ``SharedStore`` on Redis)."""

from gateway.cache.redis.connect import connect_redis
from gateway.cache.redis.sealing import (
    EntrySealer,
    binding_name,
    digest_name,
    entry_name,
    lock_name,
)
from gateway.cache.redis.store import RedisTokenStore

__all__ = [
    "EntrySealer",
    "RedisTokenStore",
    "binding_name",
    "connect_redis",
    "digest_name",
    "entry_name",
    "lock_name",
]
