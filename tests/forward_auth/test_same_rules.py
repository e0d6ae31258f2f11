"""Forward-auth decides like the proxy: the same path and host rules pick the same route.

For each request an attacker might shape (paths servlet containers resolve, dot segments,
host spellings), the proxy listener's answer and the forward-auth answer for the same
original request must agree: a path the proxy refuses is refused in forward-auth mode too,
and a host spelling reaches the same route (and so the same IdP) in both.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from integration.helpers import Parts, Stack, start_stack

from gateway.devkit.idp import DemoIdP

from .helpers import two_routes

NGINX = {"X-Original-Method": "GET"}


@pytest.fixture
async def stack(
    tmp_path: Path, idp: DemoIdP, partner_idp: DemoIdP, parts: Parts
) -> AsyncIterator[Stack]:
    settings = two_routes(tmp_path, partner_idp, parts.upstream_url, public="/echo", admin="/")
    # The suite's IdP is trusted only on api.test's /echo; everything else trusts the partner.
    settings["routes"][0]["host"] = "api.test"
    s = await start_stack(
        tmp_path,
        idp,
        parts,
        forward_auth={"enabled": True, "path": "/_auth", "front": "nginx"},
        **settings,
    )
    yield s
    await s.session.close()
    await s.server.close()


async def send(port: int, target: str, host: str, headers: dict[str, str]) -> int:
    """One request, its line and Host sent byte-exact; the status line's code."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    data = await reader.read()
    writer.close()
    return int(data.split(b" ", 2)[1])


@pytest.mark.parametrize(
    "target",
    [
        "/echo/x",
        "/echo/admin;x=1/secret.txt",
        "/echo/public/..;/admin/secret.txt",
        "/echo//admin/secret.txt",
        "/echo/public/../admin",
        "/echo/%2e%2e/x",
        "/echo/a%2Fb",
        "/echo/a%5C..%5Cb",
        "/echo/a\\..\\b",
    ],
)
@pytest.mark.parametrize("host", ["api.test", "API.test", "api.test.", "api.test:80"])
async def test_forward_auth_answers_as_the_proxy_does(stack: Stack, target: str, host: str) -> None:
    alice = stack.assertion()
    proxied = await send(stack.server.port, target, host, alice)
    asked = await send(
        stack.server.port,
        "/_auth",
        "gateway.internal",
        {**alice, **NGINX, "X-Original-URI": target, "X-Forwarded-Host": host},
    )
    # The proxy's 200 is the upstream's answer (it serves all of /echo), forward-auth's the
    # grant; anything else is the gateway's own refusal (400, 401), the same in both.
    assert asked == proxied, (target, host)
