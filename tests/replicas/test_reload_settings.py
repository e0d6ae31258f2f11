"""A reload that changes an authorization server's settings: Redis must not hand back the
tokens obtained under the old ones (their cache key changes with the settings)."""

from __future__ import annotations

from pathlib import Path

import yaml
from integration.helpers import echoed_headers, start_stack

from .helpers import KEYS, Cluster, redis_cache


async def test_a_narrowed_scope_is_not_answered_from_redis(
    cluster: Cluster, tmp_path: Path
) -> None:
    folder = tmp_path / "gateway"
    folder.mkdir()
    cache = redis_cache(folder, cluster.redis.url, {"k1": KEYS["k1"]}, "k1")
    s = await start_stack(
        folder, cluster.idp, cluster.parts, cache=cache, server={"scope": "read write admin"}
    )
    try:
        auth, headers = cluster.parts.auth, s.assertion()
        async with s.session.get(f"{s.url}/echo/x", headers=headers) as r:
            assert r.status == 200
        config = yaml.safe_load(s.config_path.read_text())
        config["authorization_servers"]["as"]["scope"] = "read"
        s.config_path.write_text(yaml.safe_dump(config))
        assert await s.server.reload()
        async with s.session.get(f"{s.url}/echo/x", headers=headers) as r:
            assert r.status == 200
            seen = echoed_headers(await r.json())
        assert auth.calls == 2  # exchanged again under the new scope
        assert seen["authorization"] == f"Bearer {auth.issued[1]}"
    finally:
        await s.session.close()
        await s.server.close()
