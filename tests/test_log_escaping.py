"""The text log format keeps each record on its own line, whatever the request held (pure)."""

from __future__ import annotations

import logging
import sys

import pytest

from gateway.logs import TextFormatter


def _record(msg: str, args: tuple[object, ...], **fields: object) -> logging.LogRecord:
    record = logging.LogRecord("gateway.access", logging.INFO, __file__, 1, msg, args, None)
    record.fields = fields
    return record


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("/a\nb", "/a\\x0ab"),
        ("/a\r\nb", "/a\\x0d\\x0ab"),
        ("/a\x1b[2Jb", "/a\\x1b[2Jb"),  # a terminal escape
        ("/a\x85b", "/a\\x85b"),  # NEL
        ("/a\u2028b", "/a\\u2028b"),
        ("/a\\x0ab", "/a\\\\x0ab"),  # a literal backslash cannot pass for an escape
        ("/caf\u00e9", "/caf\u00e9"),  # printable text is left alone
    ],
)
def test_control_characters_are_escaped_in_message_and_fields(value: str, shown: str) -> None:
    line = TextFormatter().format(_record("%s %s %d", ("GET", value, 400), path=value))
    assert "\n" not in line and "\r" not in line
    assert line.endswith(f": GET {shown} 400 path={shown}")


def test_values_with_spaces_quotes_or_equals_are_quoted() -> None:
    value = '/x cache=hit "a"'
    line = TextFormatter().format(_record("%s %s %d", ("GET", value, 401), path=value, n=1))
    assert line.endswith(': GET "/x cache=hit \\"a\\"" 401 path="/x cache=hit \\"a\\"" n=1')


def test_a_traceback_follows_on_indented_lines() -> None:
    try:
        raise ValueError("bad\n2026-01-01 00:00:00,000 INFO forged")
    except ValueError:
        record = logging.LogRecord("g", logging.ERROR, __file__, 1, "oops", None, sys.exc_info())
    first, *rest = TextFormatter().format(record).split("\n")
    assert first.endswith("g: oops")
    assert rest and all(line.startswith("    ") for line in rest)
