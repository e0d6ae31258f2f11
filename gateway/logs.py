"""Logging: JSON lines by default, plain text for humans.

Nothing here ever formats a token, an assertion, a secret or a key: callers log IDs,
issuers, reasons and durations only. ``extra={"fields": {...}}`` adds structured fields.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

ACCESS = logging.getLogger("gateway.access")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            line["exc_type"] = record.exc_info[0].__name__
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"), default=str)


# What could end a line or rewrite it on a terminal: C0 and C1 controls, DEL and the
# Unicode line separators; a backslash too, so that an escape in the output is always ours.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\\\\]")
_NEEDS_QUOTES = re.compile(r'[\s"=]')


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _escape(text: str) -> str:
    """``text`` on one line: control characters as ``\\xHH``, a backslash doubled."""
    return _UNSAFE.sub(_escape_char, text)


def _value(value: object) -> str:
    """A field value or message argument that cannot pass for another field: escaped, and
    quoted (logfmt style) when it holds a space, a quote or ``=``."""
    text = _escape(str(value))
    if not text or _NEEDS_QUOTES.search(text):
        return '"' + text.replace('"', '\\"') + '"'
    return text


class TextFormatter(logging.Formatter):
    """Human-readable lines. Request paths, headers and error messages are the client's
    words: escaped and quoted here, so that a client cannot write a line (``%0A`` in a path
    becomes a newline once decoded) or a field (``cache=hit``) of its own."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = self._message(record)
        record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            text += " " + " ".join(
                f"{_escape(str(k))}={_value(v)}" for k, v in fields.items() if v is not None
            )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            # A traceback keeps its lines, each indented: no line of it starts like a record.
            text += "".join(f"\n    {_escape(line)}" for line in record.exc_text.splitlines())
        return text

    @staticmethod
    def _message(record: logging.LogRecord) -> str:
        args = record.args
        if isinstance(args, tuple) and args:
            # Each argument escaped and, with a space in it (a path), quoted: one token.
            values = tuple(a if isinstance(a, int | float) else _value(a) for a in args)
            return _escape(str(record.msg)) % values
        return _escape(record.getMessage())


class QuietParseErrors(logging.Filter):
    """aiohttp logs a malformed request with the offending bytes quoted, and that line may
    be the assertion header: keep the peer and the error's kind, drop the quoted bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and type(exc).__module__ == "aiohttp.http_exceptions":
            record.msg = f"{record.getMessage()}: malformed request ({type(exc).__name__})"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


def setup_logging(fmt: str = "json", level: str = "info") -> None:
    # One access line per request: skip what our formatters never print (the caller's
    # frame, thread, process and multiprocessing names), as the logging docs advise.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # the documented switch for "no caller lookup"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's own access log duplicates ours (and would print raw request lines).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, QuietParseErrors) for f in server.filters):
        server.addFilter(QuietParseErrors())
    quiet_document_loggers()


# Libraries whose logs can quote what passes through them: below WARNING, signxml logs the
# canonicalized XML it verifies (NameID, attributes, conditions), aiohttp the bytes of a
# request it could not parse (a bad method line) and client-sent cookie names, urllib3 the
# URLs it fetches; redis and lxml are here so that no later use of theirs can. At WARNING
# and above they report their own failures (aiohttp.server's go through QuietParseErrors).
DOCUMENT_LOGGERS = ("signxml", "lxml", "aiohttp", "redis", "urllib3")


def quiet_document_loggers() -> None:
    """Keep ``DOCUMENT_LOGGERS`` at WARNING or above, whatever the gateway's own level.

    Only the root level follows ``--log-level``: at ``debug`` the gateway's loggers speak,
    these libraries do not. A quieter root (``error``) quiets them too.
    """
    floor = max(logging.getLogger().level, logging.WARNING)
    for name in DOCUMENT_LOGGERS:
        logging.getLogger(name).setLevel(floor)
