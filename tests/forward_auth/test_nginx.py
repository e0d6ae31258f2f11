"""A real nginx with auth_request in front of a real upstream, the gateway as the authorizer.

nginx runs the shipped examples (``config/forward-auth/nginx*.conf``) with only their
addresses and cache folder replaced, so what is tested is what operators copy.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from integration.conftest import Parts, Stack, echoed_headers, start_stack

from gateway.devkit.idp import DemoIdP

from .nginx_runner import (
    EXAMPLES,
    Nginx,
    example,
    free_port,
    missing_modules,
    nginx_binary,
    start_nginx,
)

pytestmark = pytest.mark.skipif(
    nginx_binary() is None, reason="nginx is not installed (make system-deps installs it)"
)


def _variant(name: str) -> object:
    """An nginx example as a parameter, skipped where a dynamic module it loads is absent."""
    missing = missing_modules((EXAMPLES / name).read_text())
    reason = f"{name} needs {', '.join(m.name for m in missing)} (make system-deps installs it)"
    return pytest.param(name, marks=pytest.mark.skipif(bool(missing), reason=reason))


# Every example that caches the gateway's answers in nginx must keep the same promises.
CACHED = [_variant("nginx-cached.conf"), _variant("nginx-cached-setmisc.conf")]
ALL = [_variant("nginx.conf"), *CACHED]

EXAMPLE_GATEWAY = yaml.safe_load((EXAMPLES / "gateway.yaml").read_text())


@dataclass
class Front:
    """nginx on ``url``, asking ``stack``'s gateway about every request."""

    nginx: Nginx
    stack: Stack
    url: str

    async def granted(self) -> float:
        """Forward-auth answers the gateway gave with 200 (nginx cache hits never count)."""
        return await self.stack.metric("gateway_requests_total", route="api", status="200")

    async def denied(self) -> float:
        return await self.stack.metric("gateway_requests_total", route="api", status="401")


StartFront = Callable[..., Awaitable[Front]]


@pytest.fixture
async def start_front(tmp_path: Path, idp: DemoIdP, parts: Parts) -> AsyncIterator[StartFront]:
    started: list[Front] = []

    async def start(conf: str, **overrides: Any) -> Front:
        stack = await start_stack(
            tmp_path,
            idp,
            parts,
            route={"path_prefix": "/echo"},
            # The example's forward-auth settings and assertion sources, on a free port.
            forward_auth={
                **EXAMPLE_GATEWAY["forward_auth"],
                "listen": {"host": "127.0.0.1", "port": 0},
            },
            assertion=EXAMPLE_GATEWAY["assertion"],
            **overrides,
        )
        port = free_port()
        body = example(
            conf,
            {
                "listen 80;": f"listen 127.0.0.1:{port};",
                "server 127.0.0.1:8081;": f"server 127.0.0.1:{stack.server.auth_port};",
                "server 127.0.0.1:9000;": f"server {parts.upstream_url.removeprefix('http://')};",
                **(
                    {"/var/cache/nginx/saml-auth": str(tmp_path / "nginx" / "cache")}
                    if "cached" in conf
                    else {}
                ),
            },
        )
        try:
            nginx = start_nginx(tmp_path / "nginx", body, [port])
        except BaseException:
            await stack.session.close()
            await stack.server.close()
            raise
        front = Front(nginx, stack, f"http://127.0.0.1:{port}")
        started.append(front)
        return front

    yield start
    for front in started:
        front.nginx.stop()
        await front.stack.session.close()
        await front.stack.server.close()


def tampered(stack: Stack) -> dict[str, str]:
    """A signed assertion whose subject was changed afterwards: the signature must fail."""
    raw = stack.raw_assertion("alice@example.test").replace(b"alice@", b"mallory@", 1)
    return {"X-SAML-Assertion": base64.b64encode(raw).decode()}


@pytest.mark.parametrize("conf", ALL)
async def test_valid_assertion_reaches_upstream_with_the_issued_token(
    start_front: StartFront, conf: str
) -> None:
    front = await start_front(conf)
    session, auth, upstream = front.stack.session, front.stack.auth, front.stack.upstream
    # A client-supplied Authorization must not survive either.
    headers = {**front.stack.assertion(), "Authorization": "Bearer forged-by-client"}
    async with session.get(f"{front.url}/echo/orders?id=7", headers=headers) as r:
        assert r.status == 200, front.nginx.errors()
        seen = echoed_headers(await r.json())
    assert auth.calls == 1
    assert seen["authorization"] == f"Bearer {auth.issued[0]}"
    assert "x-saml-assertion" not in seen
    assert upstream.requests == 1


@pytest.mark.parametrize("conf", ALL)
async def test_invalid_or_missing_assertion_is_401_and_never_reaches_upstream(
    start_front: StartFront, conf: str
) -> None:
    front = await start_front(conf)
    session, upstream = front.stack.session, front.stack.upstream
    for headers in (tampered(front.stack), tampered(front.stack), {}):
        async with session.get(f"{front.url}/echo/x", headers=headers) as r:
            assert r.status == 401
            # nginx passes the gateway's challenge on, nothing else of its answer.
            assert r.headers["WWW-Authenticate"] == 'SAML realm="test-api"'  # the route's
    assert upstream.requests == 0
    assert front.stack.auth.calls == 0  # a bad signature never reaches the authorization server
    assert await front.denied() == 3  # denials are never cached


