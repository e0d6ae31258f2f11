"""Two gateway replicas sharing one real redis-server behind a real HAProxy running the
repository's example (``config/haproxy/haproxy.cfg``): one exchange per assertion for a
burst of large assertions, a replica SIGKILLed under a bounded load fails no request, and
a reply lost on its way back is resent for a GET but never for a POST.

The figures (requests, HAProxy's retries and redispatches) are printed for the record
(``pytest -s``); what is asserted is behaviour: statuses, exchanges, who served.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from gateway.devkit.redis_server import free_port

from .helpers import Cluster


class Replica(Protocol):
    port: int
    admin_port: int


StartHAProxy = Callable[[Replica, Replica], "HAProxy"]

CONFIG = Path(__file__).resolve().parents[2] / "config" / "haproxy" / "haproxy.cfg"
BIG = "g" * 15000  # an attribute that makes the header ~25 KB: over HAProxy's default buffer


@dataclass
class HAProxy:
    process: subprocess.Popen[bytes]
    port: int
    stats: Path  # the admin socket the test adds beside the example

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def show_stat(self) -> dict[str, dict[str, str]]:
        """``show stat`` by proxy/server name ("replicas/gateway1", "replicas/BACKEND")."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(str(self.stats))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {f"{r['pxname']}/{r['svname']}": r for r in rows}

    def up(self) -> set[str]:
        return {
            name.split("/")[1]
            for name, row in self.show_stat().items()
            if name.startswith("replicas/gateway") and row["status"] == "UP"
        }


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").is_file() else None
    )


