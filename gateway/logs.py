"""Logging: JSON lines by default, plain text for humans.

Nothing here ever formats a token, an assertion, a secret or a key: callers log IDs,
issuers, reasons and durations only. ``extra={"fields": {...}}`` adds structured fields.
"""

from __future__ import annotations

import json
import logging
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
        worker = getattr(record, "worker", None)
        if worker is not None:
            line["worker"] = worker
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            line["exc_type"] = record.exc_info[0].__name__
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"), default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        worker = getattr(record, "worker", None)
        if worker is not None:
            text += f" worker={worker}"
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        return text


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


class NameWorker(logging.Filter):
    """Stamps every line with the worker that wrote it (``workers: N``)."""

    def __init__(self, worker: int) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True


def setup_logging(fmt: str = "json", level: str = "info", *, worker: int | None = None) -> None:
    # One access line per request: skip what our formatters never print (the caller's
    # frame, thread, process and multiprocessing names), as the logging docs advise.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # the documented switch for "no caller lookup"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    if worker is not None:
        handler.addFilter(NameWorker(worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's own access log duplicates ours (and would print raw request lines).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, QuietParseErrors) for f in server.filters):
        server.addFilter(QuietParseErrors())
