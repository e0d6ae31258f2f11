"""The upstream misbehaves, or the client goes away mid-transfer; the gateway (a real process)
answers in bounded time, keeps its cached token, leaks no connection and stays up.

Routes (timeouts: connect 1 s, read 2 s, total 5 s):
    /raw/...    a raw TCP upstream that hangs, resets or answers garbage (``RawUpstream``)
    /dead/...   an upstream port nobody listens on
    /...        the devkit upstream (echo, streams, uploads)
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.devkit.idp import DemoIdP

from .helpers import (
    SLACK,
    SOCKET_SLACK,
    Backstage,
    Gateway,
    Parts,
    RawUpstream,
    client_session,
    fetch,
    free_port,
    gateway_yaml,
    header_for,
    issue,
)

CONNECT, READ, TOTAL = 1.0, 2.0, 5.0
BIG = 64 * 1024 * 1024


@dataclass
class Stack:
    gateway: Gateway
    parts: Parts
    raw: RawUpstream
    headers: dict[str, str]  # one assertion for the whole module: its token stays cached
    pooled: int = SOCKET_SLACK

    def url(self, path: str) -> str:
        return f"{self.gateway.url}{path}"


def routes(upstream: str, raw: str, dead: str) -> list[dict[str, Any]]:
    common: dict[str, Any] = {
        "identity_provider": "idp",
        "authorization_server": "as",
        "timeouts": {"connect": CONNECT, "read": READ, "total": TOTAL},
        "max_body_size": BIG,
    }
    return [
        {"name": "raw", "path_prefix": "/raw", "upstream": raw, "strip_prefix": True, **common},
        {"name": "dead", "path_prefix": "/dead", "upstream": dead, "strip_prefix": True, **common},
        {"name": "api", "path_prefix": "/", "upstream": upstream, **common},
    ]


@pytest.fixture(scope="module")
def stack(
    backstage: Backstage, idp: DemoIdP, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    parts = Parts.start(backstage)
    raw = RawUpstream()
    raw_url = backstage.run(raw.start())
    dead = f"http://127.0.0.1:{free_port()}"
    folder: Path = tmp_path_factory.mktemp("upstream-faults")
    path = gateway_yaml(
        folder,
        parts.auth.token_url,
        parts.upstream_url,
        idp,
        routes=routes(parts.upstream_url, raw_url, dead),
    )
    with Gateway.running(path) as gateway:
        headers = header_for(issue(idp, parts.auth.token_url))
        yield Stack(gateway, parts, raw, headers)
    backstage.run(raw.stop())
    parts.stop()


@pytest.fixture
def s(stack: Stack) -> Iterator[Stack]:
    stack.pooled = SOCKET_SLACK
    baseline = stack.gateway.sockets()
    yield stack
    assert stack.gateway.alive()
    stack.gateway.assert_no_leak(baseline, stack.pooled)
    # The token obtained by the first test is served all along: one exchange in total.
    assert stack.parts.auth.calls == 1


async def get(s: Stack, path: str) -> Any:
    async with client_session() as session:
        return await fetch(session, s.url(path), headers=s.headers)


@pytest.mark.parametrize(
    ("path", "status", "bound"),
    [
        ("/dead/x", 502, CONNECT),  # connection refused
        ("/raw/hang", 504, READ),  # accepts, reads, never answers
        ("/raw/reset-early", 502, CONNECT),  # RST instead of an answer
        ("/raw/malformed", 502, CONNECT),  # a status line that is not HTTP
        ("/raw/bad-header", 502, CONNECT),  # a header line without a colon
    ],
)
async def test_upstream_fails_before_answering(
    s: Stack, path: str, status: int, bound: float
) -> None:
    answer = await get(s, path)
    assert answer.status == status
    assert answer.seconds < bound + SLACK
    assert answer.json()["error"] in ("bad_gateway", "gateway_timeout")
    # The token is fine; the next request through a healthy route works at once.
    assert (await get(s, "/hello")).status == 200


async def test_hung_upstream_connection_is_closed(s: Stack, backstage: Backstage) -> None:
    answer = await get(s, "/raw/hang")
    assert answer.status == 504
    # The gateway gave up on the upstream connection too, instead of leaving it open.
    deadline = time.monotonic() + 10
    while backstage.call(lambda: s.raw.open) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert backstage.call(lambda: s.raw.open) == 0


async def test_upstream_resets_mid_response(s: Stack) -> None:
    started = time.monotonic()
    async with client_session() as session:
        async with session.get(s.url("/raw/reset-mid"), headers=s.headers) as response:
            # The head had gone out, so the status is the upstream's; the body is cut short
            # and the client must see that, never a short body that looks complete.
            assert response.status == 200
            assert response.headers["Content-Length"] == "100000"
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
    assert time.monotonic() - started < READ + SLACK
    assert (await get(s, "/hello")).status == 200


async def test_client_disconnects_mid_download(s: Stack) -> None:
    size = 48 * 1024 * 1024
    finished = s.parts.upstream.downloads_finished
    reader, writer = await asyncio.open_connection("127.0.0.1", s.gateway.port)
    head = f"GET /bytes/{size} HTTP/1.1\r\nHost: gw\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in s.headers.items()) + "\r\n"
    writer.write(head.encode())
    got = 0
    async with asyncio.timeout(READ + SLACK):
        while got < 1024 * 1024:
            chunk = await reader.read(65536)
            assert chunk, "the gateway closed before sending the first megabyte"
            got += len(chunk)
    writer.transport.abort()  # RST: the client is gone mid-body
    # The upstream transfer is abandoned rather than streamed to nobody.
    await asyncio.sleep(0.5)
    assert s.parts.upstream.downloads_finished == finished
    assert (await get(s, "/hello")).status == 200


async def test_client_disconnects_mid_upload(s: Stack) -> None:
    requests = s.parts.upstream.requests
    sock = socket.create_connection(("127.0.0.1", s.gateway.port), timeout=10)
    try:
        head = f"POST /upload HTTP/1.1\r\nHost: gw\r\nContent-Length: {BIG}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in s.headers.items()) + "\r\n"
        sock.sendall(head.encode())
        sent = 0
        block = b"u" * 65536
        while sent < 2 * 1024 * 1024:
            sock.sendall(block)
            sent += len(block)
        # Wait (bounded) until the upload is really streaming upstream, then vanish.
        deadline = time.monotonic() + 10
        while s.parts.upstream.upload_received == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert s.parts.upstream.requests == requests + 1
    finally:
        sock.close()
    # The upstream never receives a complete body: the stream is cut, not padded.
    await asyncio.sleep(0.5)
    assert 0 < s.parts.upstream.upload_received < BIG
    answer = await get(s, "/echo")
    assert answer.status == 200
