"""The Lua shared-dictionary example (config/forward-auth/nginx-lua.conf) on a real nginx.

The promises every caching example keeps (routes, hosts, paths, max-age) are run against it
in test_nginx.py. Here, what is its own: every gateway request is counted, the dictionary
drops a token the upstream refuses, the HMAC key's sources, and the statuses the gateway
never sends (403, a denial with a max-age) from a scripted authorizer on loopback.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web
from integration.helpers import Parts, Stack, echoed_headers, start_stack

from gateway.devkit.idp import DemoIdP

from .helpers import signed_by, two_routes
from .nginx_runner import EXAMPLES, Nginx, example, free_port, missing_modules, nginx_binary
from .nginx_runner import start_nginx as run_nginx

LUA = "nginx-lua.conf"
pytestmark = [
    pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed (make system-deps)"),
    pytest.mark.skipif(
        bool(missing_modules((EXAMPLES / LUA).read_text())),
        reason=f"{LUA} needs libnginx-mod-http-lua (make system-deps installs it)",
    ),
]

EXAMPLE_GATEWAY = yaml.safe_load((EXAMPLES / "gateway.yaml").read_text())
PUBLIC, ADMIN = "/echo/public", "/echo/admin"
KEY_ENV = "SAML_AUTH_CACHE_KEY"


@dataclass
class Scripted:
    """A loopback HTTP server answering what the test sets, counting what it got."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    seen: list[dict[str, str]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    address: str = ""
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(dict(request.headers))
        self.paths.append(request.raw_path)
        return web.Response(status=self.status, headers=self.headers, body=self.body)

    async def start(self) -> Scripted:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.address = f"127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def lua_config(tmp_path: Path, port: int, gateway: str, upstream: str) -> str:
    """The shipped example on loopback ports, its routes under /echo, a key file in tmp."""
    key_file = tmp_path / "saml-auth-cache.key"
    if not key_file.exists():
        key_file.write_bytes(os.urandom(32))
    return example(
        LUA,
        {
            "listen 80;": f"listen 127.0.0.1:{port};",
            "server 127.0.0.1:8081;": f"server {gateway};",
            "server 127.0.0.1:9000;": f"server {upstream};",
            "location ~ ^/public(/|$) {": f"location ~ ^{PUBLIC}(/|$) {{",
            "location ~ ^/admin(/|$) {": f"location ~ ^{ADMIN}(/|$) {{",
            "/etc/nginx/saml-auth-cache.key": str(key_file),
        },
    )


@dataclass
class Front:
    nginx: Nginx
    url: str


StartNginx = Callable[[str, str], Front]


@pytest.fixture
def start_nginx(tmp_path: Path) -> Iterator[StartNginx]:
    started: list[Nginx] = []

    def start(gateway: str, upstream: str) -> Front:
        port = free_port()
        prefix = tmp_path / f"nginx-{len(started)}"
        nginx = run_nginx(prefix, lua_config(tmp_path, port, gateway, upstream), [port])
        started.append(nginx)
        return Front(nginx, f"http://127.0.0.1:{port}")

    yield start
    for nginx in started:
        nginx.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[], Awaitable[Scripted]]]:
    servers: list[Scripted] = []

    async def make() -> Scripted:
        server = await Scripted().start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


@pytest.fixture
async def stack(
    tmp_path: Path, idp: DemoIdP, partner_idp: DemoIdP, parts: Parts
) -> AsyncIterator[Stack]:
    """The real gateway with the example's settings and its two routes under /echo."""
    s = await start_stack(
        tmp_path,
        idp,
        parts,
        forward_auth={
            **EXAMPLE_GATEWAY["forward_auth"],
            "listen": {"host": "127.0.0.1", "port": 0},
        },
        assertion=EXAMPLE_GATEWAY["assertion"],
        **two_routes(tmp_path, partner_idp, parts.upstream_url, public=PUBLIC, admin=ADMIN),
    )
    yield s
    await s.session.close()
    await s.server.close()


