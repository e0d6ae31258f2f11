"""A real nginx with auth_request in front of a real upstream, the gateway as the authorizer.

nginx runs the shipped examples (``config/forward-auth/nginx*.conf``) with only their
addresses, route prefixes and cache folders replaced, so what is tested is what operators
copy. The gateway has the examples' two routes, under the upstream's ``/echo``: ``public``
trusts the suite's IdP, ``admin`` a partner IdP.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from integration.helpers import Parts, Stack, echoed_headers, raw_request, start_stack

from gateway.devkit.idp import DemoIdP

from .helpers import signed_by, two_routes
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
LUA = "nginx-lua.conf"
CACHED = [_variant("nginx-cached.conf"), _variant("nginx-cached-setmisc.conf"), _variant(LUA)]
ALL = [_variant("nginx.conf"), *CACHED]


def gateway_error(conf: str, status: int) -> int:
    """What the client gets when the gateway answers ``status`` (not 200, 401 or 403):
    auth_request turns it into a 500, the Lua example passes it on."""
    return status if conf == LUA else 500


EXAMPLE_GATEWAY = yaml.safe_load((EXAMPLES / "gateway.yaml").read_text())
PUBLIC, ADMIN = "/echo/public", "/echo/admin"


@dataclass
class Front:
    """nginx on ``url``, asking ``stack``'s gateway about every request."""

    nginx: Nginx
    stack: Stack
    url: str
    port: int

    async def granted(self, route: str = "public") -> float:
        """Forward-auth answers the gateway gave with 200 (nginx cache hits never count)."""
        return await self.stack.metric("gateway_requests_total", route=route, status="200")

    async def denied(self, route: str = "public") -> float:
        return await self.stack.metric("gateway_requests_total", route=route, status="401")


StartFront = Callable[..., Awaitable[Front]]


@pytest.fixture
async def start_front(
    tmp_path: Path, idp: DemoIdP, partner_idp: DemoIdP, parts: Parts
) -> AsyncIterator[StartFront]:
    started: list[Front] = []

    async def start(conf: str, **overrides: Any) -> Front:
        stack = await start_stack(
            tmp_path,
            idp,
            parts,
            # The example's forward-auth settings and assertion sources, on a free port.
            forward_auth={
                **EXAMPLE_GATEWAY["forward_auth"],
                "listen": {"host": "127.0.0.1", "port": 0},
            },
            assertion=EXAMPLE_GATEWAY["assertion"],
            **two_routes(tmp_path, partner_idp, parts.upstream_url, public=PUBLIC, admin=ADMIN),
            **overrides,
        )
        port = free_port()
        replacements = {
            "listen 80;": f"listen 127.0.0.1:{port};",
            "server 127.0.0.1:8081;": f"server 127.0.0.1:{stack.server.auth_port};",
            "server 127.0.0.1:9000;": f"server {parts.upstream_url.removeprefix('http://')};",
        }
        if conf != "nginx.conf":
            # The examples' route locations, moved under the upstream's /echo.
            replacements["location ~ ^/public(/|$) {"] = f"location ~ ^{PUBLIC}(/|$) {{"
            replacements["location ~ ^/admin(/|$) {"] = f"location ~ ^{ADMIN}(/|$) {{"
        if "cached" in conf:
            replacements["/var/cache/nginx/saml-auth"] = str(tmp_path / "nginx" / "cache")
        if conf == LUA:
            key_file = tmp_path / "saml-auth-cache.key"
            key_file.write_bytes(os.urandom(32))
            replacements["/etc/nginx/saml-auth-cache.key"] = str(key_file)
        body = example(conf, replacements)
        try:
            nginx = start_nginx(tmp_path / "nginx", body, [port])
        except BaseException:
            await stack.session.close()
            await stack.server.close()
            raise
        front = Front(nginx, stack, f"http://127.0.0.1:{port}", port)
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
    async with session.get(f"{front.url}{PUBLIC}/orders?id=7", headers=headers) as r:
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
        async with session.get(f"{front.url}{PUBLIC}/x", headers=headers) as r:
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
    async with session.get(f"{front.url}{PUBLIC}/x", headers=stack.assertion("bob@x")) as r:
        assert r.status == 500  # the gateway said 502
    assert stack.upstream.requests == 0


