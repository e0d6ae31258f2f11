"""Shared machinery for fault, bad-input and secret tests against a real gateway process.

- ``Backstage``: an event loop in a thread that runs the fake authorization server, the
  upstream and raw misbehaving servers, so one gateway process and its counterparts can be
  shared by every test of a module (module-scoped, synchronous fixtures) while tests still
  use their own event loop or plain sockets.
- ``RawUpstream``: a tiny asyncio TCP server that speaks just enough HTTP/1.1 to misbehave
  on purpose (hang, reset before or during the answer, malformed status line).
- ``open_sockets``: the gateway process's open sockets, from ``/proc/PID/fd``, to prove
  that no connection leaks.
- ``raw_exchange``: raw bytes to a port, the answer back, for requests no client library
  would send.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from integration.helpers import (
    AUDIENCE,
    CLIENT_ID,
    CLIENT_SECRET,
    ISSUER,
    Process,
    free_port,
    gateway_yaml,
    spawn_gateway,
)

from gateway.devkit.authorization_server import FakeAuthorizationServer
from gateway.devkit.idp import DemoIdP
from gateway.devkit.upstream import UpstreamApp

__all__ = [
    "AUDIENCE",
    "CLIENT_ID",
    "CLIENT_SECRET",
    "ISSUER",
    "SLACK",
    "Backstage",
    "Gateway",
    "RawUpstream",
    "free_port",
    "gateway_yaml",
    "open_sockets",
    "raw_exchange",
    "settle_sockets",
    "spawn_gateway",
    "status_of",
]

T = TypeVar("T")

# Added to every bound derived from a configured timeout: the machine has two cores shared
# with other test runs, so a bound is about catching hangs, not about speed.
SLACK = 6.0
# Pooled keep-alive connections (towards the AS and the upstream) may legitimately stay.
SOCKET_SLACK = 4


class Backstage:
    """An event loop in a daemon thread; ``run()`` executes a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 30) -> T:
        async def wrapper() -> T:
            return fn()

        return self.run(wrapper(), timeout)

    def close(self) -> None:
        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(cancel_rest(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


# --- a misbehaving upstream ------------------------------------------------------------------


@dataclass
class RawUpstream:
    """An HTTP/1.1 upstream whose behaviour is chosen by the first path segment:

    ``/ok``            a well-formed 200 with a small body (keep-alive)
    ``/hang``          reads the request, never answers (until the peer goes away)
    ``/reset-early``   reads the request, then resets the connection (RST, no answer)
    ``/reset-mid``     promises 100000 bytes, sends 1000, then resets the connection
    ``/malformed``     answers a status line that is not HTTP
    ``/bad-header``    answers a header line without a colon
    """

    port: int = 0
    connections: int = 0  # accepted so far
    open: int = 0  # currently open
    heads: list[bytes] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                    return
                self.heads.append(head)
                if not await self._answer(head, reader, writer):
                    return
        finally:
            self.open -= 1
            self._writers.discard(writer)
            if not writer.transport.is_closing():
                writer.close()

    async def _answer(
        self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; False when the connection is finished."""
        target = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"/"
        kind = target.split(b"/")[1] if target.count(b"/") >= 1 else b""
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        if length:
            await reader.readexactly(length)
        if kind == b"hang":
            await reader.read()  # until the gateway gives up and closes
            return False
        if kind == b"reset-early":
            _reset(writer)
            return False
        if kind == b"reset-mid":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
            await writer.drain()
            await asyncio.sleep(0.1)  # let the head reach the gateway before the reset
            _reset(writer)
            return False
        if kind == b"malformed":
            writer.write(b"HTTP/1.1 2x0 What\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return False
        if kind == b"bad-header":
            writer.write(b"HTTP/1.1 200 OK\r\nthis is not a header\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            return False
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        return True


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN: SO_LINGER with a zero timeout, then abort."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# --- the gateway process ---------------------------------------------------------------------


@dataclass
class Gateway:
    """A running gateway process and what tests need to talk to and about it."""

    process: Process
    config_path: Path

    @property
    def pid(self) -> int:
        return self.process.proc.pid

    @property
    def port(self) -> int:
        return self.process.port

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def admin(self) -> str:
        return self.process.admin

    def alive(self) -> bool:
        return self.process.proc.poll() is None

    def logs(self) -> str:
        return self.process.logs()

    @property
    def listening(self) -> set[int]:
        return {self.process.port, self.process.admin_port}

    def sockets(self) -> int:
        return open_sockets(self.pid)

    def assert_no_leak(self, baseline: int, pooled: int = SOCKET_SLACK) -> None:
        """Nothing left over from clients, nothing half-closed, and at most ``pooled``
        more sockets than ``baseline`` (idle keep-alive connections to the AS/upstream)."""
        report = settle(self.pid, self.listening, baseline + pooled)
        assert report.inbound == 0, report
        assert report.close_wait == 0, report
        assert report.total <= baseline + pooled, (report, baseline)

    def hup(self) -> None:
        os.kill(self.pid, signal.SIGHUP)

    def stop(self) -> None:
        proc = self.process.proc
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except Exception:
                proc.kill()
                proc.wait(timeout=10)

    @classmethod
    @contextlib.contextmanager
    def running(cls, config_path: Path, *args: str) -> Iterator[Gateway]:
        gateway = cls(spawn_gateway(config_path, *args), config_path)
        try:
            yield gateway
        finally:
            gateway.stop()


def header_for(raw: bytes) -> dict[str, str]:
    return {"X-SAML-Assertion": base64.b64encode(raw).decode()}


def issue(idp: DemoIdP, recipient: str, subject: str = "alice@example.test", **kw: Any) -> bytes:
    kw.setdefault("audience", AUDIENCE)
    kw.setdefault("now", datetime.now(UTC))
    return idp.issue(subject, recipient=recipient, **kw)


@dataclass
class Parts:
    """The fake authorization server and the upstream, running on a ``Backstage``."""

    backstage: Backstage
    auth: FakeAuthorizationServer
    upstream: UpstreamApp
    upstream_url: str

    @classmethod
    def start(cls, backstage: Backstage, **auth_options: Any) -> Parts:
        auth = FakeAuthorizationServer(
            client_id=CLIENT_ID, client_secret=CLIENT_SECRET, **auth_options
        )
        backstage.run(auth.start())
        upstream = UpstreamApp()
        url = backstage.run(upstream.start())
        return cls(backstage, auth, upstream, url)

    def stop(self) -> None:
        self.backstage.run(self.upstream.stop())
        self.backstage.run(self.auth.stop())


# --- measuring the process -------------------------------------------------------------------


def open_sockets(pid: int) -> int:
    """How many sockets process ``pid`` holds open (listeners included)."""
    count = 0
    folder = f"/proc/{pid}/fd"
    for name in os.listdir(folder):
        try:
            if os.readlink(f"{folder}/{name}").startswith("socket:"):
                count += 1
        except OSError:
            continue  # closed between listdir and readlink
    return count


def settle_sockets(pid: int, at_most: int, timeout: float = 10.0) -> int:
    """Wait (bounded) until ``pid`` holds at most ``at_most`` sockets; the last count."""
    deadline = time.monotonic() + timeout
    count = open_sockets(pid)
    while count > at_most and time.monotonic() < deadline:
        time.sleep(0.1)
        count = open_sockets(pid)
    return count


_TCP_STATES = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN"}


@dataclass(frozen=True)
class TcpSocket:
    local_port: int
    remote_port: int
    state: str


def tcp_sockets(pid: int) -> list[TcpSocket]:
    """The TCP sockets process ``pid`` holds, from /proc/PID/fd joined with /proc/PID/net/tcp."""
    inodes: set[str] = set()
    folder = f"/proc/{pid}/fd"
    for name in os.listdir(folder):
        try:
            link = os.readlink(f"{folder}/{name}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found: list[TcpSocket] = []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[9] in inodes:
                local = int(fields[1].rsplit(":", 1)[1], 16)
                remote = int(fields[2].rsplit(":", 1)[1], 16)
                found.append(TcpSocket(local, remote, _TCP_STATES.get(fields[3], fields[3])))
    return found


@dataclass(frozen=True)
class SocketReport:
    total: int  # every socket the process holds (TCP or not, listeners included)
    inbound: int  # connections accepted on the gateway's ports and still open
    close_wait: int  # connections the peer closed and the gateway did not: a leak

    def __str__(self) -> str:
        return f"total={self.total} inbound={self.inbound} close_wait={self.close_wait}"


def socket_report(pid: int, listening: set[int]) -> SocketReport:
    tcp = tcp_sockets(pid)
    inbound = sum(1 for s in tcp if s.local_port in listening and s.state != "LISTEN")
    close_wait = sum(1 for s in tcp if s.state == "CLOSE_WAIT")
    return SocketReport(open_sockets(pid), inbound, close_wait)


def settle(pid: int, listening: set[int], at_most: int, timeout: float = 10.0) -> SocketReport:
    """Wait (bounded) for no inbound connection, no CLOSE_WAIT and at most ``at_most``
    sockets in all; the last report either way (the caller asserts on it)."""
    deadline = time.monotonic() + timeout
    while True:
        report = socket_report(pid, listening)
        ok = report.inbound == 0 and report.close_wait == 0 and report.total <= at_most
        if ok or time.monotonic() >= deadline:
            return report
        time.sleep(0.1)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# --- raw HTTP --------------------------------------------------------------------------------


def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` as is, read until the server closes or ``timeout``; the bytes read."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass  # the server may refuse before reading everything; its answer still counts
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    """The status code of the first response in ``answer`` (0 when there is none)."""
    parts = answer.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        return 0
    try:
        return int(parts[1])
    except ValueError:
        return 0


def count_responses(answer: bytes) -> int:
    return answer.count(b"HTTP/1.1 ")


# --- talking to the gateway ------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float

    def json(self) -> Any:
        import json

        return json.loads(self.body)


def client_session(timeout: float = 60.0) -> Any:
    """An aiohttp session that keeps no idle connection to the gateway (they would count as
    the gateway's sockets) and gives up only long after any bound a test asserts."""
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True),
        timeout=aiohttp.ClientTimeout(total=timeout),
        auto_decompress=False,
    )


async def fetch(
    session: Any,
    url: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    data: Any = None,
) -> Answer:
    started = time.monotonic()
    async with session.request(method, url, headers=headers, data=data) as response:
        body = await response.read()
        return Answer(response.status, dict(response.headers), body, time.monotonic() - started)


def metric(text: str, name: str, **labels: str) -> float:
    """One sample from Prometheus text exposition (0.0 when absent)."""
    want = sorted(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        base, _, rest = key.partition("{")
        if base != name:
            continue
        got = sorted(p for p in rest.rstrip("}").split(",") if p)
        if got == want:
            return float(value)
    return 0.0


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture(scope="module")
def backstage() -> Iterator[Backstage]:
    stage = Backstage()
    yield stage
    stage.close()


@pytest.fixture(scope="module")
def idp() -> DemoIdP:
    return DemoIdP.generate(ISSUER)
