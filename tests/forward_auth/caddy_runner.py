"""Run a real Caddy for tests: its own folder for state, loopback ports, no admin endpoint.

The caller gives a Caddyfile (``config/forward-auth/Caddyfile`` with its addresses replaced,
see ``nginx_runner.example``); ``caddy validate`` checks it, then ``caddy run`` serves it
until ``stop()``, with ``HOME`` and the XDG folders inside the prefix so nothing is written
elsewhere.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def caddy_binary() -> str | None:
    return shutil.which("caddy")


@dataclass
class Caddy:
    proc: subprocess.Popen[bytes]
    prefix: Path

    @property
    def log(self) -> Path:
        return self.prefix / "caddy.log"

    def errors(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self, timeout: float = 10) -> None:
        """Graceful stop (SIGTERM); kill if Caddy has not gone within ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)


def start_caddy(prefix: Path, caddyfile: str, port: int, *, startup_timeout: float = 10) -> Caddy:
    binary = caddy_binary()
    if binary is None:
        raise RuntimeError("caddy is not installed (Debian: apt-get install caddy)")
    prefix.mkdir(parents=True, exist_ok=True)
    config = prefix / "Caddyfile"
    config.write_text(caddyfile)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(prefix),
        "XDG_CONFIG_HOME": str(prefix / "config"),
        "XDG_DATA_HOME": str(prefix / "data"),
    }
    base = [binary, "--adapter", "caddyfile", "--config", str(config)]
    check = subprocess.run(
        [binary, "validate", *base[1:]], capture_output=True, text=True, timeout=30, env=env
    )
    if check.returncode != 0:
        raise RuntimeError(f"caddy validate refused the configuration:\n{check.stderr}")
    log = (prefix / "caddy.log").open("wb")
    proc = subprocess.Popen(
        [binary, "run", *base[1:]], stdout=log, stderr=subprocess.STDOUT, env=env
    )
    log.close()
    server = Caddy(proc, prefix)
    deadline = time.monotonic() + startup_timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"caddy exited with {proc.returncode}:\n{server.errors()}")
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"caddy did not listen on {port}:\n{server.errors()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return server
        except OSError:
            time.sleep(0.02)