@pytest.mark.parametrize("conf", CACHED)
async def test_cached_answer_spares_the_gateway(start_front: StartFront, conf: str) -> None:
    front = await start_front(conf)
    stack = front.stack
    session, auth = stack.session, stack.auth
    alice = stack.assertion()
    tokens = []
    for method, path in (("GET", "/1"), ("GET", "/2"), ("POST", "/3")):
        url = f"{front.url}{PUBLIC}{path}"
        async with session.request(method, url, headers=alice, data=b"x") as r:
            assert r.status == 200, front.nginx.errors()
            tokens.append(echoed_headers(await r.json())["authorization"])
    assert tokens == [f"Bearer {auth.issued[0]}"] * 3
    assert await front.granted() == 1  # the second and third never left nginx
    assert stack.upstream.requests == 3

    async with session.get(f"{front.url}{PUBLIC}/4", headers=stack.assertion("bob@x")) as r:
        assert r.status == 200
        assert echoed_headers(await r.json())["authorization"] == f"Bearer {auth.issued[1]}"
    assert await front.granted() == 2  # another assertion, another key


@pytest.mark.parametrize("conf", CACHED)
async def test_cache_key_covers_what_the_gateway_reads(start_front: StartFront, conf: str) -> None:
    """With an answer cached, the same assertion in another header, or none, is refused."""
    front = await start_front(conf)
    stack = front.stack
    alice = stack.assertion()
    async with stack.session.get(f"{front.url}{PUBLIC}/1", headers=alice) as r:
        assert r.status == 200
    elsewhere = {"Authorization": f"SAML {alice['X-SAML-Assertion']}"}
    # An empty header is a 400 at the gateway.
    empty = ({"X-SAML-Assertion": ""}, gateway_error(conf, 400))
    for headers, status in ((elsewhere, 401), ({}, 401), empty):
        async with stack.session.get(f"{front.url}{PUBLIC}/2", headers=headers) as r:
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
        async with stack.session.get(f"{front.url}{PUBLIC}/1", headers=alice) as r:
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
        async with stack.session.get(f"{front.url}{PUBLIC}/1", headers=alice) as r:
            assert r.status == 200, front.nginx.errors()
    assert await front.granted() == 1
    # nginx counts lifetimes in whole seconds from the second it stored the answer.
    await asyncio.sleep(2.2)
    async with stack.session.get(f"{front.url}{PUBLIC}/2", headers=alice) as r:
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
        async with stack.session.get(f"{front.url}{PUBLIC}/1", headers=alice) as r:
            assert r.status == gateway_error(conf, 502)
    assert await stack.metric("gateway_requests_total", route="public", status="502") == 2
    stack.auth.mode = "ok"
    async with stack.session.get(f"{front.url}{PUBLIC}/1", headers=alice) as r:
        assert r.status == 200
        assert echoed_headers(await r.json())["authorization"] == f"Bearer {stack.auth.issued[0]}"
    assert stack.upstream.requests == 1


# --- who chooses the route ------------------------------------------------------------------


@pytest.mark.parametrize("conf", ALL)
async def test_client_sent_original_request_headers_choose_nothing(
    start_front: StartFront, conf: str
) -> None:
    """A client's copies of the headers any front uses cannot move /echo/admin onto the
    route whose IdP signed the assertion."""
    front = await start_front(conf)
    stack = front.stack
    forged = {
        "X-Original-URI": f"{PUBLIC}/x",
        "X-Original-Method": "GET",
        "X-Forwarded-Uri": f"{PUBLIC}/x",
        "X-Forwarded-Method": "GET",
        "X-Forwarded-Host": "elsewhere.test",
    }
    headers = {**stack.assertion(), **forged}  # valid for route "public" only
    async with stack.session.get(f"{front.url}{ADMIN}/x", headers=headers) as r:
        assert r.status == 401, front.nginx.errors()
        assert r.headers["WWW-Authenticate"] == 'SAML realm="test-admin"'  # admin's route
    assert stack.upstream.requests == 0
    assert await front.denied("admin") == 1
    assert await front.granted("public") == 0


