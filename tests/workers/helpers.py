"""``workers: 4`` as operators run it: a real supervisor and its workers on loopback, the
fake authorization server (one-time use: a second exchange of an ID is refused, so it shows
as a 401), the upstream and the signing IdP of the integration suite.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from integration.helpers import (  # the fixtures are re-exported for this folder
    AUDIENCE,
    CLIENT_ID,
    CLIENT_SECRET,
    Process,
    free_port,
    gateway_yaml,
    idp,
    processes,
)

from gateway.devkit.authorization_server import FakeAuthorizationServer
from gateway.devkit.idp import DemoIdP
from gateway.devkit.upstream import UpstreamApp

__all__ = ["idp", "processes"]

WORKERS = 4
# The upstream runs in the test's own event loop, next to hundreds of client requests: give
# it room on a shared 2-core machine.
ROUTE = {"timeouts": {"connect": 10, "read": 20, "total": 30}}
QUICK_STOP = {"shutdown_grace": 0, "drain_timeout": 5}


@dataclass
class Host:
    """One gateway with ``workers: 4`` and no Redis, and what it talks to."""

    auth: FakeAuthorizationServer
    upstream_url: str
    idp: DemoIdP
    folder: Path
    processes: list[Process]
    session: aiohttp.ClientSession

    async def start(self, *args: str, **overrides: Any) -> Process:
        path = gateway_yaml(
            self.folder,
            self.auth.token_url,
            self.upstream_url,
            self.idp,
            **{"workers": WORKERS, "route": ROUTE, "lifecycle": QUICK_STOP, **overrides},
        )
        data = yaml.safe_load(path.read_text())
        port, admin_port = free_port(), free_port()
        data["listen"] = {"host": "127.0.0.1", "port": port}
        data["admin"] = {"host": "127.0.0.1", "port": admin_port}
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        log = path.with_suffix(".log")
        with log.open("w") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", "-c", str(path), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )
        gateway = Process(proc, port, admin_port, log)
        self.processes.append(gateway)  # from now on the teardown stops it, and its workers
        # Wait for every worker, not only the first one listening, so that the kernel spreads
        # the connections that follow over all of them. Generous: four workers import at
        # once on a shared 2-core machine.
        workers = data["workers"]
        for _ in range(600):  # bounded: ~60 s
            if gateway.logs().count("gateway listening") >= workers:
                return gateway
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.1)
        raise RuntimeError(f"the workers did not all start:\n{gateway.logs()}")

    def assertion(self, subject: str = "alice@example.test") -> str:
        raw = self.idp.issue(
            subject, audience=AUDIENCE, recipient=self.auth.token_url, now=datetime.now(UTC)
        )
        return base64.b64encode(raw).decode()

    async def call(self, gateway: Process, assertion: str) -> int:
        async with self.session.get(
            f"{gateway.url}/hello", headers={"X-SAML-Assertion": assertion}
        ) as response:
            await response.read()
            return response.status

    async def call_all(self, gateway: Process, assertions: list[str]) -> list[int]:
        """All at once, each on its own connection; bounded so a stuck gateway fails."""
        async with asyncio.timeout(45):
            return await asyncio.gather(*(self.call(gateway, a) for a in assertions))

    async def scrape(self, gateway: Process) -> str:
        async with self.session.get(f"{gateway.admin}/metrics") as response:
            assert response.status == 200
            return await response.text()


def metric(text: str, name: str, **labels: str) -> float | None:
    """One sample of a Prometheus text page, by name and exact labels."""
    want = dict(labels)
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, _, value = line.rpartition(" ")
        sample, _, rest = key.partition("{")
        got = dict(pair.split("=", 1) for pair in rest.rstrip("}").split(",") if pair)
        if sample == name and {k: v.strip('"') for k, v in got.items()} == want:
            return float(value)
    return None


def json_lines(gateway: Process) -> list[dict[str, Any]]:
    lines = []
    for line in gateway.logs().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


async def until(check: Callable[[], bool], seconds: float = 10) -> bool:
    """Poll ``check()`` (bounded) until it is true."""
    for _ in range(int(seconds / 0.1)):
        if check():
            return True
        await asyncio.sleep(0.1)
    return bool(check())


@pytest.fixture
async def host(
    tmp_path: Path, idp: DemoIdP, processes: list[Process], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Host]:
    # The supervisor makes its runtime folder here, where the test can look at it.
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    auth = FakeAuthorizationServer(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, one_time_use=True
    )
    await auth.start()
    upstream = UpstreamApp()
    upstream_url = await upstream.start()
    # No per-host limit and no keep-alive: every request is its own connection, which the
    # kernel hands to any of the workers (SO_REUSEPORT).
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    session = aiohttp.ClientSession(connector=connector)
    try:
        yield Host(auth, upstream_url, idp, tmp_path, processes, session)
    finally:
        await session.close()
        for process in processes:  # the supervisor stops its workers; a kill would orphan them
            if process.proc.poll() is None:
                process.proc.send_signal(signal.SIGTERM)
                try:
                    process.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.proc.kill()
                    process.proc.wait(timeout=10)
        await upstream.stop()
        await auth.stop()
