"""A tiny gateway app that mounts the Forwarder in front of a real UpstreamApp, on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import aiohttp
import pytest
from aiohttp import web

from gateway.config import ProxySettings, Route
from gateway.devkit.upstream import UpstreamApp
from gateway.errors import GatewayError
from gateway.proxy.forward import Forwarder

from .helpers import STRIP, TOKEN, Gateway, StartGateway


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamApp]:
    app = UpstreamApp()
    await app.start()
    yield app
    await app.stop()


@pytest.fixture
async def start_gateway() -> AsyncIterator[StartGateway]:
    runners: list[web.AppRunner] = []
    forwarders: list[Forwarder] = []

    async def start(
        routes: Sequence[Route],
        proxy: ProxySettings | None = None,
        strip: frozenset[str] = STRIP,
    ) -> Gateway:
        forwarder = Forwarder(proxy or ProxySettings(), routes)
        await forwarder.start()
        forwarders.append(forwarder)
        gateway = Gateway(url="", forwarder=forwarder)

        async def handle(request: web.Request) -> web.StreamResponse:
            # longest prefix wins, as in the real pipeline
            matching = [r for r in routes if request.path.startswith(r.path_prefix)]
            route = max(matching, key=lambda r: len(r.path_prefix))
            try:
                forwarder.admit(request, route)  # as the pipeline does, first
                result = await forwarder.forward(request, route, TOKEN, strip)
            except GatewayError as exc:
                gateway.errors.append(exc)
                return web.json_response({"error": exc.error}, status=exc.status)
            gateway.results.append(result)
            return result.response

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        # as the gateway's own server: request bodies are never decoded on the way in
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0, auto_decompress=False)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        gateway.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return gateway

    yield start
    for runner in runners:
        await runner.cleanup()
    for forwarder in forwarders:
        await forwarder.close()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    # auto_decompress off: tests compare the bytes on the wire
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session
