"""Forward-auth mode under load (issues 7, 12): what nginx + the gateway as authorizer costs.

All on 127.0.0.1, one run, one serving process each (nginx ``worker_processes 1``, gateway
``workers: 1``, access logs off). The upstream is nginx ``return 200 "hello"``. The cases:
  - plain:    nginx alone as a reverse proxy (no auth),
  - stripped: the same, clearing the assertion header as the examples do (so the upstream
    does not parse 5 KB more than behind them: the stricter reference),
  - uncached: nginx + the gateway as auth_request authorizer (config/forward-auth/nginx.conf),
  - cached:   the same with nginx caching the gateway's answer (nginx-cached.conf),
  - setmisc:  the same with a short HMAC-SHA256 cache key (nginx-cached-setmisc.conf; skipped
    when Debian's libnginx-mod-http-set-misc is not installed),
  - lua:      the answers cached in a Lua shared dictionary instead (nginx-lua.conf; skipped
    when Debian's libnginx-mod-http-lua is not installed),
  - proxy:    the gateway as the proxy itself (token-cache hit).

How a run is kept fair on a shared machine:
  - every case is started once and warmed (its cache filled, then one unrecorded wrk run of
    ``--warmup`` s), then loaded ``--rounds`` times in turn, each round starting one case
    further on, so no case always follows the same neighbour;
  - wrk is the same for every case (1 thread, 50 connections, ``--duration`` s, the same
    assertion header) and pinned to one CPU (``--wrk-cpu``, the last one by default);
  - a ratio is taken within each round (the case against its reference, loaded seconds
    apart) and the table shows the median of those ratios with their spread, next to each
    case's median req/s and its range; a neighbour's burst skews a round, not a case;
  - the CPU time the serving processes spent per request is shown too (the front nginx's
    workers, the gateway's for the proxy case; for the uncached case the front's only): it
    depends far less on what else the machine runs than req/s does;
  - the load average is printed before, after and at each round, and each nginx case's
    worker_processes and upstream keepalive, which must match plain nginx's to compare.

Targets: with caching ≥ 80% of plain nginx; without caching ≥ 1.5× the gateway's proxy mode.

    .venv/bin/python bench/forward_auth.py [--duration 2] [--rounds 9] [--cases plain,lua]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import _harness as h

from gateway.devkit.authorization_server import FakeAuthorizationServer

PLAIN = "nginx alone (reverse proxy)"
STRIPPED = "  same, assertion header not forwarded"
UNCACHED = "nginx + gateway authorizer"
CACHED = "nginx + gateway authorizer, nginx cache"
SETMISC = "  same, set-misc HMAC key"
LUA = "nginx + gateway authorizer, Lua shared dict"
PROXY = "gateway as the proxy"

SHORT = {
    "plain": PLAIN,
    "stripped": STRIPPED,
    "uncached": UNCACHED,
    "cached": CACHED,
    "setmisc": SETMISC,
    "lua": LUA,
    "proxy": PROXY,
}
EXAMPLES = {
    UNCACHED: "nginx.conf",
    CACHED: "nginx-cached.conf",
    SETMISC: "nginx-cached-setmisc.conf",
    LUA: "nginx-lua.conf",
}
REFERENCE = {UNCACHED: PROXY, CACHED: PLAIN, SETMISC: PLAIN, LUA: PLAIN, PROXY: PLAIN}
# Plain nginx forwards the 5 KB assertion header, which the upstream then parses; the
# examples clear it. The stricter reference clears it too.
ALSO = {LUA: STRIPPED, STRIPPED: PLAIN}
WORKERS = 1


@dataclass
class Case:
    name: str
    port: int
    pids: list[int]  # the serving processes, whose CPU time is counted
    loads: list[h.Load] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # CPU µs per request, by round
    granted: float = 0.0  # answers the gateway gave while this case was loaded


def nginx_workers(master: int) -> list[int]:
    """The master's worker processes (not the cache manager or loader, which come and go)."""
    return [
        pid
        for pid in h.children(master)
        if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"nginx: worker process")
    ]


