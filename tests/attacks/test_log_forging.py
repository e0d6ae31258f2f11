"""Log forging (issue 17, attack 7): what a client puts in a request cannot become a log
line or a field of its own. Read from the lines the gateway process wrote."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from integration.helpers import Parts, Process, gateway_yaml, raw_request, spawn_gateway

from gateway.devkit.idp import DemoIdP

FORGED = "2026-12-01 10:00:00,000 INFO    gateway.access: GET /admin 200 route=admin cache=hit"
# The forged line with a newline in front, percent-encoded as a request target allows.
NEWLINE_PATH = "/x%0A" + FORGED.replace(" ", "%20") + "%0D%0Aend"
FIELDS_PATH = "/x%20cache=hit%20route=admin%20status=200"
TEXT_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")
# A text line as logfmt tokens: bare runs and quoted strings, glued together.
TOKEN = re.compile(r'(?:[^\s"]+|"(?:[^"\\]|\\.)*")+')


def _fields(line: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for token in TOKEN.findall(line):
        key, eq, value = token.partition("=")
        if eq and re.fullmatch(r"\w+", key):
            found.setdefault(key, []).append(value)
    return found


def _access_lines(process: Process, fmt: str, count: int) -> list[str]:
    """The whole log, once ``count`` access records are in it (bounded wait)."""
    deadline = time.monotonic() + 10
    while True:
        lines = process.logs().splitlines()
        records = [line for line in lines if "gateway.access" in line]
        if len(records) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_a_client_cannot_write_log_lines_or_fields(
    tmp_path: Path, idp: DemoIdP, parts: Parts, processes: list[Process], fmt: str
) -> None:
    path = gateway_yaml(tmp_path, parts.auth.token_url, parts.upstream_url, idp)
    gateway = spawn_gateway(path, "--log-format", fmt)
    processes.append(gateway)
    first, _ = await raw_request(gateway.port, NEWLINE_PATH, {})
    second, _ = await raw_request(gateway.port, FIELDS_PATH, {})
    assert (first, second) == (400, 401)  # a control character in the path; no assertion

    lines = _access_lines(gateway, fmt, 2)
    if fmt == "json":
        records = [json.loads(line) for line in lines]  # every line is one whole record
        access = [r for r in records if r["logger"] == "gateway.access"]
        assert [r["path"] for r in access] == [
            "/x\n" + FORGED + "\r\nend",
            "/x cache=hit route=admin status=200",
        ]
        assert [r["cache"] for r in access] == ["-", "-"]
        return

    # Every line starts as a record does, or is an indented traceback line.
    assert [line for line in lines if not TEXT_RECORD.match(line) and line[:1] != " "] == []
    access = [line for line in lines if "gateway.access" in line]
    assert len(access) == 2
    assert not any(line.startswith(FORGED[:30]) for line in lines)
    assert "\\x0a" + FORGED.split(" 200 ")[0] in access[0]
    # Refused before routing, then routed and refused for want of an assertion.
    for line, status, route in zip(access, ("400", "401"), ("-", "api"), strict=True):
        fields = _fields(line)
        assert fields["status"] == [status]
        assert fields["cache"] == ["-"]
        assert fields["route"] == [route]
    assert _fields(access[1])["path"] == ['"/x cache=hit route=admin status=200"']
