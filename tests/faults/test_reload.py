"""SIGHUP with a config file that is gone or broken: the running configuration stays, cached
tokens keep being served, the failure is counted and logged, and the process stays up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from gateway.devkit.idp import DemoIdP

from .helpers import (
    SOCKET_SLACK,
    Backstage,
    Gateway,
    Parts,
    client_session,
    fetch,
    free_port,
    gateway_yaml,
    header_for,
    issue,
    metric,
)


@dataclass
class Stack:
    gateway: Gateway
    parts: Parts
    idp: DemoIdP
    good: str  # the config file's text as the gateway was started with it

    async def reloads(self, result: str) -> float:
        async with client_session() as session:
            text = (await fetch(session, f"{self.gateway.admin}/metrics")).body.decode()
        return metric(text, "gateway_config_reloads_total", result=result)

    async def hup_and_wait(self, result: str) -> None:
        """SIGHUP, then wait (bounded) until the reload is counted with ``result``."""
        before = await self.reloads(result)
        self.gateway.hup()
        deadline = time.monotonic() + 10
        while await self.reloads(result) == before:
            assert time.monotonic() < deadline, f"no {result} reload counted within 10 s"
            await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def stack(
    backstage: Backstage, idp: DemoIdP, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    parts = Parts.start(backstage)
    folder: Path = tmp_path_factory.mktemp("reload-faults")
    path = gateway_yaml(folder, parts.auth.token_url, parts.upstream_url, idp)
    with Gateway.running(path) as gateway:
        yield Stack(gateway, parts, idp, path.read_text())
    parts.stop()


def dead_upstream(text: str) -> str:
    """The same config with the route sent to a port nobody listens on."""
    data = yaml.safe_load(text)
    data["routes"][0]["upstream"] = f"http://127.0.0.1:{free_port()}"
    return yaml.safe_dump(data)


def unknown_key(text: str) -> str:
    data = yaml.safe_load(dead_upstream(text))
    data["routes"][0]["no_such_setting"] = True
    return yaml.safe_dump(data)


def missing_certificate(text: str) -> str:
    data = yaml.safe_load(dead_upstream(text))
    data["identity_providers"]["idp"]["certificates"] = ["gone.pem"]
    return yaml.safe_dump(data)


BREAKAGES: dict[str, Callable[[Path, str], None]] = {
    "removed": lambda path, text: path.unlink(),
    "empty": lambda path, text: path.write_text(""),
    "not_yaml": lambda path, text: path.write_text("routes: [\n  {upstream: 'x'\n\t:::"),
    "truncated": lambda path, text: path.write_text(text[: len(text) // 2]),
    "unknown_key": lambda path, text: path.write_text(unknown_key(text)),
    "missing_certificate": lambda path, text: path.write_text(missing_certificate(text)),
    "binary": lambda path, text: path.write_bytes(b"\xff\xfe\x00garbage\x00" * 50),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
async def test_broken_config_before_sighup(stack: Stack, breakage: str) -> None:
    gateway, path = stack.gateway, stack.gateway.config_path
    cached = header_for(issue(stack.idp, stack.parts.auth.token_url))
    async with client_session() as session:
        assert (await fetch(session, f"{gateway.url}/hello", headers=cached)).status == 200
    baseline = gateway.sockets()
    try:
        BREAKAGES[breakage](path, stack.good)
        await stack.hup_and_wait("failed")
        calls = stack.parts.auth.calls
        async with client_session() as session:
            # The running configuration is kept: the old upstream, the cached token...
            hit = await fetch(session, f"{gateway.url}/hello", headers=cached)
            # ...and fresh assertions are still validated and exchanged with it.
            fresh = header_for(issue(stack.idp, stack.parts.auth.token_url))
            miss = await fetch(session, f"{gateway.url}/hello", headers=fresh)
        assert (hit.status, hit.body) == (200, b"hello")
        assert (miss.status, miss.body) == (200, b"hello")
        assert stack.parts.auth.calls == calls + 1
        assert gateway.alive()
        assert "config reload failed; keeping the running configuration" in gateway.logs()
    finally:
        path.write_text(stack.good)
    gateway.assert_no_leak(baseline, SOCKET_SLACK)


async def test_good_config_after_a_broken_one_is_applied(stack: Stack) -> None:
    gateway, path = stack.gateway, stack.gateway.config_path
    cached = header_for(issue(stack.idp, stack.parts.auth.token_url))
    async with client_session() as session:
        assert (await fetch(session, f"{gateway.url}/hello", headers=cached)).status == 200
    path.unlink()
    await stack.hup_and_wait("failed")
    data = yaml.safe_load(stack.good)
    data["routes"][0]["realm"] = "after-reload"
    path.write_text(yaml.safe_dump(data))
    try:
        await stack.hup_and_wait("ok")
        calls = stack.parts.auth.calls
        async with client_session() as session:
            hit = await fetch(session, f"{gateway.url}/hello", headers=cached)
            refused = await fetch(session, f"{gateway.url}/hello")
        # The token cache outlives the reload; the new realm shows the new config is live.
        assert hit.status == 200
        assert stack.parts.auth.calls == calls
        assert refused.status == 401
        assert refused.headers["WWW-Authenticate"] == 'SAML realm="after-reload"'
    finally:
        path.write_text(stack.good)
        await stack.hup_and_wait("ok")
    assert gateway.alive()


def test_clean_shutdown_after_reloads(stack: Stack) -> None:
    """Last in this module: after all those reloads the process stops cleanly, closing the
    sessions of every retired configuration and losing no task."""
    stack.gateway.stop()
    assert stack.gateway.process.proc.returncode == 0
    logs = stack.gateway.logs()
    assert "Unclosed" not in logs
    assert "never retrieved" not in logs
    assert "Traceback" not in logs
