"""Run a real nginx for tests and benchmarks: own prefix folder, loopback ports, no daemon.

The caller gives the inside of ``http { }`` (for instance one of the examples under
``config/forward-auth/`` with its addresses replaced); this module wraps it in a complete
configuration whose every path (pid, logs, temp files) lies inside the prefix (an example's
``load_module`` and ``env`` lines move to the main context, where nginx requires them), starts
``nginx -p prefix -c nginx.conf -g 'daemon off;'`` and waits, within a deadline, until the
listening ports accept connections.

Standard library and ``gateway.devkit.servers`` only: ``bench/_harness.py`` loads this file
by path, so the benchmarks and the tests drive nginx the same way.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.devkit.servers import accepts, stop_process, wait_ready
from gateway.devkit.servers import free_port as free_port  # the tests' and bench's port picker

EXAMPLES = Path(__file__).resolve().parents[2] / "config" / "forward-auth"
_TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
_MAIN_CONTEXT = ("load_module ", "env ", "pcre_jit ")


def nginx_binary() -> str | None:
    """The nginx executable, or None; Debian puts it in /usr/sbin, often not on PATH."""
    found = shutil.which("nginx")
    if found:
        return found
    fallback = Path("/usr/sbin/nginx")
    return str(fallback) if fallback.is_file() and os.access(fallback, os.X_OK) else None


def example(name: str, replacements: Mapping[str, str]) -> str:
    """An example from ``config/forward-auth/`` with its addresses and paths replaced.

    Every key must occur in the file, so an edited example cannot silently escape the tests.
    """
    text = (EXAMPLES / name).read_text()
    for old, new in replacements.items():
        if old not in text:
            raise ValueError(f"{name}: expected {old!r} in the example")
        text = text.replace(old, new)
    return text


def load_modules(http_body: str) -> list[Path]:
    """The dynamic modules an example loads (its ``load_module`` lines), in order."""
    return [
        Path(line.split(None, 1)[1].rstrip().rstrip(";").strip())
        for line in http_body.splitlines()
        if line.startswith("load_module ")
    ]


def missing_modules(http_body: str) -> list[Path]:
    """Modules named by ``load_module`` that are not installed on this machine."""
    return [module for module in load_modules(http_body) if not module.is_file()]


def full_config(prefix: Path, http_body: str, *, workers: int = 1) -> str:
    """A complete nginx.conf around ``http_body``; every file nginx writes is under ``prefix``."""
    lines = http_body.splitlines()
    # nginx accepts load_module and env only in the main context, before the http block.
    main = "".join(f"{line}\n" for line in lines if line.startswith(_MAIN_CONTEXT))
    http_body = "\n".join(line for line in lines if not line.startswith(_MAIN_CONTEXT))
    # When the master runs as root its workers switch to "nobody", who could not enter a
    # private tmp folder; keep them as the current user instead (outside root, nginx
    # ignores the directive, so leave it out).
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
    temp = "".join(f"    {kind}_temp_path {prefix / 'temp' / kind};\n" for kind in _TEMP_KINDS)
    return (
        f"{main}"
        f"{user}"
        f"worker_processes {workers};\n"
        f"error_log {prefix / 'logs' / 'error.log'} warn;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        "    access_log off;\n"
        f"{temp}"
        f"{http_body}\n"
        "}\n"
    )


@dataclass
class Nginx:
    proc: subprocess.Popen[bytes]
    prefix: Path

    @property
    def error_log(self) -> Path:
        return self.prefix / "logs" / "error.log"

    def output(self) -> str:
        return self.error_log.read_text() if self.error_log.exists() else ""

    def stop(self, timeout: float = 10) -> None:
        """Fast shutdown (SIGTERM); kill if nginx has not gone within ``timeout``."""
        stop_process(self.proc, timeout)


def start_nginx(
    prefix: Path,
    http_body: str,
    ports: Iterable[int],
    *,
    workers: int = 1,
    startup_timeout: float = 10,
) -> Nginx:
    """Write the config, check it with ``nginx -t``, start nginx and wait for ``ports``."""
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("nginx is not installed (Debian: apt-get install nginx)")
    for folder in ("logs", "temp", "conf"):
        (prefix / folder).mkdir(parents=True, exist_ok=True)
    conf = prefix / "conf" / "nginx.conf"
    conf.write_text(full_config(prefix, http_body, workers=workers))
    pid = prefix / "logs" / "nginx.pid"
    base = [binary, "-p", str(prefix), "-e", str(prefix / "logs" / "error.log"), "-c", str(conf)]
    check = subprocess.run(
        [*base, "-t", "-q", "-g", f"pid {pid};"], capture_output=True, text=True, timeout=30
    )
    if check.returncode != 0:
        raise RuntimeError(f"nginx -t refused the configuration:\n{check.stderr}")
    proc = subprocess.Popen(
        [*base, "-g", f"daemon off; pid {pid};"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = Nginx(proc, prefix)
    wait_ready(server, ports, accepts, name="nginx", what="listen on", timeout=startup_timeout)
    return server