def gateway_of(stack: Stack) -> str:
    return f"127.0.0.1:{stack.server.auth_port}"


def upstream_of(parts: Parts) -> str:
    return parts.upstream_url.removeprefix("http://")


async def gateway_requests(stack: Stack) -> float:
    """Every answer the gateway gave, whatever the route or status."""
    async with stack.session.get(f"{stack.admin}/metrics") as r:
        text = await r.text()
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("gateway_requests_total{")
    )


# --- against the real gateway -------------------------------------------------------------


async def test_cache_hits_never_reach_the_gateway(
    start_nginx: StartNginx, stack: Stack, parts: Parts
) -> None:
    front = start_nginx(gateway_of(stack), upstream_of(parts))
    alice = {**stack.assertion(), "Authorization": "Bearer forged-by-client"}
    for i in range(5):
        async with stack.session.get(f"{front.url}{PUBLIC}/{i}", headers=alice) as r:
            assert r.status == 200, front.nginx.errors()
            seen = echoed_headers(await r.json())
        # The hits too: the gateway's token, never the client's, never the assertion.
        assert seen["authorization"] == f"Bearer {stack.auth.issued[0]}"
        assert "x-saml-assertion" not in seen
    assert await gateway_requests(stack) == 1
    assert stack.upstream.requests == 5


async def test_a_changed_assertion_is_another_key(
    start_nginx: StartNginx, stack: Stack, parts: Parts
) -> None:
    front = start_nginx(gateway_of(stack), upstream_of(parts))
    alice = stack.assertion()["X-SAML-Assertion"]
    async with stack.session.get(f"{front.url}{PUBLIC}/1", headers={"X-SAML-Assertion": alice}):
        pass
    # The signed subject changed by one letter: another header, and a broken signature. (A
    # change at a random spot may land in the unsigned KeyInfo, which the gateway rightly
    # ignores, since it trusts only pinned keys.)
    document = base64.b64decode(alice)
    if b"alice@" not in document:
        raise AssertionError("the test assertion no longer names alice")
    changed = base64.b64encode(document.replace(b"alice@", b"alicf@")).decode()
    async with stack.session.get(
        f"{front.url}{PUBLIC}/2", headers={"X-SAML-Assertion": changed}
    ) as r:
        assert r.status == 401
        assert "Bearer" not in await r.text()
    assert await gateway_requests(stack) == 2  # asked the gateway
    assert stack.upstream.requests == 1


async def test_gateway_down_fails_closed(
    start_nginx: StartNginx, stack: Stack, parts: Parts
) -> None:
    """No answer from the gateway: 502, nothing forwarded. A grant cached before the
    gateway stopped stays valid for its max-age (the gateway would have served it too)."""
    front = start_nginx(gateway_of(stack), upstream_of(parts))
    alice = stack.assertion()
    async with stack.session.get(f"{front.url}{PUBLIC}/1", headers=alice) as r:
        assert r.status == 200
    await stack.server.close()
    for headers in (stack.assertion("bob@example.test"), {}, {"X-SAML-Assertion": "e30="}):
        async with stack.session.get(f"{front.url}{PUBLIC}/2", headers=headers) as r:
            assert r.status == 502
            assert "Bearer" not in await r.text()
    assert stack.upstream.requests == 1
    async with stack.session.get(f"{front.url}{PUBLIC}/3", headers=alice) as r:
        assert r.status == 200
    assert stack.upstream.requests == 2


