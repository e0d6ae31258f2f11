"""Sentinel failover under load: how soon two replicas share tokens again after +switch-master.

Each run starts a fresh Sentinel setup on loopback (a master, one replica, three sentinels,
``down-after-milliseconds 1000``), the fake authorization server, an upstream and two real
``saml-gateway run`` processes on ``redis+sentinel://``. Workers send *rounds* (a freshly
minted assertion to gateway a, then the same one to b: shared when b forwarded the token a
obtained, i.e. one exchange for both) and repeats of earlier assertions. Then the master is
failed over (``SENTINEL FAILOVER``) or SIGKILLed, and the run watches ``+switch-master`` on
every sentinel's pub/sub.

Reported per run: failed requests; when ``+switch-master`` came after the trigger; the last
write the old master took (polled every 50 ms while it is a master: after SENTINEL FAILOVER
it stays writable until the sentinels demote it, and what it takes is lost); and the
recovery after ``+switch-master``: sharing on the new master, i.e. rounds share and the old
master takes no more writes. It lies between ``from`` (the start of the last round that did
not share, or the old master's last write) and ``by`` (the start of the first round of the
final unbroken run of shared rounds after both). Target (issue 15): ≤ 1.5 s.

Bounded: RUNS per kind, each at most ~40 s (every wait has a limit).

    .venv/bin/python bench/failover.py [failover] [kill]
"""

from __future__ import annotations

import asyncio
import base64
import os
import statistics
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from replicas import Gateway
from replicas import gateway as start_gateway

from gateway.devkit.authorization_server import FakeAuthorizationServer
from gateway.devkit.idp import DemoIdP
from gateway.devkit.loopback import write_loopback_config
from gateway.devkit.redis_server import (
    RedisServer,
    SentinelGroup,
    free_port,
    redis_server_binary,
)
from gateway.devkit.upstream import UpstreamApp

RUNS = 3
ROUND_WORKERS, REPEAT_WORKERS = 6, 2
AFTER_SWITCH = 5.0  # seconds of load after +switch-master
MAX_REQUESTS = 20_000
CLIENT_ID = "bench-gateway"
CLIENT_SECRET = "bench-client-secret-0123456789"
REDIS_PASSWORD = "bench-redis-password-0123456789"
ISSUER = "https://idp.bench.test/saml"
AUDIENCE = "https://as.bench.test/oauth2"


@dataclass
class Run:
    requests: int
    failed: int
    failures: str  # the statuses that were not 200, counted
    switch_after: float  # +switch-master, seconds after the trigger
    unshared: int  # rounds that did not share, all told
    old_last_write: float  # seconds after +switch-master (negative: before it)
    back_from: float  # recovery lies between these, seconds after +switch-master
    back_by: float | None


@contextmanager
def gateway(
    folder: Path, idp: DemoIdP, token_url: str, upstream: str, url: str
) -> Iterator[Gateway]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "redis-key").write_text("bench-redis-encryption-key-0123456789abcdef")
    (folder / "redis-password").write_text(REDIS_PASSWORD)
    port, admin_port = free_port(), free_port()
    config = write_loopback_config(
        folder,
        certificate_pem=idp.certificate_pem,
        issuer=ISSUER,
        token_url=token_url,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        audience=AUDIENCE,
        upstream=upstream,
        port=port,
        admin_port=admin_port,
        log={"format": "json", "level": "warning"},
        lifecycle={"shutdown_grace": 0, "drain_timeout": 2},
        cache={
            "backend": "redis",
            "redis": {
                "url": url,
                "password": "${file:redis-password}",
                "encryption_keys": {"k1": "${file:redis-key}"},
                "active_key": "k1",
                "timeout": 0.5,
            },
        },
    )
    with start_gateway("failover", config) as gw:
        yield gw


async def token_via(session: aiohttp.ClientSession, gw: Gateway, header: str) -> tuple[int, str]:
    async with session.get(
        f"http://127.0.0.1:{gw.port}/echo", headers={"X-SAML-Assertion": header}
    ) as response:
        if response.status != 200:
            await response.read()
            return response.status, ""
        body = await response.json()
    seen = {name.lower(): value for name, value in body["headers"]}
    return 200, seen["authorization"]


async def redis_up(session: aiohttp.ClientSession, gw: Gateway) -> bool:
    try:
        async with session.get(f"http://127.0.0.1:{gw.admin_port}/readyz") as response:
            return (await response.json()).get("redis") == "up"
    except aiohttp.ClientError:
        return False


