"""Run a real Tomcat (Debian's ``tomcat10``) for tests: a private CATALINA_BASE, one HTTP
connector on a loopback port, no shutdown port, static webapps only.

Tomcat is the reference for a liberal upstream: it drops ``;parameters`` from every path
segment, merges ``//`` and resolves ``..`` after both. Its access log records, per request,
the request line, the status, the bytes sent and the ``Authorization`` header it received,
so a test can tell which token reached which file.

Standard library and ``gateway.devkit.servers`` only, like ``tests/forward_auth/nginx_runner.py``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from gateway.devkit.servers import free_port, stop_process, wait_ready

CATALINA_HOME = Path("/usr/share/tomcat10")  # Debian's tomcat10 package
# One line per request: the request line as received, status, bytes, the Authorization it got.
ACCESS_PATTERN = "%r %s %B [%{Authorization}i]"

_SERVER_XML = """<?xml version="1.0" encoding="UTF-8"?>
<Server port="-1" shutdown="SHUTDOWN">
  <Service name="Catalina">
    <Connector port="{port}" address="127.0.0.1" protocol="HTTP/1.1"
               connectionTimeout="10000" maxKeepAliveRequests="-1"/>
    <Engine name="Catalina" defaultHost="localhost">
      <Host name="localhost" appBase="webapps" unpackWARs="false" autoDeploy="false">
        <Valve className="org.apache.catalina.valves.AccessLogValve" directory="logs"
               prefix="access" suffix=".log" rotatable="false" buffered="false"
               pattern="{pattern}"/>
      </Host>
    </Engine>
  </Service>
</Server>
"""


def tomcat_available() -> str | None:
    """Why Tomcat cannot run here, or None when it can."""
    if not (CATALINA_HOME / "bin" / "catalina.sh").is_file():
        return "Tomcat is not installed (Debian: apt-get install tomcat10; make system-deps)"
    if shutil.which("java") is None:
        return "no java on PATH (Debian's tomcat10 depends on a JRE)"
    return None


@dataclass
class Tomcat:
    proc: subprocess.Popen[bytes]
    base: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def access_lines(self) -> list[str]:
        log = self.base / "logs" / "access.log"
        return log.read_text().splitlines() if log.exists() else []

    def output(self) -> str:
        out = self.base / "logs" / "console.log"
        return out.read_text(errors="replace") if out.exists() else ""

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM runs the JVM's shutdown hook (Tomcat stops cleanly); kill past ``timeout``."""
        stop_process(self.proc, timeout)


def start_tomcat(
    base: Path, webapps: Mapping[str, Mapping[str, bytes]], *, startup_timeout: float = 90
) -> Tomcat:
    """Start Tomcat in ``base`` serving ``webapps`` (context name → relative path → bytes)
    and wait until each context answers (deploying happens after the port opens)."""
    for folder in ("conf", "logs", "temp", "work", "webapps"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    # The container-wide web.xml declares the DefaultServlet that serves static files.
    shutil.copy(CATALINA_HOME / "etc" / "web.xml", base / "conf" / "web.xml")
    shutil.copy(CATALINA_HOME / "etc" / "logging.properties", base / "conf" / "logging.properties")
    port = free_port()
    (base / "conf" / "server.xml").write_text(
        _SERVER_XML.format(port=port, pattern=ACCESS_PATTERN.replace('"', "&quot;"))
    )
    for context, files in webapps.items():
        for relative, content in files.items():
            target = base / "webapps" / context / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
    env = {
        **os.environ,
        "CATALINA_HOME": str(CATALINA_HOME),
        "CATALINA_BASE": str(base),
        "CATALINA_TMPDIR": str(base / "temp"),
        "CATALINA_PID": str(base / "temp" / "tomcat.pid"),
        # A small heap and no JIT tiers beyond C1: the test machine is shared.
        "JAVA_OPTS": "-Djava.awt.headless=true -Xms32m -Xmx128m -XX:TieredStopAtLevel=1",
    }
    with (base / "logs" / "console.log").open("wb") as console:
        proc = subprocess.Popen(
            [str(CATALINA_HOME / "bin" / "catalina.sh"), "run"],
            env=env,
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    tomcat = Tomcat(proc, base, port)
    probes = [f"/{context}/{next(iter(files))}" for context, files in webapps.items()]
    serves = partial(_serves, port)
    wait_ready(
        tomcat, probes, serves, name="Tomcat", what="serve", timeout=startup_timeout, pause=0.2
    )
    return tomcat


def _serves(port: int, path: str) -> bool:
    return _status(port, path) == 200


def _status(port: int, path: str) -> int | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
            )
            head = sock.recv(64)
    except OSError:
        return None
    parts = head.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
