"""Cache-hit throughput and added latency of the gateway as a reverse proxy (issue 4).

All on 127.0.0.1, one run, separate processes. The upstream is nginx answering
``return 200 "hello"`` (one worker), so the proxy under test is what the load finds.
For 1 and then 2 serving processes, wrk (1 thread, 50 connections, ``--duration`` s per
case, every request carrying the same assertion header) measures:
  - nginx as a reverse proxy (worker_processes N),
  - the minimal aiohttp proxy of bench/proxy_baseline.py (N processes on one port),
  - the gateway on a token-cache hit (``workers: N``; access log off, as for the others),
  - the same with the access log on (JSON lines, the default), so its cost stays visible,
next to a direct hit on the upstream. The last three run side by side and are loaded in turn,
``--rounds`` times (the median is shown): on a shared machine, a load that comes and goes
then falls on every case alike, and their ratios hold. Then an open-loop client in its own
process sends 1,000 requests/s for ``--paced`` s, to the upstream and through the gateway
(1 process): the added latency at p50/p99. Last, the gateway's resident memory per process (VmRSS).

Targets: gateway ≥ 90% of the minimal aiohttp proxy at the same process count, with the
access log off and on (issue 12); added latency ≤ 1 ms p50 and ≤ 3 ms p99 at 1,000 req/s;
RSS < 100 MB per process.

    .venv/bin/python bench/proxy.py [--duration 5] [--rounds 3] [--paced 5] [--rate 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from contextlib import ExitStack
from pathlib import Path

import _harness as h

from gateway.devkit.authorization_server import FakeAuthorizationServer

DIRECT = "direct: upstream (nginx return 200)"


async def run(duration: float, rounds: int, paced_seconds: float, rate: float) -> int:
    print(f"# bench/proxy.py: {h.load_average()} (before)")
    auth = FakeAuthorizationServer(client_id=h.CLIENT_ID, client_secret=h.CLIENT_SECRET)
    token_url = await auth.start()
    rows: list[tuple[str, h.Load]] = []
    reference: dict[str, str] = {}
    memory: dict[int, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        work = Path(tmp)
        identity = h.Identity.make(token_url, work)
        header = identity.header
        up_port = h.free_port()
        upstream = f"127.0.0.1:{up_port}"

        async def load(port: int) -> h.Load:
            return await h.wrk(f"http://127.0.0.1:{port}/hello", header, duration)

        with h.nginx(work / "upstream", h.upstream_conf(up_port), up_port):
            rows.append((DIRECT, await load(up_port)))
            for n in (1, 2):
                nginx_name = f"nginx proxy, {n} worker(s)"
                port = h.free_port()
                conf = h.nginx_proxy_conf(port, upstream)
                with h.nginx(work / f"nginx-{n}", conf, port, workers=n):
                    rows.append((nginx_name, await load(port)))
                reference[nginx_name] = DIRECT
                base_name = f"aiohttp baseline proxy, {n} process(es)"
                gw_name = f"gateway cache hit, workers: {n}"
                logged_name = f"gateway cache hit, workers: {n}, access log on"
                reference[gw_name] = reference[logged_name] = base_name
                with ExitStack() as running:
                    ports = {base_name: running.enter_context(h.baseline(upstream, n))}
                    gateways: dict[str, h.Gateway] = {}
                    for name, logged in ((gw_name, False), (logged_name, True)):
                        folder = work / f"gateway-{n}{'-logged' if logged else ''}"
                        gw = running.enter_context(
                            h.gateway(
                                folder, identity, token_url, upstream, workers=n, access_log=logged
                            )
                        )
                        await h.warm(f"http://127.0.0.1:{gw.port}/hello", header)
                        ports[name], gateways[name] = gw.port, gw
                    loads: dict[str, list[h.Load]] = {name: [] for name in ports}
                    for _ in range(rounds):
                        for name, port in ports.items():
                            loads[name].append(await load(port))
                    for name, got in loads.items():
                        # The round with the median rate, whole (its latencies with it).
                        got.sort(key=_rps)
                        rows.append((name, got[(len(got) - 1) // 2]))
                    if n == 1:
                        url = f"http://127.0.0.1:{ports[gw_name]}/hello"
                        direct_url = f"http://{upstream}/hello"
                        near = await h.paced(direct_url, header, rate, paced_seconds, work)
                        via = await h.paced(url, header, rate, paced_seconds, work)
                    memory[n] = [h.rss_mb(pid) for pid in gateways[gw_name].pids()]
    await auth.stop()

    print(h.table(rows, reference))
    print()
    print(f"open loop, {rate:.0f} req/s for {paced_seconds:g} s (client in its own process):")
    for name, got in (("direct", near), ("gateway", via)):
        print(
            f"  {name:<10}p50 {got.p50_ms:6.2f} ms  p99 {got.p99_ms:6.2f} ms  errors {got.errors}"
        )
    added50, added99 = via.p50_ms - near.p50_ms, via.p99_ms - near.p99_ms
    print(f"  added     p50 {added50:6.2f} ms (target ≤ 1)  p99 {added99:6.2f} ms (target ≤ 3)")
    for n, values in memory.items():
        shown = ", ".join(f"{v:.1f}" for v in values)
        print(f"gateway RSS after the run, workers: {n}: {shown} MB per process (target < 100)")
    print(f"token exchanges at the authorization server: {auth.calls} (warm-up only)")
    by_name = dict(rows)
    verdicts = []
    for n in (1, 2):
        base = by_name[f"aiohttp baseline proxy, {n} process(es)"].rps
        for suffix in ("", ", access log on"):
            ratio = by_name[f"gateway cache hit, workers: {n}{suffix}"].rps / base
            verdicts.append(
                f"{n}-process throughput{suffix} {ratio:.2f} ≥ 0.90 {h.verdict(ratio >= 0.9)}"
            )
    verdicts.append(f"added p50 {h.verdict(added50 <= 1)}, p99 {h.verdict(added99 <= 3)}")
    verdicts.append(f"RSS {h.verdict(all(v < 100 for vs in memory.values() for v in vs))}")
    print("targets: " + "; ".join(verdicts))
    print(f"# {h.load_average()} (after)")
    return 0


def _rps(load: h.Load) -> float:
    return load.rps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5, help="seconds per wrk case")
    parser.add_argument("--paced", type=float, default=5, help="seconds of the open-loop run")
    parser.add_argument("--rate", type=float, default=1000, help="open-loop requests per second")
    parser.add_argument(
        "--rounds", type=int, default=3, help="turns of the baseline and gateway cases"
    )
    args = parser.parse_args()
    return asyncio.run(run(args.duration, args.rounds, args.paced, args.rate))


if __name__ == "__main__":
    raise SystemExit(main())
