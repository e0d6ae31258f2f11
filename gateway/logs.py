"""Logging: JSON lines by default, plain text for humans.

Nothing here ever formats a token, an assertion, a secret or a key: callers log IDs,
issuers, reasons and durations only. ``extra={"fields": {...}}`` adds structured fields.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, TextIO

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
        worker = getattr(record, "worker", None)
        if worker is not None:
            text += f" worker={worker}"
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


class NameWorker(logging.Filter):
    """Stamps every line with the worker that wrote it (``workers: N``)."""

    def __init__(self, worker: int) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True


# The buffered handler writes what it holds at least this often, and at once when this many
# lines wait: a busy process makes one write per batch, an idle one still shows its lines.
FLUSH_SECONDS = 1.0
FLUSH_LINES = 256
# While lines keep coming, the writer gathers them this long between writes instead of
# being woken for each (a wake-up costs the event loop a lock hand-off and the GIL); after
# this many gathers in a row without a line it sleeps until the next one.
GATHER_SECONDS = 0.01
QUIET_GATHERS = 10
# Past this many waiting lines (the writer stuck on a full pipe), the writer waits for the
# stream, as an unbuffered handler would: memory stays bounded, and no line is dropped.
MAX_PENDING_LINES = 65536


class BufferedLines(logging.Handler):
    """The process's one log handler: whole lines queued in memory and written by a thread.

    Access lines (``write_line``) are queued and never wait for the stream: a thread writes
    them, all that queued up while it waited in one write, so a slow pipe or disk stalls that
    thread, not the event loop. An idle writer is woken by the first line; a busy one is
    never woken, it writes every ``GATHER_SECONDS`` until ``QUIET_GATHERS`` of them found
    nothing (a process descheduled for a moment, or between bursts, stays busy).
    Other records (startup, warnings, errors) are rare and may precede an exit: they are
    written at once, after what is queued, in order.
    ``close`` (run by ``logging.shutdown`` at exit, after a drain) writes whatever is left.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        interval: float = FLUSH_SECONDS,
        batch: int = FLUSH_LINES,
        limit: int = MAX_PENDING_LINES,
        gather: float = GATHER_SECONDS,
        worker: int | None = None,
    ) -> None:
        super().__init__()
        self.stream = stream
        self.worker = worker
        self._interval = interval
        self._batch = batch
        self._limit = limit
        self._gather = gather
        # The writer waits for a wake-up (nothing was queued when it last looked): the next
        # line wakes it. Read and written without a lock: a stale True costs one extra
        # wake-up, and the writer looks at the queue after setting it, so no line is missed.
        self._asleep = False
        self._pending: list[str] = []
        self._pending_lock = threading.Lock()  # the queue: held for an append or a swap
        self._write_lock = threading.Lock()  # one writer at a time keeps the lines in order
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def write_line(self, line: str) -> None:
        """Queue one finished line (newline included)."""
        with self._pending_lock:
            pending = self._pending
            pending.append(line)
            waiting = len(pending)
        # Only a sleeping writer is woken: an idle process's line is written as soon as the
        # event loop lets go of the GIL, a busy one's lines pile up while the writer gathers.
        if self._asleep or waiting >= self._batch:
            self._asleep = False
            self._wake.set()
            if waiting >= self._limit:
                self.flush()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        self.write_line(line)
        self.flush()

    def flush(self) -> None:
        self._write_pending()

    def _write_pending(self) -> bool:
        """Write what is queued; whether there was anything."""
        with self._write_lock:
            with self._pending_lock:
                lines, self._pending = self._pending, []
            if not lines:
                return False
            try:
                self.stream.write("".join(lines))
                self.stream.flush()
            except (OSError, ValueError):  # stderr closed or gone: nowhere left to write
                pass
            return True

    def _run(self) -> None:
        quiet = QUIET_GATHERS  # gathers in a row that found nothing: asleep at first
        while not self._closed:
            if quiet >= QUIET_GATHERS:
                self._asleep = True
                with self._pending_lock:
                    idle = not self._pending
                if idle:
                    self._wake.wait(self._interval)
                self._asleep = False
            else:  # busy: let the next lines gather (a full batch or close ends the wait)
                self._wake.wait(self._gather)
            self._wake.clear()
            quiet = 0 if self._write_pending() else quiet + 1

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.flush()
        super().close()


# The handler that ``setup_logging`` installed, when access lines may bypass ``logging``.
_sink: BufferedLines | None = None
_JSON = json.JSONEncoder(separators=(",", ":"), default=str)  # what JsonFormatter's dumps does


class _Clock:
    """The timestamp strings of the formatters, the per-second part made once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._utc = ""
        self._local = ""

    def stamps(self) -> tuple[str, str, int]:
        # As logging.LogRecord: created from time.time(), milliseconds truncated.
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._utc = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._local = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return self._utc, self._local, int((now - second) * 1000)


_clock = _Clock()


def json_access_line(
    method: str, path: str, status: int, fields: Mapping[str, object], worker: int | None
) -> str:
    """What ``JsonFormatter`` writes for ``ACCESS.info("%s %s %d", ...)``, built directly."""
    utc, _, ms = _clock.stamps()
    head = f'{{"ts":"{utc}.{ms:03d}Z","level":"info","logger":"gateway.access","msg":'
    head += _JSON.encode(f"{method} {path} {status}")
    if worker is not None:
        head += ',"worker":' + _JSON.encode(worker)
    body = _JSON.encode(fields)
    return head + ("," + body[1:] if fields else "}") + "\n"


def text_access_line(
    method: str, path: str, status: int, fields: Mapping[str, object], worker: int | None
) -> str:
    """What ``TextFormatter`` writes for ``ACCESS.info("%s %s %d", ...)``, built directly."""
    _, local, ms = _clock.stamps()
    text = f"{local},{ms:03d} INFO    gateway.access: {_value(method)} {_value(path)} {status}"
    if worker is not None:
        text += f" worker={worker}"
    if fields:
        # The keys are the gateway's own names; only the values can be the client's words.
        text += " " + " ".join(
            f"{k}={v}" if type(v) is int or type(v) is float else f"{k}={_value(v)}"
            for k, v in fields.items()
            if v is not None
        )
    return text + "\n"


def access(method: str, path: str, status: int, fields: Mapping[str, object]) -> None:
    """One access line. Through ``setup_logging``'s handler it is formatted here and queued;
    with any other handling in place (a test's capture, an embedding application) it is an
    ordinary record of ``ACCESS``, with the same message and ``fields``."""
    sink = _sink
    handlers = logging.root.handlers
    if sink is not None and len(handlers) == 1 and handlers[0] is sink and not ACCESS.handlers:
        line = (
            json_access_line if isinstance(sink.formatter, JsonFormatter) else text_access_line
        )(method, path, status, fields, sink.worker)
        sink.write_line(line)
    else:
        ACCESS.info("%s %s %d", method, path, status, extra={"fields": fields})


def setup_logging(fmt: str = "json", level: str = "info", *, worker: int | None = None) -> None:
    # One access line per request: skip what our formatters never print (the caller's
    # frame, thread, process and multiprocessing names), as the logging docs advise.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # the documented switch for "no caller lookup"
    global _sink
    handler = BufferedLines(sys.stderr, worker=worker)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    if worker is not None:
        handler.addFilter(NameWorker(worker))
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, BufferedLines):
            old.close()  # its lines written, its thread ended
    root.handlers[:] = [handler]
    _sink = handler
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
