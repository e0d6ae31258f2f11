"""A whole gateway on loopback: a signing IdP, the fake authorization server, a real
upstream, and the gateway itself (in-process, or as a real process for signal tests)."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.app import GatewayServer
from gateway.config import load_config
from gateway.devkit.authorization_server import FakeAuthorizationServer
from gateway.devkit.idp import DemoIdP
from gateway.devkit.loopback import write_loopback_config
from gateway.devkit.upstream import UpstreamApp

ISSUER = "https://idp.test/saml"
AUDIENCE = "https://as.test/oauth2"
CLIENT_ID = "gateway"
CLIENT_SECRET = "integration-secret-value-0123456789"


@pytest.fixture(scope="session")
def idp() -> DemoIdP:
    return DemoIdP.generate(ISSUER)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gateway_yaml(
    folder: Path, token_url: str, upstream: str, idp: DemoIdP, **overrides: Any
) -> Path:
    """Write a gateway config for the given parts, with short test timeouts; ``server`` and
    ``route`` add to those entries, other keywords replace top-level keys."""
    server: dict[str, Any] = {
        "timeouts": {"connect": 1, "total": 2},
        "retries": {"attempts": 3, "backoff": 0.05, "max_backoff": 0.2, "deadline": 3},
        **overrides.pop("server", {}),
    }
    route: dict[str, Any] = {
        "realm": "test-api",
        "timeouts": {"connect": 1, "read": 2, "total": 5},
        "max_body_size": 1024 * 1024,
        **overrides.pop("route", {}),
    }
    return write_loopback_config(
        folder,
        certificate_pem=idp.certificate_pem,
        issuer=ISSUER,
        token_url=token_url,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        audience=AUDIENCE,
        upstream=upstream,
        server=server,
        route=route,
        **overrides,
    )


async def raw_request(port: int, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """One request line sent byte-exact (aiohttp's client would normalise ``..`` away)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"GET {target} HTTP/1.1", "Host: gw.test", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def echoed_headers(body: dict[str, Any]) -> dict[str, str]:
    """The headers the upstream's /echo saw, by lower-case name."""
    return {name.lower(): value for name, value in body["headers"]}


@dataclass
class Stack:
    server: GatewayServer
    auth: FakeAuthorizationServer
    upstream: UpstreamApp
    idp: DemoIdP
    session: aiohttp.ClientSession
    config_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.server.admin_port}"

    def raw_assertion(self, subject: str = "alice@example.test", **kwargs: Any) -> bytes:
        kwargs.setdefault("audience", AUDIENCE)
        kwargs.setdefault("recipient", self.auth.token_url)
        kwargs.setdefault("now", datetime.now(UTC))
        return self.idp.issue(subject, **kwargs)

    def assertion(self, subject: str = "alice@example.test", **kwargs: Any) -> dict[str, str]:
        """Headers carrying a freshly signed assertion."""
        raw = self.raw_assertion(subject, **kwargs)
        return {"X-SAML-Assertion": base64.b64encode(raw).decode()}

    async def metric(self, name: str, **labels: str) -> float:
        async with self.session.get(f"{self.admin}/metrics") as response:
            text = await response.text()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            key, _, value = line.rpartition(" ")
            if key.split("{")[0] != name:
                continue
            got = (
                ",".join(sorted(key.partition("{")[2].rstrip("}").split(","))) if "{" in key else ""
            )
            if got == want:
                return float(value)
        return 0.0


@dataclass
class Parts:
    """The authorization server and the upstream, running on loopback."""

    auth: FakeAuthorizationServer
    upstream: UpstreamApp
    upstream_url: str


@pytest.fixture
async def parts() -> AsyncIterator[Parts]:
    auth = FakeAuthorizationServer(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    await auth.start()
    upstream = UpstreamApp()
    url = await upstream.start()
    yield Parts(auth, upstream, url)
    await upstream.stop()
    await auth.stop()


async def start_stack(tmp_path: Path, idp: DemoIdP, parts: Parts, **overrides: Any) -> Stack:
    auth, upstream = parts.auth, parts.upstream
    path = gateway_yaml(tmp_path, auth.token_url, parts.upstream_url, idp, **overrides)
    server = GatewayServer(load_config(path), config_path=path)
    await server.start()
    session = aiohttp.ClientSession(auto_decompress=False)
    return Stack(server, auth, upstream, idp, session, path)


@pytest.fixture
async def stack(tmp_path: Path, idp: DemoIdP, parts: Parts) -> AsyncIterator[Stack]:
    s = await start_stack(tmp_path, idp, parts)
    yield s
    await s.session.close()
    await s.server.close()


# --- the gateway as a real process -----------------------------------------------------------


@dataclass
class Process:
    proc: subprocess.Popen[str]
    port: int
    admin_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def logs(self) -> str:
        return self.log.read_text()

    def logs_with(self, text: str, count: int = 1, seconds: float = 10) -> str:
        """The log once it holds ``text`` ``count`` times, or after ``seconds``: a running
        gateway writes its access lines from a thread, moments after the answers."""
        deadline = time.monotonic() + seconds
        while (log := self.logs()).count(text) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return log


def spawn_gateway(config_path: Path, *args: str) -> Process:
    """Run ``saml-gateway run`` on free ports and wait until /healthz answers."""
    data = yaml.safe_load(config_path.read_text())
    port, admin_port = free_port(), free_port()
    data["listen"] = {"host": "127.0.0.1", "port": port}
    data["admin"] = {"host": "127.0.0.1", "port": admin_port}
    config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    log = config_path.with_suffix(".log")
    with log.open("w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(config_path), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ},
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited early:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", admin_port), timeout=0.2):
                return Process(proc, port, admin_port, log)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"gateway did not start:\n{log.read_text()}")


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
        p.proc.wait(timeout=10)
