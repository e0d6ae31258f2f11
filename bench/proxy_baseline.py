"""A minimal aiohttp reverse proxy (the baseline), and its cost next to the gateway's forwarder.

``start_baseline_proxy(upstream)`` is the smallest honest aiohttp proxy: one pooled session,
streamed bodies, hop-by-hop headers dropped, nothing else. Run as a script it times, over
loopback, GET /hello and a 1 MiB download (requests per second, fixed concurrency, a few
seconds each): the upstream directly, through the baseline, and through ``Forwarder``
(no SAML: the forwarding half only). Everything shares one event loop, so read the ratios.

    .venv/bin/python bench/proxy_baseline.py
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web

from gateway.config import ProxySettings, Route
from gateway.devkit.upstream import UpstreamApp
from gateway.proxy.forward import Forwarder
from gateway.proxy.headers import HOP_BY_HOP

SECONDS = 3.0
CONCURRENCY = 32


async def start_baseline_proxy(upstream: str) -> tuple[web.AppRunner, str]:
    session = aiohttp.ClientSession(auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers.pop("Host", None)
        data = request.content if request.body_exists else None
        async with session.request(
            request.method,
            upstream + request.raw_path,
            headers=headers,
            data=data,
            allow_redirects=False,
        ) as upstream_response:
            response = web.StreamResponse(status=upstream_response.status)
            response.headers.extend(
                (k, v) for k, v in upstream_response.headers.items() if k.lower() not in HOP_BY_HOP
            )
            await response.prepare(request)
            async for chunk in upstream_response.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def close_session(app: web.Application) -> None:
        await session.close()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    app.on_cleanup.append(close_session)
    return await _serve(app)


async def start_forwarder_proxy(upstream: str) -> tuple[web.AppRunner, str]:
    route = Route(upstream=upstream, identity_provider="idp", authorization_server="as")
    forwarder = Forwarder(ProxySettings(), [route])
    await forwarder.start()
    strip = frozenset({"x-saml-assertion"})

    async def handle(request: web.Request) -> web.StreamResponse:
        return (await forwarder.forward(request, route, "bench-token", strip)).response

    async def close_forwarder(app: web.Application) -> None:
        await forwarder.close()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    app.on_cleanup.append(close_forwarder)
    return await _serve(app)


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def requests_per_second(url: str) -> float:
    done = 0
    deadline = time.perf_counter() + SECONDS
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as client:

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                async with client.get(url) as resp:
                    async for _ in resp.content.iter_any():
                        pass
                    if resp.status != 200:
                        raise RuntimeError(f"{url}: status {resp.status}")
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return done / (time.perf_counter() - started)


async def main() -> None:
    upstream = UpstreamApp()
    base = await upstream.start()
    baseline, baseline_url = await start_baseline_proxy(base)
    gateway, gateway_url = await start_forwarder_proxy(base)
    try:
        print(f"{'path':<16}{'direct':>10}{'baseline':>10}{'forwarder':>11}  (req/s)")
        for path in ("/hello", f"/bytes/{1024 * 1024}"):
            direct = await requests_per_second(base + path)
            via_baseline = await requests_per_second(baseline_url + path)
            via_forwarder = await requests_per_second(gateway_url + path)
            print(
                f"{path:<16}{direct:>10.0f}{via_baseline:>10.0f}{via_forwarder:>11.0f}"
                f"  forwarder/baseline = {via_forwarder / via_baseline:.2f}"
            )
    finally:
        await gateway.cleanup()
        await baseline.cleanup()
        await upstream.stop()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:  # the speed extra is optional
        asyncio.run(main())
    else:
        uvloop.run(main())
