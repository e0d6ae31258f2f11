"""Soak: a bounded mixed load on a real gateway process, with faults injected on the fake
authorization server, for a configurable time (default 5 minutes).

    .venv/bin/python bench/soak.py [--duration 300] [--concurrency 16]

The mix (per request, at random): cache hits from a pool of assertions, misses with fresh
assertions, rejects (bad signature, not base64, no assertion), and POSTs with a body. Every
``--fault-every`` seconds the authorization server misbehaves for ``--fault-for`` seconds
(500s, slow answers, 429, a hang, garbage), then recovers.

Reports: requests by status, latency percentiles, token exchanges per distinct assertion,
and the gateway's resident memory at the end of warm-up, in the middle and at the end. The
bar: memory flat within 10 % after warm-up (the token cache is bounded by ``--max-entries``,
which the warm-up fills).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

from gateway.devkit.authorization_server import FakeAuthorizationServer
from gateway.devkit.idp import DemoIdP
from gateway.devkit.loopback import write_loopback_config
from gateway.devkit.upstream import UpstreamApp

ISSUER = "https://idp.soak/saml"
AUDIENCE = "https://as.soak/oauth2"
CLIENT_ID = "gateway"
CLIENT_SECRET = "soak-secret-0123456789abcdef"
FAULTS = ("server_error", "slow", "rate_limited", "hang", "garbage")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@dataclass
class Tally:
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies: list[float] = field(default_factory=list)
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, KiB)
    faults: collections.Counter[str] = field(default_factory=collections.Counter)


class Soak:
    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args = args
        self.folder = folder
        self.idp = DemoIdP.generate(ISSUER)
        self.auth = FakeAuthorizationServer(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
        self.upstream = UpstreamApp()
        self.tally = Tally()
        self.rng = random.Random(args.seed)
        self.fresh: asyncio.Queue[str] = asyncio.Queue(maxsize=64)
        self.pool: list[str] = []
        self.lifetime = args.duration + 900  # no assertion expires during the run
        self.next_slot = 0.0

    def issue(self, subject: str) -> str:
        raw = self.idp.issue(
            subject,
            audience=AUDIENCE,
            recipient=self.auth.token_url,
            now=datetime.now(UTC),
            lifetime=self.lifetime,
        )
        return base64.b64encode(raw).decode()

    def write_config(self, upstream: str) -> Path:
        self.port, self.admin_port = free_port(), free_port()
        return write_loopback_config(
            self.folder,
            certificate_pem=self.idp.certificate_pem,
            issuer=ISSUER,
            token_url=self.auth.token_url,
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            audience=AUDIENCE,
            upstream=upstream,
            port=self.port,
            admin_port=self.admin_port,
            server={
                "timeouts": {"connect": 1, "total": 2},
                "retries": {"attempts": 3, "backoff": 0.05, "max_backoff": 0.2, "deadline": 3},
            },
            route={"timeouts": {"connect": 1, "read": 5, "total": 10}},
            log={"level": "warning"},
            cache={"max_entries": self.args.max_entries},
        )

    async def spawn(self, path: Path) -> subprocess.Popen[bytes]:
        log = (self.folder / "gateway.log").open("wb")
        # Popen returns at once (it does not wait for the child): fine inside the loop.
        proc = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "gateway", "run", "-c", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise SystemExit(f"gateway exited: see {self.folder / 'gateway.log'}")
                try:
                    url = f"http://127.0.0.1:{self.admin_port}/healthz"
                    async with session.get(url) as response:
                        if response.status == 200:
                            return proc
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        proc.kill()
        raise SystemExit("gateway did not start within 30 s")

    # --- load ------------------------------------------------------------------------------

    async def producer(self, stop: asyncio.Event) -> None:
        """Fresh assertions, signed off the event loop so the load keeps flowing."""
        n = 0
        while not stop.is_set():
            n += 1
            value = await asyncio.to_thread(self.issue, f"fresh{n}@soak.test")
            try:
                await asyncio.wait_for(self.fresh.put(value), 1.0)
            except TimeoutError:
                continue

    def pick(self) -> tuple[str, str, dict[str, str], bytes | None]:
        """(kind, method+path, headers, body) of the next request."""
        roll = self.rng.random()
        if roll < 0.68:
            return "hit", "GET /hello", {"X-SAML-Assertion": self.rng.choice(self.pool)}, None
        if roll < 0.80:
            try:
                value = self.fresh.get_nowait()
            except asyncio.QueueEmpty:
                value = self.rng.choice(self.pool)
            return "miss", "GET /hello", {"X-SAML-Assertion": value}, None
        if roll < 0.85:
            body = self.rng.randbytes(self.rng.randint(1, 64 * 1024))
            headers = {"X-SAML-Assertion": self.rng.choice(self.pool)}
            return "upload", "POST /upload", headers, body
        reject = self.rng.random()
        if reject < 0.4:
            raw = bytearray(base64.b64decode(self.rng.choice(self.pool)))
            at = raw.find(b"<saml:Subject>") + 20  # inside the signed content
            raw[at] ^= 0x01
            return (
                "reject",
                "GET /hello",
                {"X-SAML-Assertion": base64.b64encode(raw).decode()},
                None,
            )
        if reject < 0.7:
            return "reject", "GET /hello", {"X-SAML-Assertion": "%%% not base64 %%%"}, None
        return "reject", "GET /hello", {}, None

    async def worker(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        base = f"http://127.0.0.1:{self.port}"
        while not stop.is_set():
            # Pace all workers together to --rate: the machine is shared, the load bounded.
            now = time.monotonic()
            slot = max(now, self.next_slot)
            self.next_slot = slot + 1.0 / self.args.rate
            if slot > now:
                await asyncio.sleep(slot - now)
            kind, target, headers, body = self.pick()
            method, path = target.split(" ", 1)
            started = time.perf_counter()
            try:
                async with session.request(method, base + path, headers=headers, data=body) as r:
                    await r.read()
                    status = str(r.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                status = f"client:{type(exc).__name__}"
            self.tally.latencies.append(time.perf_counter() - started)
            self.tally.statuses[status] += 1
            self.tally.kinds[kind] += 1

    async def faults(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.args.fault_every)
                return
            except TimeoutError:
                pass
            mode = self.rng.choice(FAULTS)
            self.tally.faults[mode] += 1
            self.auth.delay = 0.5
            self.auth.mode = mode
            try:
                await asyncio.wait_for(stop.wait(), self.args.fault_for)
            except TimeoutError:
                pass
            self.auth.mode = "ok"

    async def sample_rss(self, pid: int, stop: asyncio.Event, t0: float) -> None:
        while not stop.is_set():
            self.tally.rss.append((time.monotonic() - t0, rss_kib(pid)))
            try:
                await asyncio.wait_for(stop.wait(), 2.0)
            except TimeoutError:
                pass

    async def run(self) -> int:
        await self.auth.start()
        upstream = await self.upstream.start()
        path = self.write_config(upstream)
        print(f"signing {self.args.pool} pool assertions...", file=sys.stderr)
        self.pool = [self.issue(f"user{i}@soak.test") for i in range(self.args.pool)]
        proc = await self.spawn(path)
        stop = asyncio.Event()
        t0 = time.monotonic()
        connector = aiohttp.TCPConnector(limit=self.args.concurrency)
        timeout = aiohttp.ClientTimeout(total=30)
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                tasks = [asyncio.create_task(self.worker(session, stop))]
                tasks += [
                    asyncio.create_task(self.worker(session, stop))
                    for _ in range(self.args.concurrency - 1)
                ]
                tasks += [
                    asyncio.create_task(self.producer(stop)),
                    asyncio.create_task(self.faults(stop)),
                    asyncio.create_task(self.sample_rss(proc.pid, stop, t0)),
                ]
                print(f"soaking for {self.args.duration:g} s...", file=sys.stderr)
                await asyncio.sleep(self.args.duration)
                stop.set()
                self.auth.mode = "ok"
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
            alive = proc.poll() is None
            elapsed = time.monotonic() - t0
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            await self.upstream.stop()
            await self.auth.stop()
        return self.report(elapsed, alive)

    # --- report ----------------------------------------------------------------------------

    def report(self, elapsed: float, alive: bool) -> int:
        t = self.tally
        total = sum(t.statuses.values())
        print(
            f"\n## Soak: {elapsed:.0f} s, concurrency {self.args.concurrency}, "
            f"target rate {self.args.rate:g}/s, "
            f"{total} requests ({total / elapsed:.0f}/s), gateway alive at end: {alive}\n"
        )
        print("| status | requests | share |\n| --- | ---: | ---: |")
        for status, n in sorted(t.statuses.items()):
            print(f"| {status} | {n} | {100 * n / total:.1f} % |")
        print("\n| request kind | count |\n| --- | ---: |")
        for kind, n in sorted(t.kinds.items()):
            print(f"| {kind} | {n} |")
        lat = sorted(t.latencies)
        q = statistics.quantiles(lat, n=1000) if len(lat) > 1 else [0.0] * 999
        print("\n| latency | ms |\n| --- | ---: |")
        for name, value in (
            ("p50", q[499]),
            ("p90", q[899]),
            ("p99", q[989]),
            ("p99.9", q[998]),
            ("max", lat[-1] if lat else 0.0),
        ):
            print(f"| {name} | {1000 * value:.1f} |")
        per_id = collections.Counter(self.auth.assertion_ids)
        issued = len(self.auth.issued)
        print("\n| exchanges | value |\n| --- | ---: |")
        print(f"| token requests at the AS (retries included) | {self.auth.calls} |")
        print(f"| tokens issued | {issued} |")
        # The fake reads the assertion ID only on requests it does not fault on purpose.
        print(f"| distinct assertions the AS read | {len(per_id)} |")
        if per_id:
            print(
                f"| AS reads per distinct assertion (mean) | "
                f"{sum(per_id.values()) / len(per_id):.3f} |"
            )
            print(f"| AS reads per distinct assertion (max) | {max(per_id.values())} |")
            print(f"| tokens issued per distinct assertion | {issued / len(per_id):.3f} |")
        print(f"| fault windows | {dict(t.faults)} |")
        warm = min(60.0, 0.2 * self.args.duration)
        after = [(s, k) for s, k in t.rss if s >= warm] or t.rss
        start, middle, end = after[0], after[len(after) // 2], after[-1]
        print("\n| gateway RSS | at s | MiB |\n| --- | ---: | ---: |")
        for name, (s, kib) in (("end of warm-up", start), ("middle", middle), ("end", end)):
            print(f"| {name} | {s:.0f} | {kib / 1024:.1f} |")
        drift = (end[1] - start[1]) / start[1] if start[1] else 0.0
        flat = abs(drift) <= 0.10
        print(
            f"\nRSS drift after warm-up: {100 * drift:+.1f} % ({'flat' if flat else 'NOT flat'}"
            f" within 10 %)"
        )
        return 0 if alive and flat else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds (default 300)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rate", type=float, default=300.0, help="requests per second, total")
    parser.add_argument("--pool", type=int, default=200, help="assertions reused as hits")
    parser.add_argument("--max-entries", type=int, default=1000, help="cache.max_entries")
    parser.add_argument("--fault-every", type=float, default=20.0)
    parser.add_argument("--fault-for", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if args.duration > 3600:
        parser.error("--duration is capped at one hour")
    with tempfile.TemporaryDirectory(prefix="soak-") as folder:
        return asyncio.run(Soak(args, Path(folder)).run())


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
