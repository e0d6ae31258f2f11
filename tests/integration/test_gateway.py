"""End to end over real sockets: client → gateway → fake authorization server / upstream."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path

import pytest
import yaml

from gateway.app import _Connection
from gateway.devkit.idp import DemoIdP

from .helpers import Parts, Stack, echoed_headers, raw_request, start_stack

pytestmark = pytest.mark.asyncio


async def test_first_request_exchanges_and_forwards_bearer(stack: Stack) -> None:
    headers = stack.assertion()
    async with stack.session.get(f"{stack.url}/echo/orders?id=7", headers=headers) as r:
        assert r.status == 200
        body = await r.json()
        assert r.headers["X-Request-ID"]
    seen = echoed_headers(body)
    assert seen["authorization"] == f"Bearer {stack.auth.issued[0]}"
    assert "x-saml-assertion" not in seen
    assert stack.auth.calls == 1


async def test_second_request_is_a_cache_hit(stack: Stack) -> None:
    headers = stack.assertion()
    for _ in range(3):
        async with stack.session.get(f"{stack.url}/hello", headers=headers) as r:
            assert r.status == 200
    assert stack.auth.calls == 1
    assert await stack.metric("gateway_cache_hits_total") == 2


async def test_authorization_saml_scheme_is_accepted(stack: Stack) -> None:
    value = stack.assertion()["X-SAML-Assertion"]
    async with stack.session.get(
        f"{stack.url}/echo/x", headers={"Authorization": f"SAML {value}"}
    ) as r:
        assert r.status == 200
        body = await r.json()
    seen = echoed_headers(body)
    assert seen["authorization"].startswith("Bearer ")


async def test_missing_assertion_is_401_with_challenge(stack: Stack) -> None:
    async with stack.session.get(f"{stack.url}/hello", headers={"X-Request-ID": "abc-123"}) as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"] == 'SAML realm="test-api"'
        assert r.headers["X-Request-ID"] == "abc-123"
        body = await r.json()
    assert body == {
        "error": "invalid_token",
        "error_description": "no SAML assertion in the request",
        "request_id": "abc-123",
    }
    assert stack.auth.calls == 0


async def test_insane_request_id_is_replaced(stack: Stack) -> None:
    async with stack.session.get(f"{stack.url}/hello", headers={"X-Request-ID": "a b<c>"}) as r:
        assert r.status == 401
        assert r.headers["X-Request-ID"] != "a b<c>"
        assert len(r.headers["X-Request-ID"]) == 32


async def test_tampered_assertion_is_rejected_with_reason_in_metrics(stack: Stack) -> None:
    raw = stack.raw_assertion("alice@example.test")
    tampered = raw.replace(b"alice@example.test", b"mallory@example.test")
    headers = {"X-SAML-Assertion": base64.b64encode(tampered).decode()}
    async with stack.session.get(f"{stack.url}/hello", headers=headers) as r:
        assert r.status == 401
        body = await r.json()
    assert "signature" not in body["error_description"]  # the reason stays in logs and metrics
    assert await stack.metric("gateway_validation_failures_total", reason="signature") == 1
    assert stack.auth.calls == 0
    assert stack.upstream.requests == 0


async def test_not_base64_is_400(stack: Stack) -> None:
    async with stack.session.get(f"{stack.url}/hello", headers={"X-SAML-Assertion": "%%%"}) as r:
        assert r.status == 400
        assert (await r.json())["error"] == "invalid_request"


async def test_large_assertion_header_is_accepted(stack: Stack) -> None:
    attributes = {f"attr{i}": "x" * 200 for i in range(110)}
    headers = stack.assertion(attributes=attributes)
    assert len(headers["X-SAML-Assertion"]) > 32 * 1024
    async with stack.session.get(f"{stack.url}/hello", headers=headers) as r:
        assert r.status == 200


async def test_oversized_assertion_is_refused(stack: Stack) -> None:
    # Over the 64 KiB assertion cap, but within the server's header limit (cap + 1 KiB).
    for count in range(140, 180):
        headers = stack.assertion(attributes={f"attr{i}": "x" * 200 for i in range(count)})
        if 64 * 1024 < len(headers["X-SAML-Assertion"]) < 65 * 1024:
            break
    assert 64 * 1024 < len(headers["X-SAML-Assertion"]) < 65 * 1024
    async with stack.session.get(f"{stack.url}/hello", headers=headers) as r:
        assert r.status == 401
    assert await stack.metric("gateway_validation_failures_total", reason="size") == 1
    assert stack.auth.calls == 0


async def test_reused_id_with_other_content_is_replay(stack: Stack) -> None:
    first = stack.assertion("alice@example.test", assertion_id="_same-id-1")
    second = stack.assertion("bob@example.test", assertion_id="_same-id-1")
    async with stack.session.get(f"{stack.url}/hello", headers=first) as r:
        assert r.status == 200
    async with stack.session.get(f"{stack.url}/hello", headers=second) as r:
        assert r.status == 401
    assert stack.auth.calls == 1
    assert await stack.metric("gateway_validation_failures_total", reason="replay") == 1


async def test_concurrent_requests_share_one_exchange(stack: Stack) -> None:
    stack.auth.mode = "slow"
    stack.auth.delay = 0.3
    headers = stack.assertion()

    async def one() -> int:
        async with stack.session.get(f"{stack.url}/hello", headers=headers) as r:
            await r.read()
            return r.status

    statuses = await asyncio.gather(*(one() for _ in range(200)))
    assert statuses == [200] * 200
    assert stack.auth.calls == 1


async def test_upstream_invalid_token_purges_cached_token(stack: Stack) -> None:
    headers = stack.assertion()
    async with stack.session.get(f"{stack.url}/hello", headers=headers) as r:
        assert r.status == 200
    async with stack.session.get(f"{stack.url}/unauthorized", headers=headers) as r:
        assert r.status == 401  # passed through
        assert "invalid_token" in r.headers["WWW-Authenticate"]
    async with stack.session.get(f"{stack.url}/hello", headers=headers) as r:
        assert r.status == 200
    assert stack.auth.calls == 2


@pytest.mark.parametrize(
    ("mode", "status", "error"),
    [
        ("invalid_grant", 401, "invalid_token"),
        ("invalid_client", 502, "bad_gateway"),
        ("rate_limited", 503, "temporarily_unavailable"),
        ("temporarily_unavailable", 503, "temporarily_unavailable"),
        ("server_error", 502, "bad_gateway"),
        ("garbage", 502, "bad_gateway"),
        ("html", 502, "bad_gateway"),
        ("hang", 504, "gateway_timeout"),
    ],
)
async def test_authorization_server_failures_map_to_statuses(
    stack: Stack, mode: str, status: int, error: str
) -> None:
    stack.auth.mode = mode
    async with stack.session.get(f"{stack.url}/hello", headers=stack.assertion()) as r:
        assert r.status == status
        body = await r.json()
        assert body["error"] == error
        assert body["request_id"] == r.headers["X-Request-ID"]
        if mode == "rate_limited":
            assert r.headers["Retry-After"]
    assert stack.upstream.requests == 0


async def test_invalid_grant_is_remembered(stack: Stack) -> None:
    stack.auth.mode = "invalid_grant"
    headers = stack.assertion()
    for _ in range(3):
        async with stack.session.get(f"{stack.url}/hello", headers=headers) as r:
            assert r.status == 401
    assert stack.auth.calls == 1


async def test_authorization_server_down_is_502(stack: Stack) -> None:
    await stack.auth.stop()
    async with stack.session.get(f"{stack.url}/hello", headers=stack.assertion()) as r:
        assert r.status == 502


async def test_upstream_down_is_502_and_slow_is_504(stack: Stack) -> None:
    headers = stack.assertion()
    async with stack.session.get(f"{stack.url}/slow/5", headers=headers) as r:
        assert r.status == 504
    await stack.upstream.stop()
    async with stack.session.get(f"{stack.url}/hello", headers=headers) as r:
        assert r.status == 502


async def test_no_route_is_404(tmp_path: Path, idp: DemoIdP, parts: Parts) -> None:
    s = await start_stack(tmp_path, idp, parts, route={"path_prefix": "/api"})
    try:
        async with s.session.get(f"{s.url}/apix", headers=s.assertion()) as r:
            assert r.status == 404
            assert (await r.json())["error"] == "not_found"
        async with s.session.get(f"{s.url}/api/hello", headers=s.assertion()) as r:
            assert r.status == 404  # routed; the upstream itself has no /api/hello
            assert s.upstream.requests == 1
    finally:
        await s.session.close()
        await s.server.close()


async def test_admin_endpoints_and_metrics(stack: Stack) -> None:
    async with stack.session.get(f"{stack.admin}/healthz") as r:
        assert r.status == 200
    async with stack.session.get(f"{stack.admin}/readyz") as r:
        assert r.status == 200
    async with stack.session.get(f"{stack.url}/hello", headers=stack.assertion()) as r:
        assert r.status == 200
    assert await stack.metric("gateway_requests_total", route="api", status="200") == 1
    assert await stack.metric("gateway_exchanges_total", server="as", outcome="ok") == 1
    assert await stack.metric("gateway_cache_size") == 1
    assert await stack.metric("gateway_request_duration_seconds_count", route="api") == 1
    stack.server.draining = True
    async with stack.session.get(f"{stack.admin}/readyz") as r:
        assert r.status == 503


async def test_access_log_never_holds_secrets(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    headers = stack.assertion()
    async with stack.session.get(f"{stack.url}/hello", headers=headers) as r:
        assert r.status == 200
    async with stack.session.get(f"{stack.url}/hello", headers=headers) as r:
        assert r.status == 200
    access = [rec.fields for rec in caplog.records if rec.name == "gateway.access"]  # type: ignore[attr-defined]
    assert [line["cache"] for line in access[-2:]] == ["miss", "hit"]
    for line in access[-2:]:  # both lines say which assertion, from which IdP
        assert line["assertion_id"].startswith("_")
        assert line["issuer"] == "https://idp.test/saml"
    text = "\n".join(rec.getMessage() + str(getattr(rec, "fields", "")) for rec in caplog.records)
    token = stack.auth.issued[0]
    assert token not in text
    assert headers["X-SAML-Assertion"][:40] not in text
    assert "integration-secret-value" not in text


async def test_declared_oversized_body_is_413_before_any_exchange(stack: Stack) -> None:
    body = io.BytesIO(b"x" * (1024 * 1024 + 1))  # the route allows 1 MiB
    async with stack.session.post(f"{stack.url}/upload", headers=stack.assertion(), data=body) as r:
        assert r.status == 413
        assert (await r.json())["error"] == "request_too_large"
    assert stack.auth.calls == 0
    assert stack.upstream.requests == 0


async def test_a_token_cached_for_one_idp_is_not_served_on_a_route_of_another(
    tmp_path: Path, idp: DemoIdP, parts: Parts
) -> None:
    # Route /b trusts only another IdP: an assertion from the first one must be refused
    # there, even while its token sits in the cache (same authorization server).
    other = DemoIdP.generate("https://other-idp.test/saml")
    other.write_certificate(tmp_path / "other.pem")
    s = await start_stack(
        tmp_path,
        idp,
        parts,
        identity_providers={
            "idp": {"issuer": "https://idp.test/saml", "certificates": ["idp.pem"]},
            "other": {"issuer": "https://other-idp.test/saml", "certificates": ["other.pem"]},
        },
        routes=[
            {
                "name": "a",
                "path_prefix": "/a",
                "upstream": parts.upstream_url,
                "identity_provider": "idp",
                "authorization_server": "as",
                "strip_prefix": True,
            },
            {
                "name": "b",
                "path_prefix": "/b",
                "upstream": parts.upstream_url,
                "identity_provider": "other",
                "authorization_server": "as",
                "strip_prefix": True,
            },
        ],
    )
    try:
        headers = s.assertion()
        async with s.session.get(f"{s.url}/a/hello", headers=headers) as r:
            assert r.status == 200
        async with s.session.get(f"{s.url}/b/hello", headers=headers) as r:
            assert r.status == 401
        assert await s.metric("gateway_validation_failures_total", reason="signature") == 1
        assert s.upstream.requests == 1
    finally:
        await s.session.close()
        await s.server.close()


async def test_reload_that_removes_the_signing_certificate_drops_its_tokens(
    stack: Stack,
) -> None:
    headers = stack.assertion()
    async with stack.session.get(f"{stack.url}/hello", headers=headers) as r:
        assert r.status == 200
    assert await stack.server.reload()  # nothing changed: the token stays
    async with stack.session.get(f"{stack.url}/hello", headers=headers) as r:
        assert r.status == 200
    assert stack.auth.calls == 1
    # The IdP's key is rotated out (say it leaked): its assertions must stop working now,
    # not when their cached tokens expire.
    DemoIdP.generate("https://idp.test/saml").write_certificate(
        stack.config_path.parent / "idp.pem"
    )
    assert await stack.server.reload()
    async with stack.session.get(f"{stack.url}/hello", headers=headers) as r:
        assert r.status == 401
    assert await stack.metric("gateway_validation_failures_total", reason="signature") == 1
    assert stack.auth.calls == 1


@pytest.mark.parametrize(
    "target", ["/public/../admin/users", "/public/%2E%2E/admin/users", "//admin/public/users"]
)
async def test_paths_that_could_reach_another_route_are_400(stack: Stack, target: str) -> None:
    status, body = await raw_request(stack.server.port, target, stack.assertion())
    assert status == 400
    assert b'"invalid_request"' in body
    assert stack.upstream.requests == 0
    assert stack.auth.calls == 0


async def test_encoded_path_reaches_the_upstream_byte_exact(stack: Stack) -> None:
    status, body = await raw_request(stack.server.port, "/echo/a%2Cb%7E?x=%20", stack.assertion())
    assert status == 200
    assert json.loads(body)["raw_path"] == "/echo/a%2Cb%7E?x=%20"


async def test_reload_that_changes_the_servers_scope_drops_its_tokens(stack: Stack) -> None:
    headers = stack.assertion()
    async with stack.session.get(f"{stack.url}/hello", headers=headers) as r:
        assert r.status == 200
    config = yaml.safe_load(stack.config_path.read_text())
    config["authorization_servers"]["as"]["scope"] = "orders.read"
    stack.config_path.write_text(yaml.safe_dump(config))
    assert await stack.server.reload()
    async with stack.session.get(f"{stack.url}/hello", headers=headers) as r:
        assert r.status == 200
    assert stack.auth.calls == 2  # a token with the new scope, not the cached one


async def test_reload_lets_requests_in_flight_finish(
    tmp_path: Path, idp: DemoIdP, parts: Parts
) -> None:
    s = await start_stack(
        tmp_path, idp, parts, lifecycle={"shutdown_grace": 0, "drain_timeout": 0.2}
    )
    try:
        headers = s.assertion()
        slow = asyncio.create_task(s.session.get(f"{s.url}/slow/1.2", headers=headers))
        await asyncio.sleep(0.3)  # in flight, inside the runtime the reload retires
        assert await s.server.reload()
        response = await slow
        assert response.status == 200  # not cut when the old runtime was retired
        await response.read()
        response.release()
    finally:
        await s.session.close()
        await s.server.close()


async def expect_continue(port: int, headers: dict[str, str]) -> bytes:
    """POST with ``Expect: 100-continue``: what the gateway says before the body is sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = ["POST /upload HTTP/1.1", "Host: gw.test", "Content-Length: 5", "Expect: 100-continue"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    try:
        async with asyncio.timeout(3):
            first = await reader.readuntil(b"\r\n\r\n")
        if first.startswith(b"HTTP/1.1 100"):
            writer.write(b"hello")
            async with asyncio.timeout(3):
                first += await reader.readuntil(b"\r\n\r\n")
        return first
    finally:
        writer.close()


async def test_expect_continue_is_answered_once_the_assertion_is_accepted(stack: Stack) -> None:
    answer = await expect_continue(stack.server.port, stack.assertion())
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200")
    # A refused assertion gets its 401 at once: the client never uploads the body.
    refused = await expect_continue(stack.server.port, {})
    assert refused.startswith(b"HTTP/1.1 401")


async def test_a_request_head_that_never_ends_is_cut(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_Connection, "FIRST_HEAD_SECONDS", 0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.server.port)
    # A slow client: a large header, and the blank line that ends the head never comes.
    writer.write(b"GET /hello HTTP/1.1\r\nHost: gw.test\r\nX-Padding: " + b"p" * 60_000 + b"\r\n")
    async with asyncio.timeout(5):
        assert await reader.read() == b""  # closed by the gateway, without an answer
    writer.close()
    assert stack.upstream.requests == 0


async def test_a_request_head_over_the_total_limit_is_cut(stack: Stack) -> None:
    # Each line is within the per-line limit (sized for an assertion); together they are not.
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.server.port)
    line = b"X-Pad-%d: " + b"a" * 60_000 + b"\r\n"
    try:
        writer.write(b"GET /hello HTTP/1.1\r\nHost: gw.test\r\n")
        for i in range(95):
            writer.write(line.replace(b"%d", str(i).encode()))
            await writer.drain()
        async with asyncio.timeout(5):  # a timeout here means the head was kept: a failure
            cut = await reader.read() == b""
    except ConnectionError:  # the cut may come at any write
        cut = True
    assert cut
    writer.close()
    async with stack.session.get(f"{stack.url}/hello", headers=stack.assertion()) as r:
        assert r.status == 200  # and the gateway serves on
