"""Shared pieces of the throughput benchmarks (bench/proxy.py, bench/forward_auth.py).

Everything runs on 127.0.0.1 as separate processes, so the figures include real sockets:
- ``Upstream``: nginx answering ``return 200`` (the fastest upstream available, so that the
  proxy under test, not the upstream, is what the load finds);
- nginx (front proxy or upstream) through ``tests/forward_auth/nginx_runner.py``, loaded by
  path so tests and benchmarks drive nginx the same way;
- the gateway as a real ``saml-gateway run`` process (``workers: N`` as in production);
- the minimal aiohttp proxy of ``bench/proxy_baseline.py`` as N processes on one port;
- ``wrk`` for closed-loop throughput, and an open-loop paced client (``paced``) in its own
  process for latency at a fixed rate.

Run as a script it is the worker side of those processes:
    python bench/_harness.py baseline --port P --upstream URL
    python bench/_harness.py paced --url URL --rate 1000 --seconds 5 --header-file F
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from gateway.devkit.loopback import write_loopback_config
from gateway.devkit.servers import stop_process

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CLIENT_ID = "bench-gateway"
CLIENT_SECRET = "bench-client-secret-0123456789"
ISSUER = "https://idp.bench.test/saml"
AUDIENCE = "https://as.bench.test/oauth2"
AUTH_PATH = "/_saml_auth"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


nginx_runner = _load("nginx_runner", ROOT / "tests" / "forward_auth" / "nginx_runner.py")


def free_port() -> int:
    port: int = nginx_runner.free_port()
    return port


def wait_for_port(
    port: int, proc: subprocess.Popen[Any] | None = None, timeout: float = 20
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def stop(proc: subprocess.Popen[Any], timeout: float = 10) -> None:
    stop_process(proc, timeout)


# --- memory --------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """Resident memory of one process (VmRSS), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


# --- nginx ---------------------------------------------------------------------------------

KEEPALIVE = "    keepalive_requests 100000;\n"


def upstream_conf(port: int) -> str:
    return (
        "server {\n"
        f"    listen 127.0.0.1:{port} reuseport;\n"
        f"{KEEPALIVE}"
        '    location / { return 200 "hello\\n"; }\n'
        "}\n"
    )


def nginx_proxy_conf(port: int, upstream: str) -> str:
    """nginx as a plain reverse proxy: what a forward-auth setup costs without the auth."""
    return (
        "upstream api {\n"
        f"    server {upstream};\n"
        "    keepalive 64;\n"
        "}\n"
        "server {\n"
        f"    listen 127.0.0.1:{port};\n"
        "    large_client_header_buffers 4 96k;\n"
        f"{KEEPALIVE}"
        "    location / {\n"
        "        proxy_http_version 1.1;\n"
        '        proxy_set_header Connection "";\n'
        "        proxy_pass http://api;\n"
        "    }\n"
        "}\n"
    )


def forward_auth_conf(name: str, port: int, gateway: str, upstream: str, cache: Path) -> str:
    """One of the shipped nginx examples, on bench ports (the test does the same)."""
    replacements = {
        "listen 80;": f"listen 127.0.0.1:{port};\n{KEEPALIVE}",
        "server 127.0.0.1:8081;": f"server {gateway};",
        "server 127.0.0.1:9000;": f"server {upstream};",
    }
    if name != "nginx.conf":
        # The example's route "public" location serves the benchmark's /hello.
        replacements["location ~ ^/public(/|$) {"] = "location ~ ^/hello(/|$) {"
    if "cached" in name:
        replacements["/var/cache/nginx/saml-auth"] = str(cache)
    if name == "nginx-lua.conf":
        cache.mkdir(parents=True, exist_ok=True)
        key_file = cache / "saml-auth-cache.key"
        key_file.write_bytes(os.urandom(32))
        replacements["/etc/nginx/saml-auth-cache.key"] = str(key_file)
    text: str = nginx_runner.example(name, replacements)
    return text


@contextmanager
def nginx(prefix: Path, http_body: str, port: int, workers: int = 1) -> Iterator[Any]:
    server = nginx_runner.start_nginx(prefix, http_body, [port], workers=workers)
    try:
        yield server
    finally:
        server.stop()


# --- the gateway ---------------------------------------------------------------------------


