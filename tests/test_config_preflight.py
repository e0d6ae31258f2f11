"""The preflight that ``check-config`` and ``run`` share, run as the real command line.

- Every problem of a file comes in one report, each with its key path, unset references
  included; ``check-config`` exits 2 on any problem and 0 otherwise.
- What ``run`` refuses, ``check-config`` refuses (Redis URL shapes and sealing keys were
  once checked only when serving).
- Clear-text credentials to another host are refused unless the profile opts in.
- A reload warns only when a restart-only key differs from what runs; ``gateway_redis_up``
  exists only when a Redis store is configured.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

CONFIG = Path(__file__).resolve().parents[1] / "config"
GOOD_KEY = "0123456789abcdef0123"  # 20 characters: a usable sealing secret


def gateway_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def problems_of(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The problem lines of a configuration error report (one per problem, indented)."""
    return [line.strip() for line in result.stderr.splitlines() if line.startswith("  ")]


def base_config(folder: Path) -> dict[str, Any]:
    (folder / "idp.pem").write_text((CONFIG / "certs" / "example-idp.pem").read_text())
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "identity_providers": {"idp": {"issuer": "https://idp", "certificates": ["idp.pem"]}},
        "authorization_servers": {
            "as": {
                "token_url": "https://as.example.com/token",
                "client_id": "c",
                "client_secret": "s",
                "audience": "https://as.example.com",
            }
        },
        "routes": [
            {
                "upstream": "http://127.0.0.1:9",
                "identity_provider": "idp",
                "authorization_server": "as",
            }
        ],
    }


def write(folder: Path, data: dict[str, Any]) -> Path:
    path = folder / "gateway.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def check(path: Path, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    result = gateway_cli("check-config", "-c", str(path), env=env)
    return result.returncode, problems_of(result)


def keys_of(problems: list[str]) -> list[str]:
    return [problem.split(": ", 1)[0] for problem in problems]