def cpu_ns(pids: list[int]) -> int:
    """CPU time the processes have run so far, in ns (the scheduler's, not tick-rounded)."""
    return sum(int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) for pid in pids)


def upstream_keepalive(conf: str) -> str:
    """The idle-connection cache of the `upstream api` block, as the nginx file says it."""
    block = re.search(r"upstream api \{(.*?)\}", conf, re.DOTALL)
    found = re.search(r"keepalive (\d+);", block.group(1)) if block else None
    return found.group(1) if found else "none"


def spread(values: list[float], digits: int) -> str:
    low, middle, high = min(values), statistics.median(values), max(values)
    return f"{middle:.{digits}f} [{low:.{digits}f}-{high:.{digits}f}]"


async def load(case: Case, header: str, duration: float, cpu: int | None, gw: h.Gateway) -> None:
    # Subrequests still in flight when the previous wrk stopped finish first.
    await asyncio.sleep(0.3)
    before, spent = await h.granted(gw), cpu_ns(case.pids)
    found = await h.wrk(f"http://127.0.0.1:{case.port}/hello", header, duration, cpu=cpu)
    spent = cpu_ns(case.pids) - spent
    case.granted += await h.granted(gw) - before
    case.loads.append(found)
    case.cpu_us.append(spent / 1e3 / max(1.0, found.rps * duration))


