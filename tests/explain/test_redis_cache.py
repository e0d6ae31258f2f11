"""With ``cache.backend: redis``, explain looks an accepted assertion up in the real Redis the
replicas share, and says what it found there without printing the token."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gateway.cache import TokenCache
from gateway.cache.entry import CachedToken
from gateway.cache.redis import RedisTokenStore
from gateway.config import load_config
from gateway.devkit.idp import DemoIdP
from gateway.devkit.redis_server import RedisServer, redis_server_binary
from gateway.metrics import Metrics
from gateway.pipeline import Pipeline
from gateway.saml import assertion_digest
from gateway.values import Token

from .helpers import AUDIENCE, ISSUER, NOW, SUBJECT, TOKEN_URL, Explain, b64, write_config

TOKEN = "access-token-that-must-never-be-printed"

pytestmark = pytest.mark.skipif(
    redis_server_binary() is None, reason="redis-server is not installed (make system-deps)"
)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_config(tmp_path: Path, idp: DemoIdP, redis: RedisServer) -> Path:
    path = write_config(tmp_path / "redis-conf", idp)
    data = yaml.safe_load(path.read_text())
    data["cache"] = {
        "backend": "redis",
        "redis": {
            "url": redis.url,
            "encryption_keys": {"k1": "explain-test-sealing-key-0123456789"},
            "active_key": "k1",
            "timeout": 2,
        },
    }
    path.write_text(yaml.safe_dump(data))
    return path


def _store(config_path: Path, assertion_id: str, digest: bytes) -> None:
    """Put a token into Redis the way a replica does, under the route's cache key."""
    config = load_config(config_path)
    runtime = Pipeline(config, TokenCache(config.cache), Metrics())
    profile = runtime.cache_key(config.routes[0])
    settings = config.cache.redis
    assert settings is not None
    entry = CachedToken(
        cache_key=profile,
        assertion_id=assertion_id,
        digest=digest,
        token=Token(access_token=TOKEN, expires_in=600),
        expires_at=time.time() + 600,
        issuer=ISSUER,
    )

    async def put() -> None:
        store = RedisTokenStore(settings)
        try:
            await store.put(entry)
        finally:
            await store.close()

    asyncio.run(put())


def test_explain_reports_the_shared_token_state(
    redis_config: Path, explain: Explain, idp: DemoIdP
) -> None:
    raw = idp.issue(
        SUBJECT, audience=AUDIENCE, recipient=TOKEN_URL, now=NOW, assertion_id="_shared-1"
    )
    before = explain(b64(raw), config_path=redis_config)
    assert before.last == "accepted"
    assert "cache: no token in Redis for this assertion ID" in before.out
    _store(redis_config, "_shared-1", assertion_digest(raw))
    after = explain(b64(raw), config_path=redis_config)
    assert after.last == "accepted"
    assert "cache: Redis holds a token issued for these very bytes, served for" in after.out
    assert TOKEN not in after.out + after.err
    # the same ID, another document: never served for this one
    other = idp.issue(
        "bob@explain.test",
        audience=AUDIENCE,
        recipient=TOKEN_URL,
        now=NOW,
        assertion_id="_shared-1",
    )
    assert other != raw
    reused = explain(b64(other), config_path=redis_config)
    assert "issued for other bytes" in reused.out


def test_explain_says_when_redis_does_not_answer(
    redis_config: Path, redis: RedisServer, explain: Explain, idp: DemoIdP
) -> None:
    redis.stop()
    raw = idp.issue(SUBJECT, audience=AUDIENCE, recipient=TOKEN_URL, now=NOW)
    result = explain(b64(raw), config_path=redis_config)
    assert result.last == "accepted"  # the verdict never depends on Redis
    assert "cache: Redis did not answer" in result.out
