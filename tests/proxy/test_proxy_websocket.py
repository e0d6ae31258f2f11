"""WebSocket upgrades through the forwarder: Bearer on the handshake, frames and close codes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp

from gateway.devkit.upstream import UpstreamApp

from .helpers import StartGateway, closed_port, make_route


async def wait_for(condition: Callable[[], object], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_websocket_echo_with_bearer_on_the_handshake(
    upstream: UpstreamApp, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway([make_route(upstream.base_url)])
    headers = {"X-SAML-Assertion": "PHNhbWw+", "Authorization": "Bearer client-supplied"}
    async with client.ws_connect(gw.url + "/ws", headers=headers, protocols=("chat",)) as ws:
        assert ws.protocol == "chat"
        await ws.send_str("hello")
        assert (await ws.receive(timeout=5)).data == "hello"
        await ws.send_bytes(b"\x00\x01binary")
        assert (await ws.receive(timeout=5)).data == b"\x00\x01binary"
        await ws.close(code=4002, message=b"done")
    assert upstream.last_headers["Authorization"] == "Bearer tok-123"
    assert "X-SAML-Assertion" not in upstream.last_headers
    assert upstream.last_headers["X-Forwarded-For"] == "127.0.0.1"
    # the client's close code reaches the upstream
    await wait_for(lambda: upstream.ws_closed_codes)
    assert upstream.ws_closed_codes == [4002]
    await wait_for(lambda: gw.results)
    assert gw.results[-1].upstream_status == 101


async def test_upstream_close_code_reaches_the_client(
    upstream: UpstreamApp, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway([make_route(upstream.base_url)])
    async with client.ws_connect(gw.url + "/ws") as ws:
        await ws.send_str("close:4001")
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == 4001
        assert msg.extra == "bye"
    assert ws.close_code == 4001


async def test_refused_upgrade_is_relayed_as_its_status(
    upstream: UpstreamApp, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway([make_route(upstream.base_url)])
    headers = {"Upgrade": "websocket", "Connection": "Upgrade"}
    # a valid handshake to a path the upstream does not upgrade: its 401 comes back
    try:
        async with client.ws_connect(gw.url + "/unauthorized", headers=headers):
            raise AssertionError("the upgrade should have been refused")
    except aiohttp.WSServerHandshakeError as exc:
        assert exc.status == 401
    assert gw.results[-1].token_rejected is True


async def test_websocket_to_a_dead_upstream_is_502(
    start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway([make_route(f"http://127.0.0.1:{closed_port()}")])
    try:
        async with client.ws_connect(gw.url + "/ws"):
            raise AssertionError("no upstream to upgrade with")
    except aiohttp.WSServerHandshakeError as exc:
        assert exc.status == 502


async def test_upstream_vanishing_closes_the_client_with_bad_gateway(
    upstream: UpstreamApp, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    gw = await start_gateway([make_route(upstream.base_url)])
    async with client.ws_connect(gw.url + "/ws") as ws:
        await ws.send_str("drop")
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == aiohttp.WSCloseCode.BAD_GATEWAY
