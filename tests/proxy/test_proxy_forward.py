"""The forwarder end to end: a client, the forwarder in a tiny app, a real upstream, on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from gateway.config import ProxySettings, RouteTimeouts
from gateway.devkit.upstream import CHUNK, GZIP_BODY, UpstreamApp, pattern_bytes

from .helpers import StartGateway, closed_port, make_route

MB = 1024 * 1024
FIFTY_MB = 50 * MB


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def header_names(echo: dict[str, Any]) -> list[str]:
    return [name for name, _ in echo["headers"]]


def header(echo: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in echo["headers"] if key.lower() == name.lower()]


async def test_header_hygiene(
    upstream: UpstreamApp, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway([make_route(upstream.base_url)])
    sent = [
        ("X-SAML-Assertion", "PHNhbWw+"),
        ("X_SAML_Assertion", "PHNhbWw+"),
        ("Authorization", "Bearer client-supplied"),
        ("authorization", "SAML PHNhbWw+"),
        ("X-Forwarded-For", "6.6.6.6"),
        ("X_Forwarded_For", "6.6.6.6"),
        ("x-forwarded-host", "evil.example"),
        ("Forwarded", "for=6.6.6.6"),
        ("Connection", "X-Hop-Named"),
        ("X-Hop-Named", "secret"),
        ("Proxy-Authorization", "Basic Zm9v"),
        ("X-Kept", "yes"),
    ]
    async with client.get(
        gw.url + "/echo/h",
        headers=CIMultiDict(sent),
        skip_auto_headers=("Accept-Encoding", "User-Agent", "Accept"),
    ) as resp:
        assert resp.status == 200
        echo = await resp.json()
    names = [n.lower().replace("_", "-") for n in header_names(echo)]
    assert header(echo, "Authorization") == ["Bearer tok-123"]
    assert "x-saml-assertion" not in names
    assert header(echo, "X-Forwarded-For") == ["127.0.0.1"]
    assert names.count("x-forwarded-for") == 1
    assert header(echo, "X-Forwarded-Host") == [gw.url.removeprefix("http://")]
    assert header(echo, "X-Forwarded-Proto") == ["http"]
    assert header(echo, "Host") == [upstream.base_url.removeprefix("http://")]
    for dropped in ("forwarded", "x-hop-named", "proxy-authorization"):
        assert dropped not in names
    assert header(echo, "X-Kept") == ["yes"]
    # the forwarder adds nothing the client did not send (no Accept-Encoding: no gzip surprise)
    for absent in ("accept-encoding", "user-agent", "accept", "content-type", "cookie"):
        assert absent not in names
    assert gw.results[-1].upstream_status == 200


async def test_trusted_proxy_chain_is_appended(
    upstream: UpstreamApp, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(
        [make_route(upstream.base_url, preserve_host=True)],
        ProxySettings(trusted_proxies=("127.0.0.0/8",)),
    )
    headers = {
        "X-Forwarded-For": "198.51.100.1",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "public.example",
        "Host": "public.example",
    }
    async with client.get(gw.url + "/echo", headers=headers) as resp:
        echo = await resp.json()
    assert header(echo, "X-Forwarded-For") == ["198.51.100.1, 127.0.0.1"]
    assert header(echo, "X-Forwarded-Proto") == ["https"]
    assert header(echo, "X-Forwarded-Host") == ["public.example"]
    assert header(echo, "Host") == ["public.example"]  # preserve_host


async def test_encoded_path_and_query_pass_byte_exact(
    upstream: UpstreamApp, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway([make_route(upstream.base_url)])
    target = "/echo/a%2Fb/%7E?x=%20&y=%2B+z"
    async with client.get(URL(gw.url + target, encoded=True)) as resp:
        echo = await resp.json()
    assert echo["raw_path"] == target
    assert upstream.last_raw_path == target


async def test_strip_prefix(
    upstream: UpstreamApp, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(
        [
            make_route(upstream.base_url, path_prefix="/api", strip_prefix=True),
            make_route(upstream.base_url, path_prefix="/keep", strip_prefix=False),
        ]
    )
    async with client.get(URL(gw.url + "/api/echo/x%2Fy?q=1", encoded=True)) as resp:
        assert (await resp.json())["raw_path"] == "/echo/x%2Fy?q=1"
    async with client.get(gw.url + "/keep/echo") as resp:
        assert resp.status == 404  # the upstream has no /keep/...
    assert upstream.last_raw_path == "/keep/echo"


async def test_gzip_passes_through_byte_identical(
    upstream: UpstreamApp, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway([make_route(upstream.base_url)])
    async with client.get(gw.url + "/gzip", headers={"Accept-Encoding": "gzip"}) as resp:
        body = await resp.read()
        assert resp.headers["Content-Encoding"] == "gzip"
        assert resp.headers["Content-Length"] == str(len(GZIP_BODY))
    assert body == GZIP_BODY
    assert header_names_of_last(upstream).count("Accept-Encoding") == 1


def header_names_of_last(upstream: UpstreamApp) -> list[str]:
    return list(upstream.last_headers.keys())


async def test_head_204_304(
    upstream: UpstreamApp, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway([make_route(upstream.base_url)])
    async with client.head(gw.url + "/bytes/1000") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "1000"
        assert await resp.read() == b""
    async with client.get(gw.url + "/status/204") as resp:
        assert resp.status == 204
        assert await resp.read() == b""
        assert "Transfer-Encoding" not in resp.headers
    async with client.get(gw.url + "/status/304", headers={"If-None-Match": '"v1"'}) as resp:
        assert resp.status == 304
        assert resp.headers["ETag"] == '"v1"'
        assert await resp.read() == b""
    # the keep-alive connection is still usable after bodiless answers
    async with client.get(gw.url + "/hello") as resp:
        assert await resp.text() == "hello"


async def test_redirect_is_passed_through_not_followed(
    upstream: UpstreamApp, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway([make_route(upstream.base_url)])
    async with client.get(gw.url + "/redirect", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/echo/redirected"
    assert upstream.requests == 1


async def test_fifty_mb_response_is_streamed(
    upstream: UpstreamApp, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway([make_route(upstream.base_url)])
    expected = hashlib.sha256()
    for chunk_start in range(0, FIFTY_MB, CHUNK):
        expected.update(pattern_bytes(min(CHUNK, FIFTY_MB - chunk_start)))
    baseline = rss_bytes()
    peak = baseline
    digest = hashlib.sha256()
    async with client.get(gw.url + f"/bytes/{FIFTY_MB}") as resp:
        assert resp.headers["Content-Length"] == str(FIFTY_MB)
        first = await resp.content.readany()
        # the client holds the first bytes while the upstream is still sending: no buffering
        assert first
        assert upstream.downloads_finished == 0
        received = len(first)
        digest.update(first)
        async for chunk in resp.content.iter_any():
            received += len(chunk)
            digest.update(chunk)
            peak = max(peak, rss_bytes())
    assert received == FIFTY_MB
    assert digest.hexdigest() == expected.hexdigest()
    assert upstream.downloads_finished == 1
    assert peak - baseline < 20 * MB


async def test_fifty_mb_chunked_upload_is_streamed(
    upstream: UpstreamApp, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway([make_route(upstream.base_url, max_body_size=64 * MB)])
    block = os.urandom(MB)
    baseline = rss_bytes()
    peak = baseline

    async def body() -> AsyncIterator[bytes]:
        nonlocal peak
        for _ in range(49):
            yield block
            peak = max(peak, rss_bytes())
        # The upstream must be reading before the client has sent everything.
        await asyncio.wait_for(upstream.upload_started.wait(), timeout=10)
        assert upstream.upload_received < FIFTY_MB
        yield block

    async with client.post(gw.url + "/upload", data=body()) as resp:
        assert resp.status == 200
        result = await resp.json()
    assert result["length"] == FIFTY_MB
    assert result["sha256"] == hashlib.sha256(block * 50).hexdigest()
    assert upstream.last_headers.get("Transfer-Encoding") == "chunked"
    assert peak - baseline < 20 * MB


async def test_post_with_content_length_is_forwarded_with_it(
    upstream: UpstreamApp, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway([make_route(upstream.base_url)])
    async with client.put(gw.url + "/echo/put", data=b"x" * 5000) as resp:
        echo = await resp.json()
    assert echo["method"] == "PUT"
    assert echo["body_length"] == 5000
    assert header(echo, "Content-Length") == ["5000"]
    assert header(echo, "Transfer-Encoding") == []


async def test_body_over_limit_by_content_length_is_413_without_upstream_call(
    upstream: UpstreamApp, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway([make_route(upstream.base_url, max_body_size=1000)])
    async with client.post(gw.url + "/upload", data=b"x" * 1001) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"] == "request_too_large"
    assert upstream.requests == 0
    async with client.post(gw.url + "/upload", data=b"x" * 1000) as resp:
        assert resp.status == 200


async def test_chunked_body_over_limit_is_413(
    upstream: UpstreamApp, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway([make_route(upstream.base_url, max_body_size=1000)])

    async def body() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 400

    async with client.post(gw.url + "/upload", data=body()) as resp:
        assert resp.status == 413
    assert gw.errors[-1].reason == "body_too_large"
    # the upstream never got a complete-looking body
    assert upstream.upload_received <= 1000


async def test_upstream_down_is_502(
    start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway([make_route(f"http://127.0.0.1:{closed_port()}")])
    async with client.get(gw.url + "/anything") as resp:
        assert resp.status == 502
        assert (await resp.json())["error"] == "bad_gateway"
    assert gw.errors[-1].reason == "upstream_unreachable"


async def test_upstream_slow_is_504(
    upstream: UpstreamApp, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    timeouts = RouteTimeouts(connect=1, read=0.3, total=5)
    gw = await start_gateway([make_route(upstream.base_url, timeouts=timeouts)])
    async with client.get(gw.url + "/slow/5") as resp:
        assert resp.status == 504
        assert (await resp.json())["error"] == "gateway_timeout"
    assert gw.errors[-1].reason == "upstream_timeout"


async def test_total_timeout_is_504(
    upstream: UpstreamApp, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    timeouts = RouteTimeouts(connect=1, read=10, total=0.3)
    gw = await start_gateway([make_route(upstream.base_url, timeouts=timeouts)])
    async with client.get(gw.url + "/slow/5") as resp:
        assert resp.status == 504


async def test_invalid_token_401_is_detected_and_relayed(
    upstream: UpstreamApp, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway([make_route(upstream.base_url)])
    async with client.get(gw.url + "/unauthorized") as resp:
        assert resp.status == 401
        assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    assert gw.results[-1].token_rejected is True
    assert gw.results[-1].upstream_status == 401
    async with client.get(gw.url + "/status/401") as resp:
        assert resp.status == 401
    assert gw.results[-1].token_rejected is False


async def test_upstream_dying_mid_body_cuts_the_client_quietly(
    upstream: UpstreamApp,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw = await start_gateway([make_route(upstream.base_url)])
    with caplog.at_level(logging.WARNING):
        async with client.get(gw.url + "/truncated") as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        # the gateway keeps serving, on fresh connections
        async with client.get(gw.url + "/hello") as resp:
            assert await resp.text() == "hello"
    cut = [r for r in caplog.records if r.name == "gateway.proxy.forward"]
    assert len(cut) == 1
    assert cut[0].exc_info is None
    assert "upstream failed" in cut[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_small_body_cut_short_is_502_before_anything_is_sent(
    upstream: UpstreamApp, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    # A small announced body is read whole first, so a short one is still a clean error.
    gw = await start_gateway([make_route(upstream.base_url)])
    async with client.get(gw.url + "/truncated?length=1000") as resp:
        assert resp.status == 502
    async with client.get(gw.url + "/hello") as resp:
        assert await resp.text() == "hello"


async def test_client_leaving_mid_download_releases_everything(
    upstream: UpstreamApp, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway([make_route(upstream.base_url)])
    resp = await client.get(gw.url + f"/bytes/{FIFTY_MB}")
    assert await resp.content.readany()
    resp.close()  # drop the connection with most of the body unread
    # the forwarder notices on its next write; bounded wait for it to let go upstream
    for _ in range(200):
        if gw.results:
            break
        await asyncio.sleep(0.025)
    assert gw.results and gw.results[-1].upstream_status == 200
    assert upstream.downloads_finished == 0
    async with client.get(gw.url + "/hello") as again:
        assert await again.text() == "hello"


async def test_upstream_reset_before_response_is_502(
    start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    async def slam(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()  # the request line arrived; hang up without a word
        writer.close()

    server = await asyncio.start_server(slam, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gw = await start_gateway([make_route(f"http://127.0.0.1:{port}")])
        async with client.get(gw.url + "/x") as resp:
            assert resp.status == 502
        assert gw.errors[-1].reason == "upstream_unreachable"
    finally:
        server.close()
        await server.wait_closed()


async def test_garbage_from_upstream_is_502(
    start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    async def babble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(babble, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gw = await start_gateway([make_route(f"http://127.0.0.1:{port}")])
        async with client.get(gw.url + "/x") as resp:
            assert resp.status == 502
        assert gw.errors[-1].reason == "upstream_invalid_response"
    finally:
        server.close()
        await server.wait_closed()
