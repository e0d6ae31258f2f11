"""The access line built directly (``gateway.logs.access``) is, character for character,
what the formatters write for the same record, and the buffered handler loses nothing."""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import pytest

from gateway.logs import (
    ACCESS,
    BufferedLines,
    JsonFormatter,
    NameWorker,
    TextFormatter,
    json_access_line,
    text_access_line,
)

HIT: dict[str, Any] = {
    "request_id": "0123456789abcdef0000000000000001",
    "method": "GET",
    "path": "/api/hello",
    "route": "api",
    "status": 200,
    "duration_ms": 1.234,
    "upstream_ms": 0.5,
    "cache": "hit",
    "assertion_id": "_a1",
    "issuer": "https://idp.test/saml",
    "assertion_id_unverified": None,
    "issuer_unverified": None,
    "reason": None,
    "detail": None,
    "peer": "127.0.0.1",
}
# A refusal, with what a client controls: the path (decoded: newlines, quotes, ``=``, a
# Unicode line separator, a backslash, non-ASCII) and the unverified ID and issuer.
REFUSAL: dict[str, Any] = {
    **HIT,
    "path": '/x\n2026-12-01 INFO gateway.access: GET / 200 cache=hit "q"\u2028\\ é\x85',
    "status": 401,
    "upstream_ms": None,
    "cache": "-",
    "assertion_id": None,
    "issuer": None,
    "assertion_id_unverified": "_id with space=\x1b[31m",
    "issuer_unverified": "https://idp.test/saml",
    "reason": "audience",
    "detail": "audience: expected 'https://sp', found 'https://other'",
    "peer": None,
}

# Values the access line does not hold today, written as JsonFormatter would all the same.
ODD: dict[str, Any] = {
    **HIT,
    "reason": True,
    "duration_ms": float("inf"),
    "upstream_ms": float("nan"),
    "cache": ["hit", 2],
    "issuer": "\u00e9\U0001f600",
    "peer": 12345678901234567890,
}


def formatted(formatter: logging.Formatter, fields: dict[str, Any], worker: int | None) -> str:
    method, path, status = fields["method"], fields["path"], fields["status"]
    record = ACCESS.makeRecord(
        ACCESS.name,
        logging.INFO,
        __file__,
        1,
        "%s %s %d",
        (method, path, status),
        None,
        extra={"fields": fields},
    )
    if worker is not None:
        NameWorker(worker).filter(record)
    return formatter.format(record) + "\n"


@pytest.mark.parametrize("fields", [HIT, REFUSAL, ODD], ids=["hit", "refusal", "odd"])
@pytest.mark.parametrize("worker", [None, 2])
@pytest.mark.parametrize("now", [1764590000.0, 1764590000.9999, 1764593599.0421])
def test_direct_lines_equal_the_formatters(
    monkeypatch: pytest.MonkeyPatch, fields: dict[str, Any], worker: int | None, now: float
) -> None:
    monkeypatch.setattr(time, "time", lambda: now)  # the record and the direct line alike
    args = (fields["method"], fields["path"], fields["status"], fields, worker)
    assert json_access_line(*args) == formatted(JsonFormatter(), fields, worker)
    assert text_access_line(*args) == formatted(TextFormatter(), fields, worker)


def test_text_line_escapes_what_the_client_wrote() -> None:
    line = text_access_line("GET", REFUSAL["path"], 401, REFUSAL, None)
    assert line.count("\n") == 1 and line.endswith("\n")  # one line, whatever the path held
    assert "\u2028" not in line and "\x1b" not in line and "\x85" not in line
    assert 'assertion_id_unverified="_id with space=\\x1b[31m"' in line
    assert " peer=" not in line  # None fields are left out, as the formatter does


def _handler(stream: io.StringIO, **kwargs: Any) -> BufferedLines:
    handler = BufferedLines(stream, **kwargs)
    handler.setFormatter(JsonFormatter())
    return handler


def test_queued_lines_are_written_at_close_and_in_order() -> None:
    stream = io.StringIO()
    handler = _handler(stream, interval=3600, batch=10**6)  # no timer, no batch
    for n in range(5):
        handler.write_line(f"access {n}\n")
    record = logging.LogRecord("gateway", logging.WARNING, __file__, 1, "warn", None, None)
    handler.handle(record)  # an ordinary record is written at once, after what was queued
    written = stream.getvalue().splitlines()
    assert written[:5] == [f"access {n}" for n in range(5)]
    assert '"msg":"warn"' in written[5] and len(written) == 6
    handler.write_line("access 5\n")
    handler.close()
    assert stream.getvalue().splitlines()[6:] == ["access 5"]


def test_a_full_batch_and_an_idle_second_are_written_by_the_thread() -> None:
    stream = io.StringIO()
    handler = _handler(stream, interval=0.05, batch=3)
    try:
        for n in range(7):
            handler.write_line(f"access {n}\n")
        deadline = time.monotonic() + 10  # bounded wait for the writer thread
        while stream.getvalue().count("\n") < 7 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stream.getvalue().splitlines() == [f"access {n}" for n in range(7)]
    finally:
        handler.close()


def test_a_busy_writer_gathers_lines_instead_of_being_woken_for_each() -> None:
    stream = io.StringIO()
    handler = _handler(stream, interval=3600, batch=100, gather=3600)
    try:
        handler.write_line("access 0\n")  # into an idle writer: written at once
        deadline = time.monotonic() + 10  # bounded wait for the writer thread
        while not stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stream.getvalue() == "access 0\n"
        for n in range(1, 10):
            handler.write_line(f"access {n}\n")
        time.sleep(0.2)  # time enough for a writer woken per line to have written some
        assert stream.getvalue() == "access 0\n"  # the writer gathers: nothing yet
    finally:
        handler.close()  # ends the gathering: everything, in order
    assert stream.getvalue().splitlines() == [f"access {n}" for n in range(10)]


def test_a_full_batch_ends_the_gathering() -> None:
    stream = io.StringIO()
    handler = _handler(stream, interval=3600, batch=5, gather=3600)
    try:
        handler.write_line("access 0\n")
        deadline = time.monotonic() + 10  # bounded waits for the writer thread
        while not stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        for n in range(1, 6):  # a batch while the writer gathers: written without waiting
            handler.write_line(f"access {n}\n")
        while stream.getvalue().count("\n") < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stream.getvalue().splitlines() == [f"access {n}" for n in range(6)]
    finally:
        handler.close()


def test_past_the_limit_the_caller_writes_and_nothing_is_dropped() -> None:
    stream = io.StringIO()
    handler = _handler(stream, interval=3600, batch=3, limit=3)
    for n in range(4):
        handler.write_line(f"access {n}\n")
    # The third line waited for the stream: written when write_line returned.
    assert stream.getvalue().splitlines()[:3] == ["access 0", "access 1", "access 2"]
    handler.close()
    assert stream.getvalue().splitlines() == [f"access {n}" for n in range(4)]
