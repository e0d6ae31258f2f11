"""Forward-auth mode in process: the three ways proxies describe the original request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.devkit.idp import DemoIdP

from .conftest import Parts, Stack, raw_request, start_stack

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def auth_stack(tmp_path: Path, idp: DemoIdP, parts: Parts) -> AsyncIterator[Stack]:
    s = await start_stack(
        tmp_path,
        idp,
        parts,
        route={"path_prefix": "/api"},
        forward_auth={"enabled": True, "path": "/_auth"},
    )
    yield s
    await s.session.close()
    await s.server.close()


@pytest.mark.parametrize(
    ("path", "extra"),
    [
        ("/_auth", {"X-Original-URI": "/api/orders?id=1"}),  # nginx auth_request
        ("/_auth", {"X-Forwarded-Uri": "/api/orders", "X-Forwarded-Method": "GET"}),  # Traefik
        ("/_auth/api/orders", {}),  # Envoy ext_authz, HTTP mode, path_prefix /_auth
    ],
)
async def test_grant_carries_token_and_lifetime(
    auth_stack: Stack, path: str, extra: dict[str, str]
) -> None:
    headers = {**auth_stack.assertion(), **extra}
    async with auth_stack.session.get(f"{auth_stack.url}{path}", headers=headers) as r:
        assert r.status == 200
        assert r.headers["Authorization"] == f"Bearer {auth_stack.auth.issued[0]}"
        max_age = int(r.headers["Cache-Control"].removeprefix("max-age="))
    # 3600 s token, minus the 30 s margin and up to 5 s of jitter.
    assert 3560 <= max_age <= 3570
    assert auth_stack.upstream.requests == 0  # the proxy in front carries the traffic


async def test_second_ask_is_a_cache_hit(auth_stack: Stack) -> None:
    headers = {**auth_stack.assertion(), "X-Original-URI": "/api/x"}
    for _ in range(3):
        async with auth_stack.session.get(f"{auth_stack.url}/_auth", headers=headers) as r:
            assert r.status == 200
    assert auth_stack.auth.calls == 1


async def test_denials_use_proxy_error_semantics(auth_stack: Stack) -> None:
    async with auth_stack.session.get(
        f"{auth_stack.url}/_auth", headers={"X-Original-URI": "/api/x"}
    ) as r:
        assert r.status == 401
        assert "Authorization" not in r.headers
        assert (await r.json())["error"] == "invalid_token"
    headers = {**auth_stack.assertion(), "X-Original-URI": "/elsewhere"}
    async with auth_stack.session.get(f"{auth_stack.url}/_auth", headers=headers) as r:
        assert r.status == 404
    auth_stack.auth.mode = "invalid_client"
    headers = {**auth_stack.assertion("bob@x"), "X-Original-URI": "/api/x"}
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
        },
    )
    try:
        auth_url = f"http://127.0.0.1:{s.server.auth_port}"
        headers = {**s.assertion(), "X-Forwarded-Uri": "/anything"}
        async with s.session.get(f"{auth_url}/check", headers=headers) as r:
            assert r.status == 200
            assert r.headers["X-Access-Token"] == s.auth.issued[0]
        async with s.session.get(f"{s.url}/check", headers=s.assertion()) as r:
            assert s.upstream.requests == 1  # on the proxy listener, /check is just proxied
    finally:
        await s.session.close()
        await s.server.close()


@pytest.mark.parametrize(
    ("path", "extra"),
    [
        ("/_auth", {"X-Original-URI": "/public/../api/x"}),
        ("/_auth", {"X-Forwarded-Uri": "/public/..%2Fapi/x"}),
        ("/_auth", {"X-Original-URI": "//api/public/x"}),
        ("/_auth/public/%2e%2e/api/x", {}),
    ],
)
async def test_original_paths_a_proxy_could_resolve_elsewhere_are_refused(
    auth_stack: Stack, path: str, extra: dict[str, str]
) -> None:
    # nginx and Envoy route on the normalised path; the gateway must not pick a route on
    # a path that the proxy resolves to another location.
    status, body = await raw_request(
        auth_stack.server.port, path, {**auth_stack.assertion(), **extra}
    )
    assert status == 400
    assert b"Bearer" not in body and b'"invalid_request"' in body
    assert auth_stack.auth.calls == 0
