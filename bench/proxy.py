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
(1 process): the added latency at p50/p99. Last, the gateway's resident memory per
process (VmRSS).

Throughput on a shared machine moves with whatever else runs; the CPU time the serving
processes spend per request (user + system, all their threads, the access log's writer
too) moves much less, so it is shown beside it: baseline µs / gateway µs is the
throughput ratio the two would have on cores of their own.

Targets: gateway ≥ 90% of the minimal aiohttp proxy at the same process count, with the
access log off and on (issue 12); added latency ≤ 1 ms p50 and ≤ 3 ms p99 at 1,000 req/s;
RSS < 100 MB per process.

    .venv/bin/python bench/proxy.py [--duration 5] [--rounds 3] [--paced 5] [--rate 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from contextlib import ExitStack
from pathlib import Path

import _harness as h

from gateway.devkit.authorization_server import FakeAuthorizationServer

DIRECT = "direct: upstream (nginx return 200)"
_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pids: list[int]) -> float:
    """User + system time of ``pids`` so far (/proc/PID/stat fields 14 and 15)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])
    return total / _TICK


def _baseline_pids(port: int) -> list[int]:
    """The baseline's processes: ``_harness.py baseline --port PORT`` command lines."""
    wanted = ["baseline", "--port", str(port)]
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().decode(errors="replace").split("\0")
            except OSError:
                continue
            if any(argv[i : i + 3] == wanted for i in range(len(argv))):
                found.append(int(entry))
    return found


async def run(duration: float, rounds: int, paced_seconds: float, rate: float) -> int:
    print(f"# bench/proxy.py: {h.load_average()} (before)")
    auth = FakeAuthorizationServer(client_id=h.CLIENT_ID, client_secret=h.CLIENT_SECRET)
    token_url = await auth.start()
    rows: list[tuple[str, h.Load]] = []
    cpu: dict[str, float] = {}  # µs of CPU per request, the median round's
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
                    pids = {base_name: _baseline_pids(ports[base_name])}
                    gateways: dict[str, h.Gateway] = {}
                    for name, logged in ((gw_name, False), (logged_name, True)):
                        folder = work / f"gateway-{n}{'-logged' if logged else ''}"
                        gw = running.enter_context(
                            h.gateway(
                                folder, identity, token_url, upstream, workers=n, access_log=logged
                            )
                        )
                        await h.warm(f"http://127.0.0.1:{gw.port}/hello", header)
                        ports[name], gateways[name], pids[name] = gw.port, gw, gw.pids()
                    loads: dict[str, list[tuple[h.Load, float]]] = {name: [] for name in ports}
                    for _ in range(rounds):
                        for name, port in ports.items():
                            before = _cpu_seconds(pids[name])
                            got = await load(port)
                            spent = _cpu_seconds(pids[name]) - before
                            loads[name].append((got, spent * 1e6 / (got.rps * duration)))
                    for name, turns in loads.items():
                        # The round with the median rate, whole (its latencies with it).
                        turns.sort(key=_rps)
                        median, cpu[name] = turns[(len(turns) - 1) // 2]
                        rows.append((name, median))
                    if n == 1:
                        url = f"http://127.0.0.1:{ports[gw_name]}/hello"
                        direct_url = f"http://{upstream}/hello"
                        near = await h.paced(direct_url, header, rate, paced_seconds, work)
                        via = await h.paced(url, header, rate, paced_seconds, work)
                    memory[n] = [h.rss_mb(pid) for pid in gateways[gw_name].pids()]
    await auth.stop()

    print(h.table(rows, reference))
    print()
    print("CPU per request of the serving processes (median round):")
    for name, micros in cpu.items():
        base = cpu[reference[name]] if name in reference else None
        ratio = f"  ratio {base / micros:.2f}" if base is not None else ""
        print(f"  {name:<46}{micros:7.0f} µs{ratio}")
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


def _rps(turn: tuple[h.Load, float]) -> float:
    return turn[0].rps


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
