"""Run a real Caddy for tests: its own folder for state, loopback ports, no admin endpoint.

The caller gives a Caddyfile (``config/forward-auth/Caddyfile`` with its addresses replaced,
see ``nginx_runner.example``); ``caddy validate`` checks it, then ``caddy run`` serves it
until ``stop()``, with ``HOME`` and the XDG folders inside the prefix so nothing is written
elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from gateway.devkit.servers import accepts, stop_process, wait_ready


def caddy_binary() -> str | None:
    return shutil.which("caddy")


@dataclass
class Caddy:
    proc: subprocess.Popen[bytes]
    prefix: Path

    @property
    def log(self) -> Path:
        return self.prefix / "caddy.log"

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self, timeout: float = 10) -> None:
        """Graceful stop (SIGTERM); kill if Caddy has not gone within ``timeout``."""
        stop_process(self.proc, timeout)


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
    wait_ready(server, [port], accepts, name="caddy", what="listen on", timeout=startup_timeout)
    return server
