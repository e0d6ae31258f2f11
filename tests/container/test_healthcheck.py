"""``saml-gateway healthcheck``: the image's HEALTHCHECK, against a real gateway process.

It must follow the admin listener of the config (not a fixed port), answer 1 while the
gateway drains, and fail fast with a message naming what is wrong otherwise.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.devkit.idp import DemoIdP
from gateway.devkit.loopback import write_loopback_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthcheck(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "healthcheck", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, **(env or {})},
    )


def write_config(folder: Path, **settings: Any) -> Path:
    """A loadable gateway config; the authorization server and upstream are never called."""
    return write_loopback_config(
        folder,
        certificate_pem=DemoIdP.generate("https://idp.test/saml").certificate_pem,
        issuer="https://idp.test/saml",
        token_url="http://127.0.0.1:9/token",
        client_id="gateway",
        client_secret="healthcheck-test-secret",
        audience="https://as.test/oauth2",
        upstream="http://127.0.0.1:9",
        **settings,
    )


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path, int]]:
    """A gateway process whose admin listener is on a free port (never the default 9901),
    with a long shutdown grace so a draining gateway can be looked at without a race."""
    admin_port = free_port()
    path = write_config(
        tmp_path,
        port=free_port(),
        admin_port=admin_port,
        lifecycle={"shutdown_grace": 60, "drain_timeout": 5},
    )
    log = (tmp_path / "gateway.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "-c", str(path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"gateway did not start:\n{(tmp_path / 'gateway.log').read_text()}")
        try:
            socket.create_connection(("127.0.0.1", admin_port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield proc, path, admin_port
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    log.close()


def test_healthy_on_the_configured_admin_port(
    gateway: tuple[subprocess.Popen[str], Path, int],
) -> None:
    _, path, admin_port = gateway
    result = healthcheck("-c", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"healthy: http://127.0.0.1:{admin_port}/readyz: 200"


def test_config_path_from_the_environment(
    gateway: tuple[subprocess.Popen[str], Path, int],
) -> None:
    _, path, admin_port = gateway
    result = healthcheck(env={"GATEWAY_CONFIG": str(path)})
    assert result.returncode == 0, result.stderr
    assert f":{admin_port}/readyz: 200" in result.stdout


def test_unhealthy_while_draining(gateway: tuple[subprocess.Popen[str], Path, int]) -> None:
    proc, path, admin_port = gateway
    proc.send_signal(signal.SIGTERM)  # /readyz answers 503 from now; 60 s of grace follow
    deadline = time.monotonic() + 20
    result = healthcheck("-c", str(path))
    while result.returncode == 0 and time.monotonic() < deadline:  # the signal is async
        time.sleep(0.1)
        result = healthcheck("-c", str(path))
    assert result.returncode == 1
    assert result.stdout.strip() == f"unhealthy: http://127.0.0.1:{admin_port}/readyz: 503"
    assert proc.poll() is None  # still serving out its grace: the check saw it draining
    proc.send_signal(signal.SIGTERM)  # the second one skips the grace
    assert proc.wait(timeout=15) == 0


def test_nothing_listening_fails_fast_naming_the_url(tmp_path: Path) -> None:
    # A wildcard bind is checked on loopback (nothing binds here: no listener is started).
    port = free_port()
    path = write_config(tmp_path, admin={"host": "0.0.0.0", "port": port})
    result = healthcheck("-c", str(path))
    assert result.returncode == 1
    assert f"unhealthy: http://127.0.0.1:{port}/readyz:" in result.stderr
    assert "refused" in result.stderr.lower()


def test_config_problems_are_named(tmp_path: Path) -> None:
    missing = healthcheck("-c", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 1  # never 2: a container HEALTHCHECK reserves it
    assert f"cannot read config file {tmp_path / 'nope.yaml'}" in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"admin": {"port": 99999}}))
    result = healthcheck("-c", str(bad))
    assert result.returncode == 1
    assert "admin.port:" in result.stderr
    off = write_config(tmp_path, admin={"enabled": False})
    result = healthcheck("-c", str(off))
    assert result.returncode == 1
    assert "the admin listener is disabled" in result.stderr
    assert "Traceback" not in missing.stderr + result.stderr
