"""The fixtures of this folder (they live in helpers.py; pytest finds them here)."""

from .helpers import (  # noqa: F401 (fixtures)
    client,
    cluster,
    idp,
    parts,
    processes,
    raw_redis,
    redis_server,
)