@pytest.fixture
def start_haproxy(tmp_path: Path) -> Iterator[StartHAProxy]:
    binary = haproxy_binary()
    if binary is None:
        pytest.skip("haproxy is not installed (make system-deps)")
    started: list[subprocess.Popen[bytes]] = []

    def start(a: Replica, b: Replica) -> HAProxy:
        port = free_port()
        stats = tmp_path / "haproxy.sock"
        extra = tmp_path / "stats.cfg"
        extra.write_text(f'global\n    stats socket "{stats}" level admin\n')
        env = {
            **os.environ,
            "LISTEN": f"127.0.0.1:{port}",
            "GATEWAY_1": f"127.0.0.1:{a.port}",
            "GATEWAY_1_ADMIN_PORT": str(a.admin_port),
            "GATEWAY_2": f"127.0.0.1:{b.port}",
            "GATEWAY_2_ADMIN_PORT": str(b.admin_port),
        }
        with (tmp_path / "haproxy.log").open("wb") as log:  # the child keeps its own copy
            # the binary and config are this repository's; -db: stay in the foreground
            process = subprocess.Popen(
                [binary, "-db", "-f", str(CONFIG), "-f", str(extra)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        started.append(process)
        proxy = HAProxy(process, port, stats)
        deadline = time.monotonic() + 20
        while True:  # until both replicas pass the /readyz check
            if process.poll() is not None:
                raise RuntimeError((tmp_path / "haproxy.log").read_text())
            try:
                if proxy.up() == {"gateway1", "gateway2"}:
                    return proxy
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("HAProxy did not see both replicas ready")
            time.sleep(0.1)

    yield start
    for process in started:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


async def through(cluster: Cluster, proxy: HAProxy, assertion: str) -> tuple[int, str | None]:
    async with cluster.session.get(
        f"{proxy.url}/echo", headers={"X-SAML-Assertion": assertion}
    ) as response:
        body = await response.read()
        if response.status != 200:
            return response.status, body[:200].decode("utf-8", "replace")
        return 200, None


async def test_a_burst_of_large_assertions_costs_one_exchange_each(
    cluster: Cluster, start_haproxy: StartHAProxy
) -> None:
    a, b = cluster.spawn("a"), cluster.spawn("b")
    proxy = start_haproxy(a, b)
    assertions = [
        cluster.assertion(f"user{i}@example.test", attributes={"groups": BIG}) for i in range(5)
    ]
    assert all(len(x) > 20_000 for x in assertions)
    calls = [assertions[i % len(assertions)] for i in range(200)]
    async with asyncio.timeout(60):
        results = await asyncio.gather(*(through(cluster, proxy, x) for x in calls))
    assert [status for status, _ in results] == [200] * 200, results
    assert cluster.parts.auth.calls == len(assertions)  # one exchange per assertion
    for gateway in (a, b):  # HAProxy spread the burst over both
        assert gateway.logs_with('"status":200').count('"status":200') > 0
    print(
        f"\nburst: 200 requests, {len(assertions)} assertions of {len(assertions[0])} "
        f"bytes, {cluster.parts.auth.calls} exchanges"
    )


async def test_a_replica_killed_under_load_fails_no_request(
    cluster: Cluster, start_haproxy: StartHAProxy
) -> None:
    a, b = cluster.spawn("a"), cluster.spawn("b")
    proxy = start_haproxy(a, b)
    assertions = [cluster.assertion(f"user{i}@example.test") for i in range(20)]
    total, concurrency, kill_after = 600, 16, 200
    done = 0
    killed = asyncio.Event()
    results: list[tuple[int, str | None]] = []
    limit = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        nonlocal done
        async with limit:
            results.append(await through(cluster, proxy, assertions[i % len(assertions)]))
        done += 1
        if done == kill_after:
            killed.set()

    async def kill_b() -> None:
        await killed.wait()
        b.proc.send_signal(signal.SIGKILL)  # mid-load: requests in flight on b are lost

    async with asyncio.timeout(120):
        await asyncio.gather(kill_b(), *(one(i) for i in range(total)))
    assert b.proc.wait(10) == -signal.SIGKILL
    failed = [r for r in results if r[0] != 200]
    stats = proxy.show_stat()
    backend = stats["replicas/BACKEND"]
    one_a, one_b = stats["replicas/gateway1"], stats["replicas/gateway2"]
    print(
        f"\nkill under load: {total} requests ({concurrency} at a time), gateway2 SIGKILLed "
        f"after {kill_after}; failed {len(failed)}; HAProxy retries {backend['wretr']}, "
        f"redispatches {backend['wredis']}; gateway1 served {one_a['stot']}, "
        f"gateway2 {one_b['stot']} (now {one_b['status']})"
    )
    assert len(results) == total
    assert failed == []
    # the survivor served the rest: every request after the kill went to gateway1
    served = total - kill_after - concurrency + 1
    assert a.logs_with('"status":200', served).count('"status":200') >= served
    assert (
        int(stats["replicas/gateway1"]["stot"]) + int(stats["replicas/gateway2"]["stot"]) >= total
    )


@dataclass
class DeadEnd:
    """A replica that reads each request and hangs up without a reply (as one killed while
    the request was in flight), and whose /readyz says ready: what HAProxy may resend."""

    port: int = 0
    admin_port: int = 0
    methods: list[str] | None = None

    async def start(self) -> list[asyncio.Server]:
        self.methods = []

        async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            assert self.methods is not None
            self.methods.append(head.split(b" ", 1)[0].decode())
            writer.close()

        async def ready(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            writer.close()

        servers = [
            await asyncio.start_server(swallow, "127.0.0.1", 0),
            await asyncio.start_server(ready, "127.0.0.1", 0),
        ]
        self.port = servers[0].sockets[0].getsockname()[1]
        self.admin_port = servers[1].sockets[0].getsockname()[1]
        return servers


async def status_of(proxy: HAProxy, method: str) -> int:
    """One request on its own connection, as a plain HTTP/1.1 client writes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    body = b"x" if method == "POST" else b""
    writer.write(
        f"{method} /echo HTTP/1.1\r\nHost: gateway\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    return int(status_line.split()[1])


async def test_a_lost_reply_is_resent_only_for_idempotent_methods(
    start_haproxy: StartHAProxy,
) -> None:
    first, second = DeadEnd(), DeadEnd()
    servers = [*(await first.start()), *(await second.start())]
    try:
        proxy = await asyncio.to_thread(start_haproxy, first, second)
        seen: dict[str, int] = {}
        for method in ("GET", "POST"):
            before = len(first.methods or []) + len(second.methods or [])
            async with asyncio.timeout(30):
                assert await status_of(proxy, method) == 502
            seen[method] = len(first.methods or []) + len(second.methods or []) - before
    finally:
        for server in servers:
            server.close()
    # the GET went out again (to both replicas, by redispatch); the POST exactly once
    assert seen["GET"] > 1
    assert seen["POST"] == 1
