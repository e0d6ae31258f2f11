"""What tracing costs on a token-cache hit (issue 14): tracing off, on at sample ratio 0.01,
on at 1.0, each loaded in turn by wrk in one run, rounds interleaved.

All on 127.0.0.1. The upstream is nginx answering ``return 200`` on every path, so it is also
the OTLP/HTTP endpoint the spans are exported to (a collector that accepts and drops). One
gateway process, access log off as in bench/proxy.py; the figures are the median of the
rounds and the ratio to tracing off.

    .venv/bin/python bench/tracing.py [--duration 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

import _harness as h

from gateway.devkit.authorization_server import FakeAuthorizationServer

CASES = {"tracing off": None, "tracing on, ratio 0.01": 0.01, "tracing on, ratio 1.0": 1.0}


async def run(duration: float, rounds: int) -> int:
    print(f"# bench/tracing.py: {h.load_average()} (before)")
    auth = FakeAuthorizationServer(client_id=h.CLIENT_ID, client_secret=h.CLIENT_SECRET)
    token_url = await auth.start()
    rates: dict[str, list[float]] = {name: [] for name in CASES}
    with tempfile.TemporaryDirectory(prefix="bench-tracing-") as tmp:
        work = Path(tmp)
        identity = h.Identity.make(token_url, work)
        up_port = h.free_port()
        upstream = f"127.0.0.1:{up_port}"
        with h.nginx(work / "upstream", h.upstream_conf(up_port), up_port):
            for round_ in range(rounds):
                for name, ratio in CASES.items():
                    tracing = {"enabled": ratio is not None, "sample_ratio": ratio or 1.0}
                    tracing["endpoint"] = f"http://{upstream}/v1/traces"
                    folder = work / f"gateway-{round_}-{len(rates[name])}-{ratio}"
                    settings = {"telemetry": {"tracing": tracing}}
                    with h.gateway(folder, identity, token_url, upstream, **settings) as gw:
                        url = f"http://127.0.0.1:{gw.port}/hello"
                        await h.warm(url, identity.header)
                        load = await h.wrk(url, identity.header, duration)
                        rates[name].append(load.rps)
    await auth.stop()
    off = statistics.median(rates["tracing off"])
    print(f"{'case':<26}{'median req/s':>14}  rounds{'':<22}ratio to off")
    for name, values in rates.items():
        shown = ", ".join(f"{v:.0f}" for v in values)
        median = statistics.median(values)
        print(f"{name:<26}{median:>14.0f}  {shown:<28}{median / off:.2f}")
    print(f"# {h.load_average()} (after)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5, help="seconds per wrk case")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all three cases")
    args = parser.parse_args()
    return asyncio.run(run(args.duration, args.rounds))


if __name__ == "__main__":
    raise SystemExit(main())