def test_every_problem_is_listed_in_one_run(tmp_path: Path) -> None:
    data = base_config(tmp_path)
    (tmp_path / "broken.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    data["listen"]["port"] = 70000
    data["identity_providers"]["partner"] = {"issuer": "https://p", "certificates": ["broken.pem"]}
    data["authorization_servers"]["as"]["client_secret"] = "${PREFLIGHT_TEST_UNSET}"
    data["authorization_servers"]["lab"] = {
        "token_url": "http://as.example.com/token",
        "client_id": "c",
        "client_secret": "s",
        "audience": "a",
    }
    data["routes"].append(
        {"upstream": "htp:/x", "identity_provider": "nobody", "authorization_server": "as"}
    )
    data["cache"] = {
        "backend": "redis",
        "redis": {
            "url": "redis+sentinel://127.0.0.1:26379",  # no service name
            "encryption_keys": {"k1": "too-short"},
            "active_key": "k1",
        },
    }
    code, problems = check(write(tmp_path, data))
    assert code == 2
    assert sorted(keys_of(problems)) == sorted(
        [
            "authorization_servers.as.client_secret",
            "listen.port",
            "authorization_servers.lab.token_url",
            "routes[1].upstream",
            "routes[1].identity_provider",
            "cache.redis.url",
            "cache.redis.encryption_keys.k1",
            "identity_providers.partner.certificates[0]",
        ]
    ), problems
    assert (
        "authorization_servers.as.client_secret: environment variable "
        "'PREFLIGHT_TEST_UNSET' is not set"
    ) in problems


def test_every_problem_of_one_section_in_one_run(tmp_path: Path) -> None:
    # Rules across keys (clear-text password) are checked even when other keys are wrong.
    data = base_config(tmp_path)
    data["cache"] = {
        "backend": "redis",
        "redis": {
            "url": "redis://:pw@redis.internal:6379/0",
            "encryption_keys": {"k1": "too-short"},
            "active_key": "k2",
            "timeout": -1,
        },
    }
    code, problems = check(write(tmp_path, data))
    assert code == 2
    assert sorted(keys_of(problems)) == [
        "cache.redis.encryption_keys.k1",
        "cache.redis.timeout",
        "cache.redis.url",
    ], problems


def test_unset_reference_is_reported_once(tmp_path: Path) -> None:
    data = base_config(tmp_path)
    data["listen"]["port"] = "${PREFLIGHT_TEST_PORT}"
    data["authorization_servers"]["as"]["token_url"] = "${PREFLIGHT_TEST_URL}"
    code, problems = check(write(tmp_path, data))
    assert code == 2
    # Not also "not a URL" / "not an integer" for the placeholder left in their place.
    assert problems == [
        "listen.port: environment variable 'PREFLIGHT_TEST_PORT' is not set",
        "authorization_servers.as.token_url: environment variable 'PREFLIGHT_TEST_URL' is not set",
    ]


def redis_section(**settings: Any) -> dict[str, Any]:
    return {
        "backend": "redis",
        "redis": {"encryption_keys": {"k1": GOOD_KEY}, "active_key": "k1", **settings},
    }


@pytest.mark.parametrize(
    ("redis", "key", "says"),
    [
        # Each of these passed check-config and was refused only by `run`.
        (
            {"url": "redis://127.0.0.1:6379/0", "encryption_keys": {"k1": "short"}},
            "cache.redis.encryption_keys.k1",
            "secret is too short",
        ),
        (
            {"url": "redis+sentinel://127.0.0.1:26379"},
            "cache.redis.url",
            "service_name",
        ),
        (
            {"url": "redis+cluster://127.0.0.1:6379/0"},
            "cache.redis.url",
            "a cluster URL has no path",
        ),
        (
            {"url": "redis+sentinel://127.0.0.1:26379/mymaster/zero"},
            "cache.redis.url",
            "the database must be a number",
        ),
    ],
)
def test_check_config_refuses_what_run_refuses(
    tmp_path: Path, redis: dict[str, Any], key: str, says: str
) -> None:
    data = base_config(tmp_path)
    data["cache"] = redis_section(**redis)
    path = write(tmp_path, data)
    code, problems = check(path)
    assert code == 2
    [problem] = problems
    assert problem.startswith(f"{key}: ") and says in problem
    ran = gateway_cli("run", "-c", str(path))  # refused before listening, same report
    assert ran.returncode == 2
    assert problems_of(ran) == problems


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        ({"token_url": "http://as.example.com/token"}, 2),
        ({"token_url": "http://10.0.0.7:8080/token"}, 2),
        ({"token_url": "http://as.example.com/token", "allow_insecure_http": True}, 0),
        ({"token_url": "http://127.0.0.1:8080/token"}, 0),
        ({"token_url": "http://[::1]:8080/token"}, 0),
        ({"token_url": "http://localhost/token"}, 0),
        ({"token_url": "https://as.example.com/token"}, 0),
    ],
)
def test_clear_text_token_url(tmp_path: Path, server: dict[str, Any], expected: int) -> None:
    data = base_config(tmp_path)
    data["authorization_servers"]["as"].update(server)
    code, problems = check(write(tmp_path, data))
    assert code == expected, problems
    if expected:
        [problem] = problems
        assert problem.startswith("authorization_servers.as.token_url: http:// to ")
        assert "allow_insecure_http" in problem


@pytest.mark.parametrize(
    ("redis", "expected"),
    [
        ({"url": "redis://:pw-in-url@redis.internal:6379/0"}, 2),
        ({"url": "redis://redis.internal:6379/0", "password": "pw"}, 2),
        ({"url": "redis+cluster://10.1.1.1:6379,10.1.1.2:6379", "password": "pw"}, 2),
        # sentinels are spoken to in clear even with ca_file (TLS is for the master)
        ({"url": "redis+sentinel://u:pw@10.1.1.1:26379/m", "ca_file": "idp.pem"}, 2),
        ({"url": "redis://:pw@redis.internal:6379/0", "allow_insecure": True}, 0),
        ({"url": "rediss://:pw@redis.internal:6380/0"}, 0),
        ({"url": "redis+cluster://10.1.1.1:6379", "password": "pw", "ca_file": "idp.pem"}, 0),
        ({"url": "redis://:pw@127.0.0.1:6379/0"}, 0),
        ({"url": "redis://redis.internal:6379/0"}, 0),  # no password to leak
    ],
)
def test_clear_text_redis_password(tmp_path: Path, redis: dict[str, Any], expected: int) -> None:
    data = base_config(tmp_path)
    data["cache"] = redis_section(**redis)
    code, problems = check(write(tmp_path, data))
    assert code == expected, problems
    if expected:
        [problem] = problems
        assert problem.startswith("cache.redis.url: a password would travel to ")
        assert "pw" not in problem.replace("password", "")