async def one_run(folder: Path, how: str) -> Run:
    idp = DemoIdP.generate(ISSUER)
    auth = FakeAuthorizationServer(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    upstream = UpstreamApp()
    token_url = await auth.start()
    upstream_url = (await upstream.start()).rstrip("/")

    def signed(subject: str) -> str:
        raw = idp.issue(subject, audience=AUDIENCE, recipient=token_url, now=datetime.now(UTC))
        return base64.b64encode(raw).decode()

    try:
        with ExitStack() as stack:
            group = stack.enter_context(SentinelGroup(folder / "sentinel", password=REDIS_PASSWORD))
            a, b = (
                stack.enter_context(gateway(folder / n, idp, token_url, upstream_url, group.url))
                for n in ("a", "b")
            )
            connector = aiohttp.TCPConnector(limit=0)
            timeout = aiohttp.ClientTimeout(total=30)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                for _ in range(200):  # both replicas on Redis before the clock starts
                    if await redis_up(session, a) and await redis_up(session, b):
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise RuntimeError("the gateways did not reach Redis")
                old = group.master()
                fail = group.failover if how == "SENTINEL FAILOVER" else old.kill
                return await load(session, group, old, a, b, signed, fail)
    finally:
        await upstream.stop()
        await auth.stop()


async def load(
    session: aiohttp.ClientSession,
    group: SentinelGroup,
    old: RedisServer,
    a: Gateway,
    b: Gateway,
    signed: Callable[[str], str],
    fail: Callable[[], None],
) -> Run:
    loop = asyncio.get_running_loop()
    rounds: list[tuple[float, bool]] = []  # (started, shared)
    statuses: list[int] = []
    repeats = [signed(f"repeat{i}@bench.test") for i in range(8)]
    stop = asyncio.Event()

    async def rounds_worker(worker: int) -> None:
        n = 0
        while not stop.is_set() and len(statuses) < MAX_REQUESTS:
            n += 1
            header = signed(f"w{worker}-{n}@bench.test")
            started = loop.time()
            status_a, token_a = await token_via(session, a, header)
            status_b, token_b = await token_via(session, b, header)
            statuses.extend((status_a, status_b))
            rounds.append((started, status_a == 200 and token_a == token_b))

    async def repeats_worker(worker: int) -> None:
        n = worker
        while not stop.is_set() and len(statuses) < MAX_REQUESTS:
            n += 1
            status, _ = await token_via(session, (a, b)[n % 2], repeats[n % len(repeats)])
            statuses.append(status)
            await asyncio.sleep(0.005)

    last_write = [loop.time()]

    async def old_master_writes() -> None:
        seen = None
        while not stop.is_set():
            count = await asyncio.to_thread(group.master_writes, old)
            if count is not None and seen is not None and count > seen:
                last_write[0] = loop.time()
            seen = count if count is not None else seen
            await asyncio.sleep(0.05)

    workers = [
        *(asyncio.create_task(rounds_worker(i)) for i in range(ROUND_WORKERS)),
        *(asyncio.create_task(repeats_worker(i)) for i in range(REPEAT_WORKERS)),
        asyncio.create_task(old_master_writes()),
    ]
    try:
        async with asyncio.timeout(60), group.switch_master() as switched:
            await asyncio.sleep(1.5)
            broken = loop.time()
            await asyncio.to_thread(fail)
            switch_at, _ = await switched
            await asyncio.sleep(AFTER_SWITCH)
    finally:
        stop.set()
        await asyncio.gather(*workers, return_exceptions=True)
    for worker in workers:
        worker.result()
    after = [(t - switch_at, shared) for t, shared in rounds if t > switch_at]
    unshared_after = [t for t, shared in after if not shared]
    old_last_write = last_write[0] - switch_at
    back_from = max([*unshared_after, old_last_write, 0.0])
    back_by = next((t for t, shared in after if shared and t > back_from), None)
    return Run(
        requests=len(statuses),
        failed=sum(s != 200 for s in statuses),
        failures=str(dict(Counter(s for s in statuses if s != 200))),
        switch_after=switch_at - broken,
        unshared=sum(not shared for _, shared in rounds),
        old_last_write=old_last_write,
        back_from=back_from,
        back_by=back_by,
    )


async def main() -> int:
    if redis_server_binary() is None:
        print("redis-server is not installed (make system-deps)", file=sys.stderr)
        return 1
    one, five, _ = os.getloadavg()
    print(f"load average {one:.2f} {five:.2f} on {os.cpu_count()} CPUs")
    kinds = {"failover": "SENTINEL FAILOVER", "kill": "SIGKILL"}
    for how in [kinds[k] for k in sys.argv[1:]] or kinds.values():
        runs = []
        for i in range(RUNS):
            with tempfile.TemporaryDirectory() as directory:
                run = await one_run(Path(directory), how)
            runs.append(run)
            by = f"{run.back_by:.2f} s" if run.back_by is not None else "never"
            print(
                f"{how} run {i + 1}: {run.requests} requests, {run.failed} failed "
                f"{run.failures if run.failed else ''}; "
                f"+switch-master {run.switch_after:.2f} s after the {how}; {run.unshared} "
                f"rounds not shared; old master's last write {run.old_last_write:+.2f} s; "
                f"sharing back after +switch-master: from "
                f"{run.back_from:.2f} s, by {by}"
            )
        backs = [r.back_by for r in runs if r.back_by is not None]
        never = len(runs) - len(backs)
        figures = (
            f"median {statistics.median(backs):.2f} s, worst {max(backs):.2f} s" if backs else ""
        )
        print(
            f"{how}: {sum(r.failed for r in runs)} failed of {sum(r.requests for r in runs)}; "
            f"sharing back by {figures} after +switch-master (target ≤ 1.5 s)"
            + (
                f"; not back within {AFTER_SWITCH:g} s in {never} of {len(runs)} runs"
                if never
                else ""
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