# --- caches key on the route, and never answer for refused paths ----------------------------


@pytest.mark.parametrize("conf", CACHED)
async def test_cached_answer_never_crosses_routes(
    start_front: StartFront, partner_idp: DemoIdP, conf: str
) -> None:
    """One assertion valid for the public route only: admin is refused before and after
    the public answer is cached; paths the gateway refuses or does not route never reach
    the upstream, cached answer or not."""
    front = await start_front(conf)
    stack = front.stack
    alice = stack.assertion()  # signed by the IdP route "public" trusts
    # The host raw_request sends below: the cached answers must be under the same key.
    on_host = {**alice, "Host": "gw.test"}
    session, upstream = stack.session, stack.upstream
    for path, status in ((f"{ADMIN}/x", 401), (f"{PUBLIC}/x", 200), (f"{ADMIN}/x", 401)):
        async with session.get(f"{front.url}{path}", headers=on_host) as r:
            assert r.status == status, (path, front.nginx.errors())
    assert upstream.requests == 1
    assert echoed_headers_of(upstream) == f"Bearer {stack.auth.issued[0]}"
    assert await front.denied("admin") == 2  # each admin request asked the gateway

    # Sent byte-exact: nginx resolves each of these to a route location whose zone may hold
    # alice's answer (public/../admin is admin's; admin/../public is public's, cached).
    for target in (
        f"{PUBLIC}/../admin/x",
        f"{ADMIN}/../public/x",
        f"{PUBLIC}/%2e%2e/admin/x",
        f"{ADMIN}/..%2Fpublic/x",
        f"/{PUBLIC}/x",
        "/echo/internal/x",  # no gateway route
        f"{PUBLIC}/../internal/x",
    ):
        status, body = await raw_request(front.port, target, alice)
        assert status in (400, 404, 500), (target, status)  # 500: the gateway said 400
        assert b"Bearer" not in body
    assert upstream.requests == 1  # none of them was forwarded
    assert stack.auth.calls == 1

    # The admin route works for an assertion of the IdP it trusts, from its own zone.
    partner = signed_by(partner_idp, stack)
    for _ in range(2):
        async with session.get(f"{front.url}{ADMIN}/y", headers=partner) as r:
            assert r.status == 200, front.nginx.errors()
            assert echoed_headers(await r.json())["authorization"] == (
                f"Bearer {stack.auth.issued[1]}"
            )
    assert await front.granted("admin") == 1  # the second was nginx's cached answer
    # And alice's cached public answer still serves public requests without the gateway.
    async with session.get(f"{front.url}{PUBLIC}/z", headers=on_host) as r:
        assert r.status == 200
    assert await front.granted("public") == 1


def echoed_headers_of(upstream: Any) -> str | None:
    """The Authorization header of the last request the upstream received."""
    value: str | None = upstream.last_headers.get("Authorization")
    return value


@pytest.mark.parametrize("conf", CACHED)
async def test_unusual_but_valid_paths_ask_the_gateway_every_time(
    start_front: StartFront, conf: str
) -> None:
    """Percent-encoded paths are not cached (nginx cannot tell how the gateway and the
    upstream read them), yet served when the gateway grants them."""
    front = await start_front(conf)
    stack = front.stack
    alice = stack.assertion()
    # Cached under the host raw_request sends, so only the path could make these misses.
    on_host = {**alice, "Host": "gw.test"}
    async with stack.session.get(f"{front.url}{PUBLIC}/x", headers=on_host) as r:
        assert r.status == 200
    for _ in range(2):
        status, body = await raw_request(front.port, f"{PUBLIC}/caf%C3%A9", alice)
        assert status == 200, front.nginx.errors()
        assert f"Bearer {stack.auth.issued[0]}".encode() in body  # the upstream's echo
    assert await front.granted() == 3  # one plain request, then the gateway each time
    assert stack.auth.calls == 1
