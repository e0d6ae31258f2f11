"""A refused request's access line, read from a real gateway process's log: the reason, the
detail in explain's words, and the assertion's ID and Issuer marked unverified."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.devkit.idp import DemoIdP

from .helpers import AUDIENCE, SUBJECT, TOKEN_URL, Explain, b64, write_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Gateway:
    def __init__(self, config: Path) -> None:
        data = yaml.safe_load(config.read_text())
        self.port, admin = free_port(), free_port()
        data["listen"] = {"host": "127.0.0.1", "port": self.port}
        data["admin"] = {"host": "127.0.0.1", "port": admin}
        data["lifecycle"] = {"shutdown_grace": 0, "drain_timeout": 2}
        config.write_text(yaml.safe_dump(data))
        self.log = config.with_suffix(".log")
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", "-c", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited:\n{self.log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", admin), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"gateway did not start:\n{self.log.read_text()}")

    def get(self, request_id: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/api/x", headers={"X-Request-ID": request_id, **headers}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def access_line(self, request_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the line is written after the answer is sent
            for line in self.log.read_text().splitlines():
                if line.startswith("{"):
                    record = json.loads(line)
                    if record.get("logger") == "gateway.access" and (
                        record.get("request_id") == request_id
                    ):
                        return record
            time.sleep(0.05)
        raise AssertionError(f"no access line for {request_id}:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@pytest.fixture
def gateway(config: Path) -> Iterator[Gateway]:
    running = Gateway(config)
    yield running
    running.stop()


@pytest.mark.parametrize(
    ("reason", "kwargs"),
    [
        ("expired", {"issued_ago": timedelta(hours=1)}),
        ("audience", {"audience": "https://other.example"}),
    ],
)
def test_refused_request_logs_reason_detail_and_unverified_id(
    gateway: Gateway, explain: Explain, idp: DemoIdP, reason: str, kwargs: dict[str, Any]
) -> None:
    # issued now, not when the module was imported: a long suite must not expire it first
    kwargs = dict(kwargs)
    now = datetime.now(UTC) - kwargs.pop("issued_ago", timedelta())
    kwargs = {"audience": AUDIENCE, "recipient": TOKEN_URL, "now": now, **kwargs}
    raw = idp.issue(SUBJECT, assertion_id=f"_refused-{reason}", **kwargs)
    status, body = gateway.get(f"req-{reason}", {"X-SAML-Assertion": b64(raw)})
    assert status == 401
    assert body["error_description"] == "the SAML assertion was not accepted"
    assert set(body) == {"error", "error_description", "request_id"}  # the reason: log only
    line = gateway.access_line(f"req-{reason}")
    assert line["reason"] == reason
    assert line["assertion_id_unverified"] == f"_refused-{reason}"
    assert line["issuer_unverified"] == idp.issuer
    assert line["assertion_id"] is None and line["issuer"] is None  # nothing verified
    # explain says the same thing in the same words
    report = json.loads(explain(b64(raw), "--json").out)
    assert report["reason"] == reason
    # the same words, up to the clock reading, which moved on between the two runs
    assert line["detail"].split(", found now")[0] == report["detail"].split(", found now")[0]
    assert line["detail"].startswith(report["checks"][-1]["name"] + ": expected ")
    if reason == "audience":
        assert line["detail"] == (f"audience: expected '{AUDIENCE}', found 'https://other.example'")
    log = gateway.log.read_text()
    assert SUBJECT not in log and b64(raw)[:60] not in log


def test_missing_assertion_is_told_as_such(gateway: Gateway) -> None:
    status, body = gateway.get("req-missing", {})
    assert status == 401
    assert body["error_description"] == "no SAML assertion in the request"
    line = gateway.access_line("req-missing")
    assert line["reason"] == "missing"
    assert line["detail"] == "no assertion header in the request"
    assert line["assertion_id_unverified"] is None


def test_unreadable_document_has_no_unverified_id(gateway: Gateway, tmp_path: Path) -> None:
    status, body = gateway.get("req-garbage", {"X-SAML-Assertion": b64(b"<not-saml/>")})
    assert status == 401
    assert body["error_description"] == "the SAML assertion was not accepted"
    line = gateway.access_line("req-garbage")
    assert line["reason"] == "malformed"
    assert line["detail"].startswith("structure: expected a saml:Assertion")
    assert line["assertion_id_unverified"] is None


_ = write_config  # the config fixture writes it
