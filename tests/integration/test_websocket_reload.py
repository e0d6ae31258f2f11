"""WebSockets outlive reloads; only their route's websocket_idle/websocket_lifetime end them.

A real gateway process with small HTTP timeouts: before, a SIGHUP retired the running
configuration and, once its HTTP timeouts had passed (here 2 s + 1 s), closed its open
WebSockets with 1001.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml
from faults.helpers import (
    Backstage,
    Gateway,
    Parts,
    client_session,
    fetch,
    gateway_yaml,
    header_for,
    issue,
    metric,
)

from gateway.devkit.idp import DemoIdP

HTTP_TIMEOUTS = {"connect": 1, "read": 1, "total": 2}
IDLE, LIFETIME = 1.5, 4.0  # the /bounded route's websocket_idle and websocket_lifetime


@dataclass
class Stack:
    gateway: Gateway
    parts: Parts
    headers: dict[str, str]

    def ws_url(self, path: str) -> str:
        return self.gateway.url.replace("http://", "ws://") + path

    async def reloads(self) -> float:
        async with client_session() as session:
            text = (await fetch(session, f"{self.gateway.admin}/metrics")).body.decode()
        return metric(text, "gateway_config_reloads_total", result="ok")

    async def reload_with(self, realm: str) -> None:
        """Change the default route's realm, SIGHUP, wait (bounded) until it is applied."""
        path = self.gateway.config_path
        data = yaml.safe_load(path.read_text())
        data["routes"][-1]["realm"] = realm
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        before = await self.reloads()
        self.gateway.hup()
        deadline = time.monotonic() + 10
        while await self.reloads() == before:
            assert time.monotonic() < deadline, "no reload counted within 10 s"
            await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def stack(idp: DemoIdP, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    backstage = Backstage()
    parts = Parts.start(backstage)
    folder: Path = tmp_path_factory.mktemp("ws-reload")
    common = {
        "upstream": parts.upstream_url,
        "identity_provider": "idp",
        "authorization_server": "as",
    }
    routes = [
        {
            **common,
            "name": "bounded",
            "path_prefix": "/bounded",
            "strip_prefix": True,
            "timeouts": {**HTTP_TIMEOUTS, "websocket_idle": IDLE, "websocket_lifetime": LIFETIME},
        },
        {**common, "name": "api", "path_prefix": "/", "timeouts": HTTP_TIMEOUTS},
    ]
    server = {"retries": {"attempts": 2, "backoff": 0.05, "max_backoff": 0.1, "deadline": 1}}
    path = gateway_yaml(
        folder, parts.auth.token_url, parts.upstream_url, idp, routes=routes, server=server
    )
    try:
        with Gateway.running(path) as gateway:
            yield Stack(gateway, parts, header_for(issue(idp, parts.auth.token_url)))
    finally:
        parts.stop()
        backstage.close()


async def echo(ws: aiohttp.ClientWebSocketResponse, text: str) -> None:
    await ws.send_str(text)
    msg = await ws.receive(timeout=5)
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.TEXT, text), msg


async def test_open_websocket_outlives_a_reload(stack: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(stack.ws_url("/ws"), headers=stack.headers) as ws:
            await echo(ws, "before")
            await stack.reload_with("after-reload")
            # New requests are served by the new configuration...
            async with session.get(stack.gateway.url + "/hello") as refused:
                assert refused.status == 401
                assert refused.headers["WWW-Authenticate"] == 'SAML realm="after-reload"'
            # ...while the socket opened before it lives on, well past the retired
            # configuration's HTTP timeouts (2 s + the 1 s exchange deadline).
            for i in range(16):
                await echo(ws, f"message {i}")
                await asyncio.sleep(0.5)
            assert not ws.closed
            await ws.close(code=4000, message=b"done")
    deadline = time.monotonic() + 10
    while 4000 not in await upstream_close_codes(stack):
        assert time.monotonic() < deadline, "the client's close never reached the upstream"
        await asyncio.sleep(0.05)


async def upstream_close_codes(stack: Stack) -> list[int | None]:
    closed = stack.parts.upstream.ws_closed_codes
    return stack.parts.backstage.call(lambda: list(closed))


async def test_an_idle_websocket_is_closed_after_websocket_idle(stack: Stack) -> None:
    seen = len(await upstream_close_codes(stack))
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(stack.ws_url("/bounded/ws"), headers=stack.headers) as ws:
            await echo(ws, "hello")
            msg = await ws.receive(timeout=IDLE + 15)  # bounded: a hang fails here
            assert msg.type is aiohttp.WSMsgType.CLOSE
            assert (msg.data, msg.extra) == (aiohttp.WSCloseCode.GOING_AWAY, "websocket idle")
    # both sides are told
    deadline = time.monotonic() + 10
    while len(await upstream_close_codes(stack)) == seen:
        assert time.monotonic() < deadline, "the upstream side was never closed"
        await asyncio.sleep(0.05)
    assert (await upstream_close_codes(stack))[seen:] == [aiohttp.WSCloseCode.GOING_AWAY]


async def test_a_busy_websocket_is_closed_after_websocket_lifetime(stack: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(stack.ws_url("/bounded/ws"), headers=stack.headers) as ws:
            started = time.monotonic()
            msg: aiohttp.WSMessage | None = None
            while time.monotonic() - started < LIFETIME + 15:  # bounded in time
                with contextlib.suppress(ConnectionResetError):  # the close may come first
                    await ws.send_str("busy")
                msg = await ws.receive(timeout=5)
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break
                await asyncio.sleep(IDLE / 4)  # never idle long enough for the idle bound
            assert msg is not None and msg.type is aiohttp.WSMsgType.CLOSE, msg
            assert msg.data == aiohttp.WSCloseCode.GOING_AWAY
            assert msg.extra == "websocket lifetime reached"


async def test_a_websocket_of_a_retired_configuration_keeps_its_route_bound(
    stack: Stack,
) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(stack.ws_url("/bounded/ws"), headers=stack.headers) as ws:
            await echo(ws, "hello")
            await stack.reload_with("second-reload")
            msg = await ws.receive(timeout=IDLE + 15)
            assert msg.type is aiohttp.WSMsgType.CLOSE
            assert (msg.data, msg.extra) == (aiohttp.WSCloseCode.GOING_AWAY, "websocket idle")


def test_clean_shutdown_after_the_reloads(stack: Stack) -> None:
    """Last in this module: every retired configuration closed its sessions, no task lost."""
    stack.gateway.stop()
    assert stack.gateway.process.proc.returncode == 0
    logs = stack.gateway.logs()
    assert "Unclosed" not in logs
    assert "never retrieved" not in logs
    assert "Traceback" not in logs