async def test_routes_trusting_two_idps_never_share_an_entry(
    start_nginx: StartNginx, stack: Stack, parts: Parts, partner_idp: DemoIdP
) -> None:
    """Each route's answers live in its own dictionary: cached on one, asked on the other."""
    front = start_nginx(gateway_of(stack), upstream_of(parts))
    alice, pat = stack.assertion(), signed_by(partner_idp, stack)
    for _ in range(2):
        for path, headers, status in (
            (PUBLIC, alice, 200),
            (ADMIN, pat, 200),
            (ADMIN, alice, 401),
            (PUBLIC, pat, 401),
        ):
            async with stack.session.get(f"{front.url}{path}/x", headers=headers) as r:
                assert r.status == status, (path, front.nginx.errors())
    assert stack.upstream.requests == 4
    # Two grants from the gateway (then cached), four denials (never cached).
    assert await stack.metric("gateway_requests_total", route="public", status="200") == 1
    assert await stack.metric("gateway_requests_total", route="admin", status="200") == 1
    assert await gateway_requests(stack) == 6


async def test_upstream_refusing_the_token_drops_the_entry(
    start_nginx: StartNginx,
    stack: Stack,
    scripted: Callable[[], Awaitable[Scripted]],
) -> None:
    api = await scripted()
    front = start_nginx(gateway_of(stack), api.address)
    alice = stack.assertion()

    async def get() -> int:
        async with stack.session.get(f"{front.url}{PUBLIC}/x", headers=alice) as r:
            return r.status

    assert [await get(), await get()] == [200, 200]
    assert await gateway_requests(stack) == 1  # the second was a hit
    # A 401 that is not about the token keeps the entry.
    api.status, api.headers = 401, {"WWW-Authenticate": 'Bearer realm="api"'}
    assert await get() == 401
    assert await gateway_requests(stack) == 1
    # The upstream refuses the token itself: the next request asks the gateway again.
    api.headers = {"WWW-Authenticate": 'Bearer realm="api", error="invalid_token"'}
    assert await get() == 401
    api.status, api.headers = 200, {}
    assert [await get(), await get()] == [200, 200]
    assert await gateway_requests(stack) == 2  # one miss after the drop, then a hit again
    assert all(seen["Authorization"].startswith("Bearer ") for seen in api.seen)
    assert not [seen for seen in api.seen if "X-SAML-Assertion" in seen]


# --- against a scripted authorizer: answers the gateway never gives -----------------------


GRANT = {"Authorization": "Bearer scripted-token", "Cache-Control": "max-age=60"}


@pytest.mark.parametrize("status", [401, 403, 500, 502, 503, 504])
async def test_denials_and_errors_are_never_cached_even_with_a_max_age(
    start_nginx: StartNginx,
    scripted: Callable[[], Awaitable[Scripted]],
    session: aiohttp.ClientSession,
    parts: Parts,
    status: int,
) -> None:
    authorizer = await scripted()
    front = start_nginx(authorizer.address, upstream_of(parts))
    authorizer.status, authorizer.headers = status, dict(GRANT)
    authorizer.body = b'{"error": "scripted"}'
    headers = {"X-SAML-Assertion": base64.b64encode(b"<assertion/>").decode()}
    for _ in range(2):
        async with session.get(f"{front.url}{PUBLIC}/x", headers=headers) as r:
            assert r.status == status
            assert await r.read() == b'{"error": "scripted"}'  # the authorizer's answer
            assert "Bearer" not in r.headers.get("Authorization", "")
    assert len(authorizer.seen) == 2
    assert parts.upstream.requests == 0
    # Once the authorizer grants, the grant is cached and served.
    authorizer.status = 200
    for _ in range(2):
        async with session.get(f"{front.url}{PUBLIC}/x", headers=headers) as r:
            assert r.status == 200, front.nginx.errors()
            assert echoed_headers(await r.json())["authorization"] == "Bearer scripted-token"
    assert len(authorizer.seen) == 3


