"""A throwaway ``redis-server`` on a loopback port, for tests and benchmarks.

It runs with no persistence (``--save '' --appendonly no``) in a directory the caller owns,
and can be stopped, killed and restarted on the same port, so fault tests and later the
multi-replica gateway tests can drive a real server. Every wait is bounded.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

DEFAULT_BINARY = "redis-server"


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_server_binary() -> str | None:
    """The path of ``redis-server`` when installed (tests skip without it)."""
    return shutil.which(DEFAULT_BINARY) or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").is_file() else None
    )


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:port``; usable as a context manager."""

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        password: str | None = None,
        extra_args: tuple[str, ...] = (),
        config_file: Path | None = None,
        binary: str | None = None,
    ) -> None:
        found = binary or redis_server_binary()
        if found is None:
            raise FileNotFoundError("redis-server is not installed (see `make system-deps`)")
        self.binary = found
        self.directory = directory
        self.port = port or free_port()
        self.password = password
        self.extra_args = extra_args
        self.config_file = config_file  # first argument; e.g. a sentinel.conf (it is rewritten)
        self._process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, running={self.running})"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start (again, on the same port) and return once it answers PING."""
        if self.running:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            *((str(self.config_file),) if self.config_file else ()),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--logfile", "",
            *(("--requirepass", self.password) if self.password else ()),
            *self.extra_args,
        ]  # fmt: skip
        log = (self.directory / "redis.log").open("ab")
        try:
            # the binary and arguments come from the caller (tests, benches), never from a request
            self._process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
        finally:
            log.close()  # the child holds its own descriptor
        deadline = time.monotonic() + timeout
        while not self._answers_ping():
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited: see {self.directory / 'redis.log'}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down politely (SIGTERM), or kill if it does not go in time."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self.resume()  # a paused server would not see SIGTERM until continued
            self._process.terminate()
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout)
        self._process = None

    def kill(self, timeout: float = 10.0) -> None:
        """Die at once (SIGKILL), as a crashed server would: clients see reset connections."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout)
        self._process = None

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections stay open and nothing answers."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def restart(self, timeout: float = 10.0) -> None:
        self.stop(timeout)
        self.start(timeout)

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                if self.password:
                    sock.sendall(_command("AUTH", self.password))
                    if not sock.recv(64).startswith(b"+OK"):
                        return False
                sock.sendall(_command("PING"))
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


def _command(*parts: str) -> bytes:
    """One command in RESP, so readiness checks need no client library."""
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)
