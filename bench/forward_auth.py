"""Forward-auth mode under load (issue 7): what nginx + the gateway as authorizer costs.

All on 127.0.0.1, one run, one serving process each (nginx ``worker_processes 1``, gateway
``workers: 1``, access logs off). The upstream is nginx ``return 200 "hello"``. wrk (1 thread,
50 connections, ``--duration`` s per case, the same assertion header on every request):
  - nginx alone as a reverse proxy (no auth),
  - nginx + the gateway as auth_request authorizer (config/forward-auth/nginx.conf),
  - the same with nginx caching the gateway's answer (config/forward-auth/nginx-cached.conf),
  - the gateway as the proxy itself (token-cache hit).

Targets: with caching ≥ 80% of plain nginx; without caching ≥ 1.5× the gateway's proxy mode.

    .venv/bin/python bench/forward_auth.py [--duration 5]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import _harness as h

from gateway.devkit.authorization_server import FakeAuthorizationServer

PLAIN = "nginx alone (reverse proxy)"
UNCACHED = "nginx + gateway authorizer"
CACHED = "nginx + gateway authorizer, nginx cache"
PROXY = "gateway as the proxy"


async def run(duration: float) -> int:
    print(f"# bench/forward_auth.py: {h.load_average()} (before)")
    auth = FakeAuthorizationServer(client_id=h.CLIENT_ID, client_secret=h.CLIENT_SECRET)
    token_url = await auth.start()
    rows: list[tuple[str, h.Load]] = []
    granted: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-forward-auth-") as tmp:
        work = Path(tmp)
        identity = h.Identity.make(token_url, work)
        header = identity.header
        up_port = h.free_port()
        upstream = f"127.0.0.1:{up_port}"

        async def load(port: int) -> h.Load:
            return await h.wrk(f"http://127.0.0.1:{port}/hello", header, duration)

        with (
            h.nginx(work / "upstream", h.upstream_conf(up_port), up_port),
            h.gateway(work / "gateway", identity, token_url, upstream) as gw,
        ):
            port = h.free_port()
            with h.nginx(work / "plain", h.nginx_proxy_conf(port, upstream), port):
                rows.append((PLAIN, await load(port)))
            authorizer = f"127.0.0.1:{gw.auth_port}"
            for name, example in ((UNCACHED, "nginx.conf"), (CACHED, "nginx-cached.conf")):
                port = h.free_port()
                folder = work / example
                conf = h.forward_auth_conf(example, port, authorizer, upstream, folder / "cache")
                with h.nginx(folder, conf, port):
                    before = await h.granted(gw)
                    await h.warm(f"http://127.0.0.1:{port}/hello", header, times=3)
                    rows.append((name, await load(port)))
                    granted[name] = await h.granted(gw) - before
            await h.warm(f"http://127.0.0.1:{gw.port}/hello", header, times=3)
            rows.append((PROXY, await load(gw.port)))
    await auth.stop()

    reference = {UNCACHED: PROXY, CACHED: PLAIN, PROXY: PLAIN}
    print(h.table(rows, reference))
    for name, count in granted.items():
        print(f"{name}: the gateway answered {count:.0f} auth requests")
    by_name = dict(rows)
    cached = by_name[CACHED].rps / by_name[PLAIN].rps
    uncached = by_name[UNCACHED].rps / by_name[PROXY].rps
    print(
        f"targets: cached {cached:.2f} × nginx ≥ 0.80 {h.verdict(cached >= 0.8)}; "
        f"uncached {uncached:.2f} × gateway proxy ≥ 1.5 {h.verdict(uncached >= 1.5)}"
    )
    print(f"# {h.load_average()} (after)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5, help="seconds per wrk case")
    args = parser.parse_args()
    return asyncio.run(run(args.duration))


if __name__ == "__main__":
    raise SystemExit(main())