@pytest.mark.parametrize(
    "control", [None, "max-age=0", "no-store, max-age=60", "max-age=60, private", "max-age=x"]
)
async def test_grants_without_a_plain_max_age_are_not_stored(
    start_nginx: StartNginx,
    scripted: Callable[[], Awaitable[Scripted]],
    session: aiohttp.ClientSession,
    parts: Parts,
    control: str | None,
) -> None:
    authorizer = await scripted()
    front = start_nginx(authorizer.address, upstream_of(parts))
    authorizer.headers = {"Authorization": "Bearer scripted-token"}
    if control is not None:
        authorizer.headers["Cache-Control"] = control
    headers = {"X-SAML-Assertion": base64.b64encode(b"<assertion/>").decode()}
    for _ in range(2):
        async with session.get(f"{front.url}{PUBLIC}/x", headers=headers) as r:
            assert r.status == 200, front.nginx.errors()
    assert len(authorizer.seen) == 2


async def test_entry_expires_at_max_age(
    start_nginx: StartNginx,
    scripted: Callable[[], Awaitable[Scripted]],
    session: aiohttp.ClientSession,
    parts: Parts,
) -> None:
    authorizer = await scripted()
    front = start_nginx(authorizer.address, upstream_of(parts))
    authorizer.headers = {"Authorization": "Bearer first", "Cache-Control": "max-age=1"}
    headers = {"X-SAML-Assertion": base64.b64encode(b"<assertion/>").decode()}

    async def token() -> str:
        async with session.get(f"{front.url}{PUBLIC}/x", headers=headers) as r:
            assert r.status == 200, front.nginx.errors()
            return echoed_headers(await r.json())["authorization"]

    assert [await token(), await token()] == ["Bearer first", "Bearer first"]
    assert len(authorizer.seen) == 1
    authorizer.headers["Authorization"] = "Bearer second"
    await asyncio.sleep(1.2)  # the dictionary keeps an entry max-age seconds, to the ms
    assert await token() == "Bearer second"
    assert len(authorizer.seen) == 2


async def test_a_grant_without_the_token_is_a_500(
    start_nginx: StartNginx,
    scripted: Callable[[], Awaitable[Scripted]],
    session: aiohttp.ClientSession,
    parts: Parts,
) -> None:
    """forward_auth.token_header set to anything but Authorization: nothing goes upstream."""
    authorizer = await scripted()
    front = start_nginx(authorizer.address, upstream_of(parts))
    authorizer.headers = {"X-Token": "scripted-token", "Cache-Control": "max-age=60"}
    headers = {"X-SAML-Assertion": base64.b64encode(b"<assertion/>").decode()}
    async with session.get(f"{front.url}{PUBLIC}/x", headers=headers) as r:
        assert r.status == 500
    assert parts.upstream.requests == 0


async def test_the_auth_request_carries_what_the_gateway_reads(
    start_nginx: StartNginx,
    scripted: Callable[[], Awaitable[Scripted]],
    session: aiohttp.ClientSession,
    parts: Parts,
) -> None:
    """The front's three headers replace a client's copies; the client's Authorization
    and body stay behind; the gateway is asked on forward_auth.path."""
    authorizer = await scripted()
    front = start_nginx(authorizer.address, upstream_of(parts))
    authorizer.headers = dict(GRANT)
    headers = {
        "X-SAML-Assertion": base64.b64encode(b"<assertion/>").decode(),
        "Authorization": "Bearer forged-by-client",
        "X-Original-URI": "/echo/admin/forged",
        "X-Original-Method": "DELETE",
        "X-Forwarded-Host": "forged.test",
        "Host": "API.Example.TEST:8443",
    }
    url = f"{front.url}{PUBLIC}/x?y=1"
    async with session.post(url, headers=headers, data=b"payload") as r:
        assert r.status == 200, front.nginx.errors()
    (seen,) = authorizer.seen
    assert authorizer.paths == [EXAMPLE_GATEWAY["forward_auth"]["path"]]
    assert seen["X-Original-URI"] == f"{PUBLIC}/x?y=1"
    assert seen["X-Original-Method"] == "POST"
    assert seen["X-Forwarded-Host"] == "api.example.test"
    assert "Authorization" not in seen
    assert "Content-Length" not in seen