@dataclass
class Identity:
    """A signing IdP and one assertion header, valid for the whole run."""

    cert_pem: bytes
    header: str

    @classmethod
    def make(cls, token_url: str, folder: Path) -> Identity:
        from gateway.devkit.idp import DemoIdP

        idp = DemoIdP.generate(ISSUER)
        raw = idp.issue(
            "alice@bench.test",
            audience=AUDIENCE,
            recipient=token_url,
            now=datetime.now(UTC),
            lifetime=1800,
            attributes={f"urn:oid:1.3.6.1.4.1.5923.1.1.1.{i}": "v" * 24 for i in range(6)},
        )
        idp.write_certificate(folder / "idp.pem")
        return cls((folder / "idp.pem").read_bytes(), base64.b64encode(raw).decode())


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    port: int
    auth_port: int
    admin_port: int

    def pids(self) -> list[int]:
        """The serving processes: the workers under a supervisor, or the process itself."""
        return children(self.proc.pid) or [self.proc.pid]


@contextmanager
def gateway(
    folder: Path,
    identity: Identity,
    token_url: str,
    upstream: str,
    *,
    workers: int = 1,
    access_log: bool = False,
    **settings: Any,
) -> Iterator[Gateway]:
    """``saml-gateway run`` on free ports: proxy, forward-auth and admin listeners."""
    port, auth_port, admin_port = free_port(), free_port(), free_port()
    path = write_loopback_config(
        folder,
        certificate_pem=identity.cert_pem,
        issuer=ISSUER,
        token_url=token_url,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        audience=AUDIENCE,
        upstream=f"http://{upstream}",
        port=port,
        admin_port=admin_port,
        workers=workers,
        # Access lines off by default: nginx and the baseline log nothing either.
        log={"format": "json", "level": "info" if access_log else "warning"},
        lifecycle={"shutdown_grace": 0, "drain_timeout": 2},
        forward_auth={
            "enabled": True,
            "path": AUTH_PATH,
            "listen": {"host": "127.0.0.1", "port": auth_port},
            "front": "nginx",
        },
        assertion={"headers": [{"name": "X-SAML-Assertion"}]},
        **settings,  # any other top-level key (``telemetry=...``)
    )
    log = (folder / "gateway.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "-c", str(path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        wait_for_port(port, proc)
        wait_for_port(auth_port, proc)
        if workers > 1:  # every worker has bound before the load starts
            deadline = time.monotonic() + 20
            while len(children(proc.pid)) < workers and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)
        yield Gateway(proc, port, auth_port, admin_port)
    finally:
        stop(proc)
        log.close()


async def granted(gw: Gateway) -> float:
    """Forward-auth and proxy answers with status 200 so far (``gateway_requests_total``)."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{gw.admin_port}/metrics") as r:
            text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("gateway_requests_total{") and 'status="200"' in line:
            total += float(line.rpartition(" ")[2])
    return total


async def warm(url: str, header: str, times: int = 40) -> None:
    """Fill every worker's token cache: many fresh connections spread over SO_REUSEPORT."""
    import aiohttp

    for _ in range(times):
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.get(url, headers={"X-SAML-Assertion": header}) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"warm-up {url}: status {r.status}")


# --- the minimal aiohttp proxy -------------------------------------------------------------


@contextmanager
def baseline(upstream: str, processes: int) -> Iterator[int]:
    """``processes`` copies of bench/proxy_baseline.py's proxy sharing one port."""
    port = free_port()
    command = [sys.executable, str(BENCH / "_harness.py"), "baseline"]
    command += ["--port", str(port), "--upstream", f"http://{upstream}"]
    # A client that hangs up mid-answer makes the baseline print a traceback; keep it quiet.
    procs = [
        subprocess.Popen(command, cwd=ROOT, stderr=subprocess.DEVNULL) for _ in range(processes)
    ]
    try:
        for proc in procs:
            wait_for_port(port, proc)
        time.sleep(0.5 if processes > 1 else 0)
        yield port
    finally:
        for proc in procs:
            stop(proc)


def _serve_baseline(port: int, upstream: str) -> None:
    import uvloop
    from aiohttp import web

    proxy_baseline = _load("proxy_baseline", BENCH / "proxy_baseline.py")

    async def serve_on_port(app: web.Application) -> tuple[web.AppRunner, str]:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, reuse_port=True).start()
        return runner, f"http://127.0.0.1:{port}"

    # The baseline module binds port 0 for its own in-process bench; here several processes
    # share one port, as the gateway's workers do.
    proxy_baseline._serve = serve_on_port

    async def main() -> None:
        runner, _ = await proxy_baseline.start_baseline_proxy(upstream)
        stopping = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
        await stopping.wait()
        await runner.cleanup()

    uvloop.run(main())


# --- load generators -----------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


