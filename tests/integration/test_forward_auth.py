"""Forward-auth mode in process: the ways fronts describe the original request, and that
only the configured front's headers are read."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.devkit.idp import DemoIdP

from .helpers import Parts, Stack, raw_request, start_stack

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def start_auth_stack(
    tmp_path: Path, idp: DemoIdP, parts: Parts
) -> AsyncIterator[Callable[..., Awaitable[Stack]]]:
    started: list[Stack] = []

    async def start(**forward_auth: Any) -> Stack:
        s = await start_stack(
            tmp_path / str(len(started)),
            idp,
            parts,
            route={"path_prefix": "/api"},
            forward_auth={"enabled": True, "path": "/_auth", **forward_auth},
        )
        started.append(s)
        return s

    yield start
    for s in started:
        await s.session.close()
        await s.server.close()


@pytest.fixture
async def auth_stack(start_auth_stack: Callable[..., Awaitable[Stack]]) -> Stack:
    return await start_auth_stack(front="nginx")


# What each front sends (the nginx one as config/forward-auth/nginx.conf sets it).
NGINX = {"X-Original-URI": "/api/orders?id=1", "X-Original-Method": "GET", "X-Forwarded-Host": "a"}
FORWARDED = {"X-Forwarded-Uri": "/api/orders", "X-Forwarded-Method": "GET", "X-Forwarded-Host": "a"}


@pytest.mark.parametrize(
    ("front", "path", "extra"),
    [
        ("nginx", "/_auth", NGINX),  # nginx auth_request
        ("traefik", "/_auth", FORWARDED),  # Traefik forwardAuth
        ("caddy", "/_auth", FORWARDED),  # Caddy forward_auth
        ("envoy", "/_auth/api/orders", {}),  # Envoy ext_authz, HTTP mode, path_prefix /_auth
    ],
)
async def test_grant_carries_token_and_lifetime(
    start_auth_stack: Callable[..., Awaitable[Stack]], front: str, path: str, extra: dict[str, str]
) -> None:
    auth_stack = await start_auth_stack(front=front)
    headers = {**auth_stack.assertion(), **extra}
    async with auth_stack.session.get(f"{auth_stack.url}{path}", headers=headers) as r:
        assert r.status == 200
        assert r.headers["Authorization"] == f"Bearer {auth_stack.auth.issued[0]}"
        max_age = int(r.headers["Cache-Control"].removeprefix("max-age="))
    # 3600 s token, minus the 30 s margin and up to 5 s of jitter.
    assert 3560 <= max_age <= 3570
    assert auth_stack.upstream.requests == 0  # the proxy in front carries the traffic


async def test_second_ask_is_a_cache_hit(auth_stack: Stack) -> None:
    headers = {**auth_stack.assertion(), **NGINX, "X-Original-URI": "/api/x"}
    for _ in range(3):
        async with auth_stack.session.get(f"{auth_stack.url}/_auth", headers=headers) as r:
            assert r.status == 200
    assert auth_stack.auth.calls == 1


async def test_denials_use_proxy_error_semantics(auth_stack: Stack) -> None:
    async with auth_stack.session.get(
        f"{auth_stack.url}/_auth", headers={**NGINX, "X-Original-URI": "/api/x"}
    ) as r:
        assert r.status == 401
        assert "Authorization" not in r.headers
        assert (await r.json())["error"] == "invalid_token"
    headers = {**auth_stack.assertion(), **NGINX, "X-Original-URI": "/elsewhere"}
    async with auth_stack.session.get(f"{auth_stack.url}/_auth", headers=headers) as r:
        assert r.status == 404
    auth_stack.auth.mode = "invalid_client"
    headers = {**auth_stack.assertion("bob@x"), **NGINX, "X-Original-URI": "/api/x"}
    async with auth_stack.session.get(f"{auth_stack.url}/_auth", headers=headers) as r:
        assert r.status == 502


async def test_own_listener_and_custom_header(tmp_path: Path, idp: DemoIdP, parts: Parts) -> None:
    s = await start_stack(
        tmp_path,
        idp,
        parts,
        forward_auth={
            "enabled": True,
            "path": "/check",
            "token_header": "X-Access-Token",
            "listen": {"host": "127.0.0.1", "port": 0},
            "front": "traefik",
        },
    )
    try:
        auth_url = f"http://127.0.0.1:{s.server.auth_port}"
        headers = {**s.assertion(), **FORWARDED, "X-Forwarded-Uri": "/anything"}
        async with s.session.get(f"{auth_url}/check", headers=headers) as r:
            assert r.status == 200
            assert r.headers["X-Access-Token"] == s.auth.issued[0]
        async with s.session.get(f"{s.url}/check", headers=s.assertion()) as r:
            assert s.upstream.requests == 1  # on the proxy listener, /check is just proxied
    finally:
        await s.session.close()
        await s.server.close()


@pytest.mark.parametrize(
    ("front", "path", "extra"),
    [
        ("nginx", "/_auth", {**NGINX, "X-Original-URI": "/public/../api/x"}),
        ("traefik", "/_auth", {**FORWARDED, "X-Forwarded-Uri": "/public/..%2Fapi/x"}),
        ("nginx", "/_auth", {**NGINX, "X-Original-URI": "//api/public/x"}),
        ("envoy", "/_auth/public/%2e%2e/api/x", {}),
    ],
)
async def test_original_paths_a_proxy_could_resolve_elsewhere_are_refused(
    start_auth_stack: Callable[..., Awaitable[Stack]], front: str, path: str, extra: dict[str, str]
) -> None:
    auth_stack = await start_auth_stack(front=front)
    # nginx and Envoy route on the normalised path; the gateway must not pick a route on
    # a path that the proxy resolves to another location.
    status, body = await raw_request(
        auth_stack.server.port, path, {**auth_stack.assertion(), **extra}
    )
    assert status == 400
    assert b"Bearer" not in body and b'"invalid_request"' in body
    assert auth_stack.auth.calls == 0


ELSEWHERE = {**FORWARDED, "X-Forwarded-Uri": "/elsewhere"}


@pytest.mark.parametrize(
    ("front", "path", "sent"),
    [
        # Each front's own headers say /elsewhere (no route: 404); the copies a client could
        # have sent say /api, and must not be read.
        ("nginx", "/_auth", {**NGINX, "X-Original-URI": "/elsewhere", "X-Forwarded-Uri": "/api"}),
        (
            "traefik",
            "/_auth",
            {**FORWARDED, "X-Forwarded-Uri": "/elsewhere", "X-Original-URI": "/api"},
        ),
        (
            "caddy",
            "/_auth",
            {**FORWARDED, "X-Forwarded-Uri": "/elsewhere", "X-Original-URI": "/api"},
        ),
        ("envoy", "/_auth/elsewhere", {"X-Original-URI": "/api", "X-Forwarded-Uri": "/api"}),
    ],
)
async def test_only_the_fronts_own_headers_choose_the_route(
    start_auth_stack: Callable[..., Awaitable[Stack]], front: str, path: str, sent: dict[str, str]
) -> None:
    s = await start_auth_stack(front=front)
    async with s.session.get(f"{s.url}{path}", headers={**s.assertion(), **sent}) as r:
        assert r.status == 404
        assert "Authorization" not in r.headers
    assert s.auth.calls == 0


@pytest.mark.parametrize(
    "sent",
    [
        {"X-Original-Method": "GET", "X-Forwarded-Host": "a"},  # no X-Original-URI
        {"X-Original-URI": "/api/x", "X-Original-Method": "GET"},  # no X-Forwarded-Host
        {"X-Original-URI": "", "X-Original-Method": "GET", "X-Forwarded-Host": "a"},
    ],
)
async def test_a_header_the_front_should_set_is_required(
    auth_stack: Stack, sent: dict[str, str]
) -> None:
    """nginx sets only what its config sets: a missing header is a broken front, not a
    reason to look elsewhere (nor at X-Forwarded-Uri, which a client may send)."""
    headers = {**auth_stack.assertion(), **sent, "X-Forwarded-Uri": "/api/x"}
    async with auth_stack.session.get(f"{auth_stack.url}/_auth", headers=headers) as r:
        assert r.status == 400
        assert (await r.json())["error"] == "invalid_request"
        assert "Authorization" not in r.headers
    assert auth_stack.auth.calls == 0


async def test_a_repeated_uri_header_is_refused(auth_stack: Stack) -> None:
    """Two copies: one came from somewhere else than the front."""
    lines = [f"{name}: {value}" for name, value in {**auth_stack.assertion(), **NGINX}.items()]
    lines.append("X-Original-URI: /elsewhere")
    reader, writer = await asyncio.open_connection("127.0.0.1", auth_stack.server.port)
    head = ["GET /_auth HTTP/1.1", "Host: gw.test", "Connection: close", *lines]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
    data = await reader.read()
    writer.close()
    assert data.startswith(b"HTTP/1.1 400 ")
    assert b"Bearer" not in data
    assert auth_stack.auth.calls == 0


async def test_explicit_original_request_headers(
    start_auth_stack: Callable[..., Awaitable[Stack]],
) -> None:
    s = await start_auth_stack(
        original_request_headers={"uri": "X-Auth-Request-Uri", "host": "X-Auth-Request-Host"}
    )
    sent = {"X-Auth-Request-Uri": "/api/x", "X-Auth-Request-Host": "a", "X-Original-URI": "/"}
    async with s.session.get(f"{s.url}/_auth", headers={**s.assertion(), **sent}) as r:
        assert r.status == 200
        assert r.headers["Authorization"] == f"Bearer {s.auth.issued[0]}"
    # The preset headers of every front mean nothing here.
    headers = {**s.assertion("bob@x"), **NGINX, **FORWARDED}
    async with s.session.get(f"{s.url}/_auth/api/x", headers=headers) as r:
        assert r.status == 400
