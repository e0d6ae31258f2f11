"""A real Caddy with forward_auth in front of a real upstream, the gateway as the authorizer.

Caddy runs the shipped ``config/forward-auth/Caddyfile`` with only its addresses replaced.
Caddy's forward_auth passes every client header on to the authorizer, so this is where a
client-sent ``X-Original-URI`` used to choose the route. The gateway has two routes:
``/echo`` trusts the suite's IdP, ``/echo/admin`` a partner IdP.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from integration.helpers import Parts, Stack, echoed_headers, raw_request, start_stack

from gateway.devkit.idp import DemoIdP

from .caddy_runner import Caddy, caddy_binary, start_caddy
from .helpers import signed_by, two_routes
from .nginx_runner import EXAMPLES, example, free_port

pytestmark = pytest.mark.skipif(
    caddy_binary() is None, reason="caddy is not installed (make system-deps installs it)"
)

EXAMPLE_GATEWAY = yaml.safe_load((EXAMPLES / "gateway.yaml").read_text())


@dataclass
class Front:
    caddy: Caddy
    stack: Stack
    url: str
    port: int


# The example's deletions of client headers the gateway ignores anyway: without them, Caddy
# passes a client's X-Original-URI on, as a Caddyfile written from Caddy's manual does.
STRIPPED = """\t\t\theader_up -X-Original-URI
\t\t\theader_up -X-Original-Method
\t\t\theader_up -X-Original-Host
"""


@pytest.fixture(params=["shipped", "without its header deletions"])
async def front(
    request: pytest.FixtureRequest, tmp_path: Path, idp: DemoIdP, partner_idp: DemoIdP, parts: Parts
) -> AsyncIterator[Front]:
    upstream = parts.upstream_url
    routes = two_routes(tmp_path, partner_idp, upstream, public="/echo", admin="/echo/admin")
    stack = await start_stack(
        tmp_path,
        idp,
        parts,
        forward_auth={
            **EXAMPLE_GATEWAY["forward_auth"],
            "front": "caddy",
            "listen": {"host": "127.0.0.1", "port": 0},
        },
        assertion=EXAMPLE_GATEWAY["assertion"],
        **routes,
    )
    port = free_port()
    caddyfile = example(
        "Caddyfile",
        {
            ":80 {": f":{port} {{\n\tbind 127.0.0.1",
            "forward_auth 127.0.0.1:8081 {": (
                f"forward_auth 127.0.0.1:{stack.server.auth_port} {{"
            ),
            "reverse_proxy 127.0.0.1:9000 {": (
                f"reverse_proxy {parts.upstream_url.removeprefix('http://')} {{"
            ),
            STRIPPED: STRIPPED if request.param == "shipped" else "",
        },
    )
    try:
        caddy = start_caddy(tmp_path / "caddy", caddyfile, port)
    except BaseException:
        await stack.session.close()
        await stack.server.close()
        raise
    yield Front(caddy, stack, f"http://127.0.0.1:{port}", port)
    caddy.stop()
    await stack.session.close()
    await stack.server.close()


async def test_valid_assertion_reaches_upstream_with_the_issued_token(front: Front) -> None:
    stack = front.stack
    headers = {**stack.assertion(), "Authorization": "Bearer forged-by-client"}
    async with stack.session.post(f"{front.url}/echo/orders?id=7", headers=headers) as r:
        assert r.status == 200, front.caddy.errors()
        body = await r.json()
    seen = echoed_headers(body)
    assert body["method"] == "POST" and body["raw_path"] == "/echo/orders?id=7"
    assert seen["authorization"] == f"Bearer {stack.auth.issued[0]}"
    assert "x-saml-assertion" not in seen
    assert stack.upstream.requests == 1


async def test_refusal_is_the_gateways_answer(front: Front) -> None:
    stack = front.stack
    async with stack.session.get(f"{front.url}/echo/admin/x", headers=stack.assertion()) as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"] == 'SAML realm="test-admin"'
        assert (await r.json())["error"] == "invalid_token"
    async with stack.session.get(f"{front.url}/elsewhere", headers=stack.assertion()) as r:
        assert r.status == 404
    assert stack.upstream.requests == 0


@pytest.mark.parametrize(
    "forged",
    [
        {"X-Original-URI": "/echo"},  # what nginx's example sets; Caddy passes it through
        {"X-Forwarded-Uri": "/echo"},  # Caddy's own header: it overwrites the client's
        {"X-Original-URI": "/echo", "X-Forwarded-Uri": "/echo", "X-Original-Method": "GET"},
    ],
)
async def test_client_sent_original_uri_cannot_choose_the_route(
    front: Front, forged: dict[str, str]
) -> None:
    """GET /echo/admin/x with an assertion valid for /echo only stays on the admin route."""
    stack = front.stack
    headers = {**stack.assertion(), **forged}
    async with stack.session.get(f"{front.url}/echo/admin/x", headers=headers) as r:
        assert r.status == 401
        assert "Bearer" not in await r.text()
    assert stack.upstream.requests == 0
    assert stack.auth.calls == 0
    assert await stack.metric("gateway_requests_total", route="admin", status="401") == 1


async def test_admin_route_serves_its_own_idp(front: Front, partner_idp: DemoIdP) -> None:
    stack = front.stack
    headers = {**signed_by(partner_idp, stack), "X-Original-URI": "/echo"}
    async with stack.session.get(f"{front.url}/echo/admin/x", headers=headers) as r:
        assert r.status == 200, front.caddy.errors()
        assert echoed_headers(await r.json())["authorization"] == (f"Bearer {stack.auth.issued[0]}")


@pytest.mark.parametrize(
    "target", ["/echo/x/../admin/y", "/echo/x/%2e%2e/admin/y", "/echo/x/..%2Fadmin/y"]
)
async def test_paths_resolving_elsewhere_are_refused(front: Front, target: str) -> None:
    """Caddy passes the path as sent; the gateway refuses it rather than route it."""
    status, body = await raw_request(front.port, target, front.stack.assertion())
    assert status == 400
    assert b"Bearer" not in body
    assert front.stack.upstream.requests == 0


async def test_invalid_or_missing_assertion_is_401_and_never_reaches_upstream(
    front: Front,
) -> None:
    stack = front.stack
    raw = stack.raw_assertion("alice@example.test").replace(b"alice@", b"mallory@", 1)
    tampered = {"X-SAML-Assertion": base64.b64encode(raw).decode()}
    for headers in (tampered, {}, {"Authorization": "Bearer forged-by-client"}):
        async with stack.session.get(f"{front.url}/echo/x", headers=headers) as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"] == 'SAML realm="test-api"'
    assert stack.upstream.requests == 0
    assert stack.auth.calls == 0


async def test_gateway_down_fails_closed(front: Front) -> None:
    stack = front.stack
    await stack.server.close()
    for headers in (stack.assertion(), {}):
        async with stack.session.get(f"{front.url}/echo/x", headers=headers) as r:
            assert r.status == 502
            assert "Bearer" not in await r.text()
    assert stack.upstream.requests == 0
