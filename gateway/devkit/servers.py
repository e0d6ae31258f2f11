"""Servers that tests and benchmarks run as child processes: a port, the wait, the stop.

Rules this module owns (standard library only: ``bench/`` loads the test runners by path):
- A server is ready when it answers, not when it has been started: ``wait_ready`` probes
  each awaited item (a port, a URL) in turn, within a deadline.
- A server that exits while starting, or does not answer in time, is a ``RuntimeError``
  that carries what the server wrote; one that is late is stopped first, so nothing is
  left running.
- Stopping is SIGTERM (the server's own clean shutdown), then a kill past the timeout.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

_Item = TypeVar("_Item")


class ChildServer(Protocol):
    """What ``wait_ready`` needs of a server being started."""

    @property
    def proc(self) -> subprocess.Popen[bytes]: ...

    def output(self) -> str:
        """What the server wrote so far (its log), for the error message."""
        ...

    def stop(self) -> None: ...


def free_port() -> int:
    """A loopback TCP port the OS had free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def accepts(port: int) -> bool:
    """Whether something accepts TCP connections on the loopback ``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_ready(
    server: ChildServer,
    pending: Iterable[_Item],
    answers: Callable[[_Item], bool],
    *,
    name: str,
    what: str,
    timeout: float,
    pause: float = 0.02,
) -> None:
    """Wait until ``answers(item)`` for every item of ``pending``, in order.

    ``name`` and ``what`` make the message (``nginx did not listen on [8080]``).
    """
    waiting = list(pending)
    deadline = time.monotonic() + timeout
    while waiting:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {server.proc.returncode}:\n{server.output()}")
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"{name} did not {what} {waiting}:\n{server.output()}")
        if answers(waiting[0]):
            waiting.pop(0)
        else:
            time.sleep(pause)


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, and a kill if ``proc`` has not gone within ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
