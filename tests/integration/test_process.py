"""The gateway as operators run it: a real process, signals, exit codes, the demo."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml

from gateway.devkit.authorization_server import FakeAuthorizationServer
from gateway.devkit.idp import DemoIdP

from .helpers import AUDIENCE, Parts, Process, free_port, gateway_yaml, spawn_gateway

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )


async def wait_exit(proc: subprocess.Popen[str], timeout: float) -> int:
    return await asyncio.to_thread(proc.wait, timeout)


def test_check_config_ok_prints_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_CLIENT_SECRET", "do-not-print-me")
    result = cli("check-config", "-c", "config/full.yaml")
    assert result.returncode == 0, result.stderr
    assert "do-not-print-me" not in result.stdout
    assert "'**********'" in result.stdout
    assert yaml.safe_load(result.stdout)["routes"][0]["name"] == "orders"


def test_check_config_errors_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes: [{upstream: 'htp:/x'}]\nlisten: {port: 99999}\n")
    result = cli("check-config", "-c", str(bad))
    assert result.returncode == 2
    assert "routes[0].upstream: not a URL: 'htp:/x'" in result.stderr
    assert "listen.port:" in result.stderr
    assert "identity_providers: required key is missing" in result.stderr
    missing = cli("check-config", "-c", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2
    assert "cannot read config file" in missing.stderr


def test_check_config_rejects_a_file_that_is_not_a_certificate(tmp_path: Path) -> None:
    (tmp_path / "idp.pem").write_text("not a certificate\n")
    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump(
            {
                "identity_providers": {"idp": {"issuer": "x", "certificates": ["idp.pem"]}},
                "authorization_servers": {
                    "as": {"token_url": "https://as/t", "client_auth": "none", "audience": "a"}
                },
                "routes": [
                    {
                        "upstream": "http://u",
                        "identity_provider": "idp",
                        "authorization_server": "as",
                    }
                ],
            }
        )
    )
    for command in ("check-config", "run"):  # run refuses it at start, naming the key too
        result = cli(command, "-c", str(tmp_path / "c.yaml"))
        assert result.returncode == 2
        assert "identity_providers.idp.certificates[0]" in result.stderr
        assert "Traceback" not in result.stderr


def test_run_with_broken_config_exits_2(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("workers: many\n")
    result = cli("run", "-c", str(tmp_path / "c.yaml"))
    assert result.returncode == 2
    assert "workers:" in result.stderr


def test_demo_runs_to_its_summary() -> None:
    result = cli("demo", "--once", "--port", str(free_port()), "--admin-port", str(free_port()))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Summary: 3/3 steps behaved as expected; 1 exchange(s)" in result.stdout
    assert "401" in result.stdout and "signature" in result.stdout


def headers_for(
    idp: DemoIdP, auth: FakeAuthorizationServer, subject: str = "a@x"
) -> dict[str, str]:
    import base64
    from datetime import UTC, datetime

    raw = idp.issue(subject, audience=AUDIENCE, recipient=auth.token_url, now=datetime.now(UTC))
    return {"X-SAML-Assertion": base64.b64encode(raw).decode()}


async def test_sigterm_drains_in_flight_requests(
    tmp_path: Path,
    idp: DemoIdP,
    parts: Parts,
    processes: list[Process],
) -> None:
    auth = parts.auth
    path = gateway_yaml(
        tmp_path,
        auth.token_url,
        parts.upstream_url,
        idp,
        lifecycle={"shutdown_grace": 0.5, "drain_timeout": 5},
    )
    gw = spawn_gateway(path, "--log-format", "json")
    processes.append(gw)
    headers = headers_for(idp, auth)
    async with aiohttp.ClientSession() as session:
        slow = asyncio.create_task(session.get(f"{gw.url}/slow/1.5", headers=headers))
        await asyncio.sleep(0.5)  # the slow request is in flight
        gw.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.1)
        async with session.get(f"{gw.admin}/readyz") as r:
            assert r.status == 503  # not ready at once
        async with session.get(f"{gw.url}/hello", headers=headers) as r:
            assert r.status == 200  # still serving during the grace period
        response = await slow
        assert response.status == 200
        await response.read()
        response.release()
    assert await wait_exit(gw.proc, 10) == 0


async def test_sighup_reloads_and_keeps_old_config_on_error(
    tmp_path: Path,
    idp: DemoIdP,
    parts: Parts,
    processes: list[Process],
) -> None:
    auth = parts.auth
    path = gateway_yaml(
        tmp_path, auth.token_url, parts.upstream_url, idp, route={"path_prefix": "/old"}
    )
    gw = spawn_gateway(path, "--log-format", "json")
    processes.append(gw)
    headers = headers_for(idp, auth)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{gw.url}/hello", headers=headers) as r:
            assert r.status == 404
        data = yaml.safe_load(path.read_text())
        data["routes"][0]["path_prefix"] = "/"
        path.write_text(yaml.safe_dump(data))
        gw.proc.send_signal(signal.SIGHUP)
        for _ in range(50):
            await asyncio.sleep(0.1)
            async with session.get(f"{gw.url}/hello", headers=headers) as r:
                if r.status == 200:
                    break
        assert r.status == 200
        path.write_text("routes: [{upstream: 'htp:/x'}]\n")
        gw.proc.send_signal(signal.SIGHUP)
        for _ in range(50):
            await asyncio.sleep(0.1)
            if "config reload failed" in gw.logs():
                break
        assert "config reload failed" in gw.logs()
        assert "routes[0].upstream: not a URL" in gw.logs()
        async with session.get(f"{gw.url}/hello", headers=headers) as r:
            assert r.status == 200  # the running configuration stayed
        assert auth.calls == 1  # the reload kept the token cache
    gw.proc.send_signal(signal.SIGTERM)
    assert await wait_exit(gw.proc, 10) == 0


async def test_two_workers_share_the_port(
    tmp_path: Path,
    idp: DemoIdP,
    parts: Parts,
    processes: list[Process],
) -> None:
    auth = parts.auth
    path = gateway_yaml(tmp_path, auth.token_url, parts.upstream_url, idp, workers=2)
    gw = spawn_gateway(path, "--log-format", "json")
    processes.append(gw)
    async with aiohttp.ClientSession() as session:
        for i in range(20):
            async with session.get(
                f"{gw.url}/hello",
                headers=headers_for(idp, auth, f"u{i}@x"),
            ) as r:
                assert r.status == 200
    children = subprocess.run(
        ["pgrep", "-P", str(gw.proc.pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    assert len(children) == 2
    gw.proc.send_signal(signal.SIGTERM)
    assert await wait_exit(gw.proc, 15) == 0


async def test_second_sigterm_skips_the_grace_period(
    tmp_path: Path, idp: DemoIdP, parts: Parts, processes: list[Process]
) -> None:
    path = gateway_yaml(
        tmp_path,
        parts.auth.token_url,
        parts.upstream_url,
        idp,
        lifecycle={"shutdown_grace": 60, "drain_timeout": 5},
    )
    gw = spawn_gateway(path)
    processes.append(gw)
    gw.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    assert gw.proc.poll() is None  # serving through the 60 s grace period
    gw.proc.send_signal(signal.SIGTERM)
    assert await wait_exit(gw.proc, 10) == 0


def test_workers_that_cannot_listen_stop_the_supervisor(
    tmp_path: Path, idp: DemoIdP, parts: Parts
) -> None:
    with socket.socket() as taken:  # a port held without SO_REUSEPORT: no worker can bind it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = gateway_yaml(
            tmp_path,
            parts.auth.token_url,
            parts.upstream_url,
            idp,
            workers=2,
            listen={"host": "127.0.0.1", "port": port},
            admin={"host": "127.0.0.1", "port": free_port()},
        )
        result = cli("run", "-c", str(path), timeout=30)
    assert result.returncode == 1
    assert "failed at start" in result.stderr


async def test_a_worker_that_dies_later_is_replaced(
    tmp_path: Path, idp: DemoIdP, parts: Parts, processes: list[Process]
) -> None:
    path = gateway_yaml(tmp_path, parts.auth.token_url, parts.upstream_url, idp, workers=2)
    gw = spawn_gateway(path, "--log-format", "json")
    processes.append(gw)

    def workers() -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(gw.proc.pid)], capture_output=True, text=True, check=False
        ).stdout
        return [int(pid) for pid in out.split()]

    await asyncio.sleep(5.5)  # past the start-up window: a death now is a crash to recover
    first = workers()
    assert len(first) == 2
    os.kill(first[0], signal.SIGKILL)
    for _ in range(100):
        await asyncio.sleep(0.1)
        now = workers()
        if len(now) == 2 and first[0] not in now:
            break
    assert len(now) == 2 and first[0] not in now  # replaced, and the supervisor is still up
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{gw.url}/hello", headers=headers_for(idp, parts.auth)) as r:
            assert r.status == 200
    gw.proc.send_signal(signal.SIGTERM)
    assert await wait_exit(gw.proc, 15) == 0