def test_good_config_passes(tmp_path: Path) -> None:
    data = base_config(tmp_path)
    data["cache"] = redis_section(url="rediss://:secret@redis.internal:6380/0")
    result = gateway_cli("check-config", "-c", str(write(tmp_path, data)))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


# --- a running gateway ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def admin_get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
        return str(answer.read().decode())


def wait_for(predicate: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout:g} s: {what}")


def reloads_ok(admin: int) -> float:
    for line in admin_get(admin, "/metrics").splitlines():
        if line.startswith('gateway_config_reloads_total{result="ok"}'):
            return float(line.split()[-1])
    return 0.0


class Running:
    def __init__(self, path: Path, admin: int) -> None:
        self.path, self.admin, self.log = path, admin, path.with_suffix(".log")
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", "-c", str(path), "--log-format", "json"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for(lambda: admin_get(admin, "/healthz"), "the admin listener answers")

    def reload_with(self, data: dict[str, Any]) -> None:
        before = reloads_ok(self.admin)
        write(self.path.parent, data)
        self.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: reloads_ok(self.admin) > before, "the reload is counted")

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def running_config(folder: Path, **top: Any) -> tuple[dict[str, Any], int]:
    data = base_config(folder)
    admin = free_port()
    data["listen"]["port"] = free_port()
    data["admin"]["port"] = admin
    data["lifecycle"] = {"shutdown_grace": 0, "drain_timeout": 1}
    data.update(top)
    return data, admin


def restart_warnings(lines: list[dict[str, Any]]) -> list[str]:
    restart = "takes effect at the next restart"
    return [line["msg"] for line in lines if restart in line["msg"]]


def test_reload_that_restores_the_running_listener_does_not_warn(tmp_path: Path) -> None:
    data, admin = running_config(tmp_path)
    running_port = data["listen"]["port"]
    gateway = Running(write(tmp_path, data), admin)
    try:
        data["listen"]["port"] = free_port()
        gateway.reload_with(data)
        assert restart_warnings(gateway.log_lines()) == [
            "config key 'listen' changed: it takes effect at the next restart"
        ]
        data["listen"]["port"] = running_port  # back to what is running
        gateway.reload_with(data)
        assert len(restart_warnings(gateway.log_lines())) == 1  # nothing new to warn about
    finally:
        gateway.stop()


def test_metrics_without_redis_have_no_redis_gauge(tmp_path: Path) -> None:
    data, admin = running_config(tmp_path)
    gateway = Running(write(tmp_path, data), admin)
    try:
        text = admin_get(admin, "/metrics")
        assert "gateway_config_reloads_total" in text or "gateway_requests" in text
        assert "gateway_redis_up" not in text
    finally:
        gateway.stop()


def test_metrics_with_redis_have_the_gauge(tmp_path: Path) -> None:
    # A Redis store that nobody listens for: configured, down, and said so.
    url = f"redis://127.0.0.1:{free_port()}/0"
    data, admin = running_config(tmp_path, cache=redis_section(url=url))
    gateway = Running(write(tmp_path, data), admin)
    try:
        wait_for(
            lambda: "gateway_redis_up 0.0" in admin_get(admin, "/metrics"),
            "gateway_redis_up is 0 while Redis is down",
        )
    finally:
        gateway.stop()
