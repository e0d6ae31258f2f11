"""Client-supplied identity and routing headers (issue 17, attack 8): what the upstream
received through the whole gateway, from an untrusted client and from a trusted proxy."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from integration.helpers import Parts, echoed_headers, raw_request
from integration.helpers import start_stack as start_integration_stack

from gateway.devkit.idp import DemoIdP

CLAIMS = {
    "X-Real-IP": "10.1.1.1",
    "True-Client-IP": "10.1.1.2",
    "X-Client-IP": "10.1.1.3",
    "X-Cluster-Client-IP": "10.1.1.4",
    "CF-Connecting-IP": "10.1.1.5",
    "Fastly-Client-IP": "10.1.1.6",
    "X-Original-URL": "/admin/secret",
    "X-Rewrite-URL": "/admin/secret",
    "X-Original-URI": "/admin/secret",
    "X-Forwarded-Prefix": "/admin",
    "X-Forwarded-Host": "admin.internal",
    "Forwarded": "for=10.1.1.7;host=admin.internal",
    "X_Real_IP": "10.1.1.8",
}


@dataclass
class Echo:
    status: int
    answered: dict[str, str]  # the headers of the gateway's answer
    received: dict[str, str]  # the headers the upstream received (lower-case names)
    gateway_host: str  # the Host the client used


async def _echo(
    tmp_path: Path, idp: DemoIdP, parts: Parts, headers: dict[str, str], **settings: Any
) -> Echo:
    """Send ``headers`` through a fresh gateway."""
    stack = await start_integration_stack(tmp_path, idp, parts, **settings)
    try:
        async with stack.session.get(
            f"{stack.url}/echo/x", headers={**stack.assertion(), **headers}
        ) as response:
            body = json.loads(await response.read())
            return Echo(
                response.status,
                dict(response.headers),
                echoed_headers(body),
                stack.url.removeprefix("http://"),
            )
    finally:
        await stack.session.close()
        await stack.server.close()


async def test_untrusted_client_cannot_claim_an_address_or_the_url_to_serve(
    tmp_path: Path, idp: DemoIdP, parts: Parts
) -> None:
    echo = await _echo(tmp_path, idp, parts, CLAIMS)
    assert echo.status == 200
    received = echo.received
    leaked = {name for name in CLAIMS if name.lower().replace("_", "-") in received}
    assert leaked == {"X-Forwarded-Host"}  # the gateway's own: the Host the client used
    assert received["x-forwarded-host"] == echo.gateway_host
    assert received["x-forwarded-for"] == "127.0.0.1"
    assert "10.1.1" not in json.dumps(received)
    assert "/admin" not in json.dumps(received)


async def test_a_trusted_proxy_keeps_them(tmp_path: Path, idp: DemoIdP, parts: Parts) -> None:
    echo = await _echo(tmp_path, idp, parts, CLAIMS, proxy={"trusted_proxies": ["127.0.0.0/8"]})
    assert echo.status == 200
    received = echo.received
    assert received["x-real-ip"] == "10.1.1.1"
    assert received["x-original-url"] == "/admin/secret"
    assert received["x-forwarded-host"] == "admin.internal"
    assert "x_real_ip" not in received  # the underscore spelling is never a proxy's


@pytest.mark.parametrize("sent", ["client-chosen-42", "not plain; at all", "x" * 300])
async def test_the_upstream_gets_the_request_id_the_gateway_logs_and_answers_with(
    tmp_path: Path, idp: DemoIdP, parts: Parts, caplog: pytest.LogCaptureFixture, sent: str
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    echo = await _echo(tmp_path, idp, parts, {"X-Request-ID": sent})
    assert echo.status == 200
    access = [r for r in caplog.records if r.name == "gateway.access"]
    logged = [r.fields["request_id"] for r in access]  # type: ignore[attr-defined]
    assert len(logged) == 1
    assert echo.received["x-request-id"] == echo.answered["X-Request-ID"] == logged[0]
    assert (logged[0] == sent) is (sent == "client-chosen-42")  # a plain one is kept


async def test_an_underscore_request_id_does_not_reach_the_upstream(
    tmp_path: Path, idp: DemoIdP, parts: Parts
) -> None:
    stack = await start_integration_stack(tmp_path, idp, parts)
    try:
        status, body = await raw_request(
            stack.server.port, "/echo/x", {**stack.assertion(), "X_Request_ID": "forged"}
        )
    finally:
        await stack.session.close()
        await stack.server.close()
    assert status == 200
    assert "forged" not in json.dumps(json.loads(body)["headers"])
