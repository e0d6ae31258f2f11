"""The access log of a real gateway process (issue 12): buffered in memory, yet every line
is in the log after a SIGTERM drain, whole and in the configured format, and an idle
process still writes its lines without being stopped."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest

from gateway.devkit.idp import DemoIdP
from gateway.logs import FLUSH_LINES

from .helpers import AUDIENCE, Parts, Process, gateway_yaml, spawn_gateway

LIFECYCLE = {"shutdown_grace": 0, "drain_timeout": 2}
# More than a batch, and not a whole number of batches: some lines wait for the exit.
REQUESTS = 2 * FLUSH_LINES + 37


def _header(idp: DemoIdP, parts: Parts, audience: str) -> dict[str, str]:
    raw = idp.issue(
        "alice@example.test",
        audience=audience,
        recipient=parts.auth.token_url,
        now=datetime.now(UTC),
        assertion_id=f"_for-{audience.rsplit('/', 1)[-1]}",
    )
    return {"X-SAML-Assertion": base64.b64encode(raw).decode()}


async def _exit_code(process: Process, seconds: float) -> int | None:
    deadline = time.monotonic() + seconds
    while process.proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return process.proc.poll()


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_every_access_line_is_in_the_log_after_a_drain(
    tmp_path: Path, idp: DemoIdP, parts: Parts, processes: list[Process], fmt: str
) -> None:
    path = gateway_yaml(
        tmp_path, parts.auth.token_url, parts.upstream_url, idp, lifecycle=LIFECYCLE
    )
    gateway = spawn_gateway(path, "--log-format", fmt)
    processes.append(gateway)
    good, refused = _header(idp, parts, AUDIENCE), _header(idp, parts, "https://other.test/x")
    sent: dict[str, int] = {}
    async with aiohttp.ClientSession() as session:

        async def one(n: int) -> None:
            request_id = f"req-{n:04d}"
            headers = {"X-Request-ID": request_id, **(refused if n % 10 == 3 else good)}
            async with session.get(f"{gateway.url}/hello", headers=headers) as answer:
                await answer.read()
                sent[request_id] = answer.status

        for start in range(0, REQUESTS, 25):  # 25 at a time, all answered before the stop
            await asyncio.gather(*(one(n) for n in range(start, min(start + 25, REQUESTS))))
    gateway.proc.send_signal(signal.SIGTERM)
    assert await _exit_code(gateway, 20) == 0

    lines = gateway.logs().splitlines()
    access = [line for line in lines if "gateway.access" in line]
    assert len(access) == REQUESTS
    assert "stopped" in lines[-1]  # the access lines came before the last word, not after
    if fmt == "json":
        records = {r["request_id"]: r for r in map(json.loads, access)}
        assert {rid: r["status"] for rid, r in records.items()} == sent
        refusal = records["req-0003"]
        assert refusal["status"] == 401 and refusal["reason"] == "audience"
        assert refusal["assertion_id_unverified"] == "_for-x"
        assert refusal["detail"].startswith("audience: expected ")
        assert records["req-0104"]["cache"] == "hit"
        assert records["req-0104"]["assertion_id"] == "_for-oauth2"
    else:
        for request_id, status in sent.items():
            (line,) = [line for line in access if f"request_id={request_id} " in line]
            assert f" {status} request_id=" in line and f" status={status} " in line
        (refusal,) = [line for line in access if "request_id=req-0003 " in line]
        assert " reason=audience " in refusal and " assertion_id_unverified=_for-x " in refusal
        assert ' detail="audience: expected ' in refusal


async def test_an_idle_process_writes_its_lines_without_being_stopped(
    tmp_path: Path, idp: DemoIdP, parts: Parts, processes: list[Process]
) -> None:
    path = gateway_yaml(
        tmp_path, parts.auth.token_url, parts.upstream_url, idp, lifecycle=LIFECYCLE
    )
    gateway = spawn_gateway(path)
    processes.append(gateway)
    async with aiohttp.ClientSession() as session:
        headers = {"X-Request-ID": "req-alone", **_header(idp, parts, AUDIENCE)}
        async with session.get(f"{gateway.url}/hello", headers=headers) as answer:
            assert answer.status == 200
    deadline = time.monotonic() + 15  # bounded: the writer's timer runs every second
    while '"request_id":"req-alone"' not in gateway.logs() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert gateway.proc.poll() is None  # still running: the line came from the timer
    (line,) = [line for line in gateway.logs().splitlines() if "req-alone" in line]
    assert json.loads(line)["status"] == 200
