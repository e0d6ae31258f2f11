"""Forward-auth mode under load (issue 7): what nginx + the gateway as authorizer costs.

All on 127.0.0.1, one run, one serving process each (nginx ``worker_processes 1``, gateway
``workers: 1``, access logs off). The upstream is nginx ``return 200 "hello"``. wrk (1 thread,
50 connections, ``--duration`` s per case, the same assertion header on every request):
  - nginx alone as a reverse proxy (no auth),
  - nginx + the gateway as auth_request authorizer (config/forward-auth/nginx.conf),
  - the same with nginx caching the gateway's answer (config/forward-auth/nginx-cached.conf),
  - the same with a short HMAC-SHA256 cache key (nginx-cached-setmisc.conf; skipped when
    Debian's libnginx-mod-http-set-misc is not installed),
  - the answers cached in a Lua shared dictionary instead (nginx-lua.conf; skipped when
    Debian's libnginx-mod-http-lua is not installed),
  - the gateway as the proxy itself (token-cache hit).

Every case is started once, then loaded ``--rounds`` times in turn; the table shows each
case's median round, so a neighbour's burst of CPU use skews one round, not one case.

Targets: with caching ≥ 80% of plain nginx; without caching ≥ 1.5× the gateway's proxy mode.

    .venv/bin/python bench/forward_auth.py [--duration 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from contextlib import ExitStack
from pathlib import Path

import _harness as h

from gateway.devkit.authorization_server import FakeAuthorizationServer

PLAIN = "nginx alone (reverse proxy)"
UNCACHED = "nginx + gateway authorizer"
CACHED = "nginx + gateway authorizer, nginx cache"
SETMISC = "  same, set-misc HMAC key"
LUA = "nginx + gateway authorizer, Lua shared dict"
PROXY = "gateway as the proxy"

EXAMPLES = {
    UNCACHED: "nginx.conf",
    CACHED: "nginx-cached.conf",
    SETMISC: "nginx-cached-setmisc.conf",
    LUA: "nginx-lua.conf",
}


def median(loads: list[h.Load]) -> h.Load:
    """The round with the median throughput (the upper one of an even count)."""
    return sorted(loads, key=lambda load: load.rps)[len(loads) // 2]


async def run(duration: float, rounds: int) -> int:
    print(f"# bench/forward_auth.py: {h.load_average()} (before)")
    auth = FakeAuthorizationServer(client_id=h.CLIENT_ID, client_secret=h.CLIENT_SECRET)
    token_url = await auth.start()
    ports: dict[str, int] = {}
    loads: dict[str, list[h.Load]] = {}
    granted: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-forward-auth-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        identity = h.Identity.make(token_url, work)
        header = identity.header
        up_port = h.free_port()
        upstream = f"127.0.0.1:{up_port}"
        stack.enter_context(h.nginx(work / "upstream", h.upstream_conf(up_port), up_port))
        gw = stack.enter_context(h.gateway(work / "gateway", identity, token_url, upstream))

        port = h.free_port()
        stack.enter_context(h.nginx(work / "plain", h.nginx_proxy_conf(port, upstream), port))
        ports[PLAIN] = port
        authorizer = f"127.0.0.1:{gw.auth_port}"
        for name, example in EXAMPLES.items():
            missing = h.nginx_runner.missing_modules(
                (h.nginx_runner.EXAMPLES / example).read_text()
            )
            if missing:
                print(f"# {name.strip()}: skipped, not installed: {', '.join(map(str, missing))}")
                continue
            port = h.free_port()
            folder = work / example
            conf = h.forward_auth_conf(example, port, authorizer, upstream, folder / "cache")
            stack.enter_context(h.nginx(folder, conf, port))
            await h.warm(f"http://127.0.0.1:{port}/hello", header, times=3)
            ports[name] = port
        await h.warm(f"http://127.0.0.1:{gw.port}/hello", header, times=3)
        ports[PROXY] = gw.port

        for _ in range(rounds):
            for name, port in ports.items():
                # Subrequests still in flight when the previous wrk stopped finish first.
                await asyncio.sleep(0.3)
                before = await h.granted(gw)
                load = await h.wrk(f"http://127.0.0.1:{port}/hello", header, duration)
                loads.setdefault(name, []).append(load)
                granted[name] = granted.get(name, 0.0) + await h.granted(gw) - before
    await auth.stop()

    rows = [(name, median(found)) for name, found in loads.items()]
    reference = {UNCACHED: PROXY, CACHED: PLAIN, SETMISC: PLAIN, LUA: PLAIN, PROXY: PLAIN}
    print(h.table(rows, reference))
    if rounds > 1:
        for name, found in loads.items():
            print(f"{name.strip()}: req/s by round {' '.join(f'{x.rps:.0f}' for x in found)}")
    for name in (UNCACHED, CACHED, SETMISC, LUA):
        if name in granted:
            print(f"{name.strip()}: the gateway answered {granted[name]:.0f} auth requests")
    by_name = dict(rows)
    best = max((n for n in (CACHED, SETMISC, LUA) if n in by_name), key=lambda n: by_name[n].rps)
    cached = by_name[best].rps / by_name[PLAIN].rps
    uncached = by_name[UNCACHED].rps / by_name[PROXY].rps
    print(
        f"targets: cached ({best.strip()}) {cached:.2f} × nginx ≥ 0.80 {h.verdict(cached >= 0.8)}; "
        f"uncached {uncached:.2f} × gateway proxy ≥ 1.5 {h.verdict(uncached >= 1.5)}"
    )
    print(f"# {h.load_average()} (after)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=3, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="wrk runs per case, in turn")
    args = parser.parse_args()
    return asyncio.run(run(args.duration, max(1, args.rounds)))


if __name__ == "__main__":
    raise SystemExit(main())