async def run(
    duration: float, rounds: int, warmup: float, names: list[str], cpu: int | None
) -> int:
    print(f"# bench/forward_auth.py: {h.load_average()} (before)")
    print(
        f"# wrk: 1 thread, 50 connections, {duration:g} s a round, {rounds} rounds, "
        f"{warmup:g} s warm-up per case (not counted), "
        + (f"pinned to CPU {cpu}" if cpu is not None else "not pinned")
    )
    auth = FakeAuthorizationServer(client_id=h.CLIENT_ID, client_secret=h.CLIENT_SECRET)
    token_url = await auth.start()
    cases: list[Case] = []
    with tempfile.TemporaryDirectory(prefix="bench-forward-auth-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        identity = h.Identity.make(token_url, work)
        header = identity.header
        up_port = h.free_port()
        upstream = f"127.0.0.1:{up_port}"
        stack.enter_context(h.nginx(work / "upstream", h.upstream_conf(up_port), up_port))
        gw = stack.enter_context(h.gateway(work / "gateway", identity, token_url, upstream))
        authorizer = f"127.0.0.1:{gw.auth_port}"

        fairness = []
        for name in names:
            if name == PROXY:
                await h.warm(f"http://127.0.0.1:{gw.port}/hello", header, times=3)
                cases.append(Case(name, gw.port, gw.pids()))
                continue
            port = h.free_port()
            if name in (PLAIN, STRIPPED):
                folder, conf = work / name.split()[0], h.nginx_proxy_conf(port, upstream)
                if name == STRIPPED:
                    kept = 'proxy_set_header Connection "";\n'
                    conf = conf.replace(
                        kept, f'{kept}        proxy_set_header X-SAML-Assertion "";\n'
                    )
            else:
                example = EXAMPLES[name]
                missing = h.nginx_runner.missing_modules(
                    (h.nginx_runner.EXAMPLES / example).read_text()
                )
                if missing:
                    print(
                        f"# {name.strip()}: skipped, not installed: {', '.join(map(str, missing))}"
                    )
                    continue
                folder = work / example
                conf = h.forward_auth_conf(example, port, authorizer, upstream, folder / "cache")
            server = stack.enter_context(h.nginx(folder, conf, port, workers=WORKERS))
            await h.warm(f"http://127.0.0.1:{port}/hello", header, times=3)
            cases.append(Case(name, port, nginx_workers(server.proc.pid)))
            fairness.append(f"{name.strip()}: keepalive {upstream_keepalive(conf)}")
        print(
            f"# nginx worker_processes {WORKERS} in every case; upstream api " + "; ".join(fairness)
        )

        for case in cases:  # warm-up: connections, JIT, caches; not counted
            await h.wrk(f"http://127.0.0.1:{case.port}/hello", header, warmup, cpu=cpu)
        for round_ in range(rounds):
            print(f"# round {round_ + 1}: {h.load_average()}")
            start = round_ % len(cases)
            for case in cases[start:] + cases[:start]:
                await load(case, header, duration, cpu, gw)
    await auth.stop()

    print(report(cases))
    print(f"# {h.load_average()} (after)")
    return 0


def paired(case: Case, base: Case) -> tuple[list[float], list[float]]:
    """Per round: the case's req/s and CPU per request over its reference's."""
    rounds = list(zip(case.loads, base.loads, case.cpu_us, base.cpu_us, strict=True))
    return [a.rps / b.rps for a, b, _, _ in rounds], [x / y for _, _, x, y in rounds]


def report(cases: list[Case]) -> str:
    by_name = {case.name: case for case in cases}
    lines = [
        f"{'case':<44}{'req/s median [min-max]':>24}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'CPU µs/req median [min-max]':>30}"
    ]
    for case in cases:
        rps = [found.rps for found in case.loads]
        middle = sorted(case.loads, key=lambda found: found.rps)[len(case.loads) // 2]
        errors = sum(found.errors for found in case.loads)
        lines.append(
            f"{case.name:<44}{spread(rps, 0):>24}{middle.p50_ms:>8.2f}{middle.p99_ms:>8.2f}"
            f"{spread(case.cpu_us, 1):>30}" + (f"  ({errors} errors)" if errors else "")
        )
    lines += ["", "ratios within each round, median [min-max]: req/s, and CPU per request"]
    ratios: dict[tuple[str, str], float] = {}
    pairs = [*REFERENCE.items(), *ALSO.items()]
    for name, reference in pairs:
        if name in by_name and reference in by_name:
            rps, cpu = paired(by_name[name], by_name[reference])
            ratios[name, reference] = statistics.median(rps)
            lines.append(
                f"  {name.strip():<44} / {reference.strip():<38}"
                f"{spread(rps, 2):>18} ×  CPU {spread(cpu, 2)} ×"
            )
    lines.append("")
    for case in cases:
        by_round = " ".join(f"{found.rps:.0f}" for found in case.loads)
        lines.append(f"{case.name.strip()}: req/s by round {by_round}")
    for case in cases:
        if case.name in EXAMPLES:
            lines.append(
                f"{case.name.strip()}: the gateway answered {case.granted:.0f} auth requests"
            )
    verdicts = []
    cached = [name for name in (CACHED, SETMISC, LUA) if (name, PLAIN) in ratios]
    if cached:
        best = max(cached, key=lambda name: ratios[name, PLAIN])
        ratio = ratios[best, PLAIN]
        verdicts.append(
            f"cached ({best.strip()}) {ratio:.2f} × nginx ≥ 0.80 {h.verdict(ratio >= 0.8)}"
        )
    if (UNCACHED, PROXY) in ratios:
        ratio = ratios[UNCACHED, PROXY]
        verdicts.append(f"uncached {ratio:.2f} × gateway proxy ≥ 1.5 {h.verdict(ratio >= 1.5)}")
    if verdicts:
        lines.append("targets (median ratio in the same round): " + "; ".join(verdicts))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=2, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=9, help="wrk runs per case, in turn")
    parser.add_argument("--warmup", type=float, default=1, help="unrecorded wrk seconds per case")
    parser.add_argument(
        "--cases",
        default=",".join(SHORT),
        help=f"comma-separated, in this order: {','.join(SHORT)} (a ratio needs its reference)",
    )
    last = (os.cpu_count() or 1) - 1
    parser.add_argument(
        "--wrk-cpu", type=int, default=last if last > 0 else -1, help="CPU for wrk; -1: no pin"
    )
    args = parser.parse_args()
    unknown = [name for name in args.cases.split(",") if name not in SHORT]
    if unknown:
        parser.error(f"--cases: unknown {', '.join(unknown)}; known: {', '.join(SHORT)}")
    names = [SHORT[name] for name in SHORT if name in args.cases.split(",")]
    cpu = None if args.wrk_cpu < 0 else args.wrk_cpu
    return asyncio.run(run(args.duration, max(1, args.rounds), args.warmup, names, cpu))


if __name__ == "__main__":
    raise SystemExit(main())