async def test_gateway_errors_other_than_401_become_500(start_front: StartFront) -> None:
    front = await start_front("nginx.conf")
    session, stack = front.stack.session, front.stack
    async with session.get(f"{front.url}/hello", headers=stack.assertion()) as r:
        assert r.status == 500  # the gateway said 404: no route for /hello
    stack.auth.mode = "invalid_client"
    async with session.get(f"{front.url}/echo/x", headers=stack.assertion("bob@x")) as r:
        assert r.status == 500  # the gateway said 502
    assert stack.upstream.requests == 0


@pytest.mark.parametrize("conf", CACHED)
async def test_cached_answer_spares_the_gateway(start_front: StartFront, conf: str) -> None:
    front = await start_front(conf)
    stack = front.stack
    session, auth = stack.session, stack.auth
    alice = stack.assertion()
    tokens = []
    for method, path in (("GET", "/echo/1"), ("GET", "/echo/2"), ("POST", "/echo/3")):
        async with session.request(method, f"{front.url}{path}", headers=alice, data=b"x") as r:
            assert r.status == 200, front.nginx.errors()
            tokens.append(echoed_headers(await r.json())["authorization"])
    assert tokens == [f"Bearer {auth.issued[0]}"] * 3
    assert await front.granted() == 1  # the second and third never left nginx
    assert stack.upstream.requests == 3

    async with session.get(f"{front.url}/echo/4", headers=stack.assertion("bob@x")) as r:
        assert r.status == 200
        assert echoed_headers(await r.json())["authorization"] == f"Bearer {auth.issued[1]}"
    assert await front.granted() == 2  # another assertion, another key


@pytest.mark.parametrize("conf", CACHED)
async def test_cache_key_covers_what_the_gateway_reads(start_front: StartFront, conf: str) -> None:
    """With an answer cached, the same assertion in another header, or none, is refused."""
    front = await start_front(conf)
    stack = front.stack
    alice = stack.assertion()
    async with stack.session.get(f"{front.url}/echo/1", headers=alice) as r:
        assert r.status == 200
    elsewhere = {"Authorization": f"SAML {alice['X-SAML-Assertion']}"}
    # An empty header is a 400 at the gateway, which nginx turns into a 500.
    for headers, status in ((elsewhere, 401), ({}, 401), ({"X-SAML-Assertion": ""}, 500)):
        async with stack.session.get(f"{front.url}/echo/2", headers=headers) as r:
            assert r.status == status
    assert stack.upstream.requests == 1


@pytest.mark.parametrize("conf", CACHED)
async def test_cache_honours_the_gateways_max_age(start_front: StartFront, conf: str) -> None:
    """A token the gateway will serve for under a second is answered with no-store:
    nginx must not keep it, whatever a default lifetime would say."""
    front = await start_front(conf)
    stack = front.stack
    stack.auth.expires_in = 1
    alice = stack.assertion()
    for _ in range(2):
        async with stack.session.get(f"{front.url}/echo/1", headers=alice) as r:
            assert r.status == 200
    assert await front.granted() == 2


@pytest.mark.parametrize("conf", CACHED)
async def test_cached_entry_expires_with_the_gateways_max_age(
    start_front: StartFront, conf: str
) -> None:
    """An entry lives max-age seconds, not longer, even with its cache file held open."""
    # No refresh margin or jitter: a 2 s token is answered with max-age=1.
    front = await start_front(conf, cache={"refresh_margin": 0, "jitter": 0})
    stack = front.stack
    stack.auth.expires_in = 2
    alice = stack.assertion()
    for _ in range(2):
        async with stack.session.get(f"{front.url}/echo/1", headers=alice) as r:
            assert r.status == 200, front.nginx.errors()
    assert await front.granted() == 1
    # nginx counts lifetimes in whole seconds from the second it stored the answer.
    await asyncio.sleep(2.2)
    async with stack.session.get(f"{front.url}/echo/2", headers=alice) as r:
        # the gateway's own 2 s token is over too: the assertion is spent, not exchanged again
        assert r.status == 401
    assert await front.denied() == 1  # expired in nginx: asked the gateway again
    assert stack.auth.calls == 1
    assert stack.upstream.requests == 2  # the refused request never reached it


@pytest.mark.parametrize("conf", CACHED)
async def test_errors_are_never_cached(start_front: StartFront, conf: str) -> None:
    front = await start_front(conf)
    stack = front.stack
    stack.auth.mode = "invalid_client"  # the gateway answers 502
    alice = stack.assertion()
    for _ in range(2):
        async with stack.session.get(f"{front.url}/echo/1", headers=alice) as r:
            assert r.status == 500
    assert await stack.metric("gateway_requests_total", route="api", status="502") == 2
    stack.auth.mode = "ok"
    async with stack.session.get(f"{front.url}/echo/1", headers=alice) as r:
        assert r.status == 200
        assert echoed_headers(await r.json())["authorization"] == f"Bearer {stack.auth.issued[0]}"
    assert stack.upstream.requests == 1