# --- the HMAC key -------------------------------------------------------------------------


def test_nginx_refuses_to_start_without_a_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(``nginx -t`` does not run init_by_lua: the error comes when nginx starts.)"""
    monkeypatch.delenv(KEY_ENV, raising=False)
    port = free_port()
    conf = lua_config(tmp_path, port, "127.0.0.1:9", "127.0.0.1:9")
    (tmp_path / "saml-auth-cache.key").unlink()
    with pytest.raises(RuntimeError, match=f"set {KEY_ENV} or create"):
        run_nginx(tmp_path / "nginx", conf, [port])
    (tmp_path / "saml-auth-cache.key").write_bytes(b"x" * 31)
    with pytest.raises(RuntimeError, match="at least 32 bytes"):
        run_nginx(tmp_path / "nginx", conf, [port])


async def test_the_key_may_come_from_the_environment(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    scripted: Callable[[], Awaitable[Scripted]],
    session: aiohttp.ClientSession,
    parts: Parts,
) -> None:
    """SAML_AUTH_CACHE_KEY is used when set, and the key file is then never read."""
    authorizer = await scripted()
    authorizer.headers = dict(GRANT)
    port = free_port()
    conf = lua_config(tmp_path, port, authorizer.address, upstream_of(parts))
    (tmp_path / "saml-auth-cache.key").unlink()
    monkeypatch.setenv(KEY_ENV, os.urandom(24).hex())
    nginx = run_nginx(tmp_path / "nginx", conf, [port])
    try:
        headers = {"X-SAML-Assertion": base64.b64encode(b"<assertion/>").decode()}
        for _ in range(2):
            async with session.get(f"http://127.0.0.1:{port}{PUBLIC}/x", headers=headers) as r:
                assert r.status == 200, nginx.errors()
        assert len(authorizer.seen) == 1  # cached under the environment's key
    finally:
        nginx.stop()


async def test_a_refused_token_is_dropped_for_every_worker(
    tmp_path: Path, scripted: Callable[[], Awaitable[Scripted]]
) -> None:
    """Two workers: whichever saw the upstream's invalid_token, the next request, on any
    worker, asks the gateway again (the token is in shared memory, never a worker's own)."""
    authorizer, api = await scripted(), await scripted()
    authorizer.headers = dict(GRANT)
    port = free_port()
    conf = lua_config(tmp_path, port, authorizer.address, api.address)
    # reuseport: the kernel spreads new connections over the workers by their source port;
    # X-Worker: which worker answered, so the test knows it crossed from one to the other.
    conf = conf.replace(f"listen 127.0.0.1:{port};", f"listen 127.0.0.1:{port} reuseport;")
    conf = conf.replace(
        'set $saml_token "";', 'set $saml_token "";\n    add_header X-Worker $pid always;'
    )
    nginx = run_nginx(tmp_path / "nginx", conf, [port], workers=2)
    headers = {"X-SAML-Assertion": base64.b64encode(b"<assertion/>").decode()}

    async def get() -> tuple[int, str]:
        # A connection of its own, so the kernel may hand it to either worker.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            async with s.get(f"http://127.0.0.1:{port}{PUBLIC}/x", headers=headers) as r:
                return r.status, r.headers["X-Worker"]

    crossed = 0
    try:
        for _ in range(40):
            api.status, api.headers = 200, {}
            for _ in range(4):  # hits, on either worker
                assert (await get())[0] == 200, nginx.errors()
            asked = len(authorizer.seen)
            api.status = 401
            api.headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'}
            status, dropped_by = await get()
            assert status == 401
            api.status, api.headers = 200, {}
            status, served_by = await get()
            assert status == 200
            assert len(authorizer.seen) == asked + 1  # asked again, whichever worker
            crossed += served_by != dropped_by
            if crossed >= 3:
                break
    finally:
        nginx.stop()
    assert crossed >= 3, "the kernel gave every connection to one worker: nothing was tested"