async def wrk(
    url: str,
    header: str | None,
    seconds: float,
    connections: int = 50,
    threads: int = 1,
    cpu: int | None = None,
) -> Load:
    """Closed-loop throughput with wrk (``--latency`` for p50/p99), pinned to ``cpu`` if set."""
    binary = shutil.which("wrk")
    if binary is None:
        raise RuntimeError("wrk is not installed: make bench-deps")
    command = [binary, "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s"]
    command += ["--latency", "--timeout", "5s"]
    if header is not None:
        command += ["-H", f"X-SAML-Assertion: {header}"]
    pin = None if cpu is None else (lambda: os.sched_setaffinity(0, {cpu}))
    proc = await asyncio.create_subprocess_exec(
        *command,
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=pin,
    )
    out, err = await asyncio.wait_for(proc.communicate(), seconds + 30)
    text = out.decode()
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed: {err.decode()}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", text).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", text).group(1))  # type: ignore[union-attr]
    errors = 0
    for pattern in (r"Non-2xx or 3xx responses:\s+(\d+)", r"Socket errors:.*?timeout (\d+)"):
        found = re.search(pattern, text)
        errors += int(found.group(1)) if found else 0
    return Load(rps, p50, p99, errors)


@dataclass(frozen=True)
class Paced:
    p50_ms: float
    p99_ms: float
    sent: int
    errors: int


async def paced(url: str, header: str, rate: float, seconds: float, folder: Path) -> Paced:
    """Open-loop latency at a fixed rate, measured by a client in its own process."""
    header_file = folder / "assertion-header"
    header_file.write_text(header)
    command = [sys.executable, str(BENCH / "_harness.py"), "paced", "--url", url]
    command += ["--rate", str(rate), "--seconds", str(seconds), "--header-file", str(header_file)]
    proc = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE, cwd=ROOT)
    out, _ = await asyncio.wait_for(proc.communicate(), seconds + 60)
    header_file.unlink()
    data = json.loads(out)
    return Paced(data["p50_ms"], data["p99_ms"], data["sent"], data["errors"])


def _paced_client(url: str, rate: float, seconds: float, header: str) -> None:
    import aiohttp
    import uvloop

    async def main() -> dict[str, Any]:
        latencies: list[float] = []
        errors = 0
        total = int(rate * seconds)
        connector = aiohttp.TCPConnector(limit=200)
        headers = {"X-SAML-Assertion": header}
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one(scheduled: float) -> None:
                nonlocal errors
                try:
                    async with session.get(url, headers=headers) as r:
                        await r.read()
                        ok = r.status == 200
                except aiohttp.ClientError:
                    ok = False
                # From the planned send time: a stalled server cannot hide its queue
                # (no coordinated omission).
                latencies.append(time.perf_counter() - scheduled)
                errors += 0 if ok else 1

            for _ in range(50):  # connect and warm up before the clock starts
                await one(time.perf_counter())
            latencies.clear()
            tasks: set[asyncio.Task[None]] = set()
            start = time.perf_counter() + 0.05
            for i in range(total):
                scheduled = start + i / rate
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(one(scheduled))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks, timeout=30)
        latencies.sort()
        return {
            "p50_ms": statistics.median(latencies) * 1e3,
            "p99_ms": statistics.quantiles(latencies, n=100)[98] * 1e3,
            "sent": total,
            "errors": errors + total - len(latencies),
        }

    print(json.dumps(uvloop.run(main())))


# --- printing ------------------------------------------------------------------------------


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def table(rows: Sequence[tuple[str, Load]], reference: dict[str, str]) -> str:
    """One line per case: req/s, p50, p99, and the ratio to the case named in ``reference``."""
    by_name = dict(rows)
    lines = [f"{'case':<44}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}  ratio"]
    for name, load in rows:
        ratio = ""
        if name in reference:
            base = reference[name]
            ratio = f"{load.rps / by_name[base].rps:5.2f} × {base}"
        errors = f"  ({load.errors} errors)" if load.errors else ""
        lines.append(
            f"{name:<44}{load.rps:>9.0f}{load.p50_ms:>9.2f}{load.p99_ms:>9.2f}  {ratio}{errors}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("baseline")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--upstream", required=True)
    client = sub.add_parser("paced")
    client.add_argument("--url", required=True)
    client.add_argument("--rate", type=float, required=True)
    client.add_argument("--seconds", type=float, required=True)
    client.add_argument("--header-file", required=True)
    args = parser.parse_args(argv)
    if args.command == "baseline":
        _serve_baseline(args.port, args.upstream)
    else:
        _paced_client(args.url, args.rate, args.seconds, Path(args.header_file).read_text())


if __name__ == "__main__":
    main()
