"""Two routes trusting two IdPs, in front of a real Tomcat and a real nginx.

- IdP A's assertions are exchanged at authorization server A, IdP B's at B; the fakes issue
  random tokens and remember them (``issued``), so a token in an upstream's access log says
  under which trust a request was let through.
- Routes: ``/echo/admin`` trusts B, ``/echo`` trusts A (both to the upstream under test:
  Tomcat or nginx); on nginx, Host ``api.test`` trusts B and any other host A (both with
  ``preserve_host``, so nginx picks the virtual host).
- Each upstream serves one static file per route: ``/echo/admin/secret.txt`` (B's) and
  ``/echo/public/x.txt`` (A's), and on nginx ``/api.txt`` on ``api.test`` (B's).
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import pytest
import yaml
from forward_auth.nginx_runner import Nginx, free_port, nginx_binary, start_nginx

# The integration suite's signing IdP, authorization server + upstream, and gateway processes.
from integration.helpers import idp, parts, processes  # noqa: F401 - re-exported as fixtures

from gateway.app import GatewayServer
from gateway.config import load_config
from gateway.devkit.authorization_server import FakeAuthorizationServer
from gateway.devkit.idp import DemoIdP

from .tomcat_runner import Tomcat, start_tomcat, tomcat_available

ADMIN_SECRET = b"admin secret: only for IdP B\n"
PUBLIC_FILE = b"public\n"
API_SECRET = b"api.test secret: only for IdP B\n"
SITE_FILE = b"site\n"
FILES = {"admin/secret.txt": ADMIN_SECRET, "public/x.txt": PUBLIC_FILE}


@dataclass
class Trust:
    """One identity provider and the authorization server its assertions are exchanged at."""

    name: str
    idp: DemoIdP
    auth: FakeAuthorizationServer
    audience: str

    def assertion(self) -> dict[str, str]:
        raw = self.idp.issue(
            f"user@{self.name}.test",
            audience=self.audience,
            recipient=self.auth.token_url,
            now=datetime.now(UTC),
        )
        return {"X-SAML-Assertion": base64.b64encode(raw).decode()}


@pytest.fixture(scope="session")
def idps() -> dict[str, DemoIdP]:
    return {name: DemoIdP.generate(f"https://idp-{name}.test/saml") for name in ("a", "b")}


@pytest.fixture
async def trusts(idps: dict[str, DemoIdP]) -> AsyncIterator[dict[str, Trust]]:
    started: dict[str, Trust] = {}
    for name, signer in idps.items():
        auth = FakeAuthorizationServer(
            client_id=f"gateway-{name}", client_secret=f"secret-{name}" * 4
        )
        await auth.start()
        started[name] = Trust(name, signer, auth, f"https://as-{name}.test/oauth2")
    yield started
    for trust in started.values():
        await trust.auth.stop()


@pytest.fixture(scope="session")
def tomcat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tomcat]:
    reason = tomcat_available()
    if reason is not None:
        pytest.skip(reason)
    server = start_tomcat(tmp_path_factory.mktemp("tomcat"), {"echo": FILES})
    yield server
    server.stop()


@dataclass
class NginxUpstream:
    server: Nginx
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def access_lines(self) -> list[str]:
        log = self.server.prefix / "logs" / "upstream.log"
        return log.read_text().splitlines() if log.exists() else []


@pytest.fixture(scope="session")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxUpstream]:
    if nginx_binary() is None:
        pytest.skip("nginx is not installed (make system-deps installs it)")
    prefix = tmp_path_factory.mktemp("nginx")
    for relative, content in FILES.items():
        target = prefix / "site" / "echo" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    (prefix / "api").mkdir()
    (prefix / "api" / "api.txt").write_bytes(API_SECRET)
    (prefix / "site" / "site.txt").write_bytes(SITE_FILE)
    port = free_port()
    log = prefix / "logs" / "upstream.log"
    # What nginx served, for which request line and virtual host, with which token.
    body = f"""
    log_format served '$request $status $server_name $request_filename [$http_authorization]';
    server {{
        listen 127.0.0.1:{port} default_server;
        server_name site;
        access_log {log} served;
        root {prefix / "site"};
    }}
    server {{
        listen 127.0.0.1:{port};
        server_name api.test;
        access_log {log} served;
        root {prefix / "api"};
    }}
    """
    server = start_nginx(prefix, body, [port])
    yield NginxUpstream(server, port)
    server.stop()


def gateway_config(
    folder: Path, trusts: dict[str, Trust], upstream: str, nginx: str, **admin_route: Any
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    providers: dict[str, Any] = {}
    servers: dict[str, Any] = {}
    for name, trust in trusts.items():
        trust.idp.write_certificate(folder / f"idp-{name}.pem")
        secret = folder / f"secret-{name}"
        secret.write_text(str(trust.auth.client_secret))
        os.chmod(secret, 0o600)
        providers[f"idp-{name}"] = {"issuer": trust.idp.issuer, "certificates": [f"idp-{name}.pem"]}
        servers[f"as-{name}"] = {
            "token_url": trust.auth.token_url,
            "client_id": trust.auth.client_id,
            "client_secret": f"${{file:secret-{name}}}",
            "audience": trust.audience,
            "timeouts": {"connect": 1, "total": 2},
            "retries": {"attempts": 1, "deadline": 2},
        }

    def route(name: str, prefix: str, trust: str, to: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "path_prefix": prefix,
            "upstream": to,
            "identity_provider": f"idp-{trust}",
            "authorization_server": f"as-{trust}",
            "timeouts": {"connect": 1, "read": 5, "total": 10},
            **extra,
        }

    config = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "lifecycle": {"shutdown_grace": 0, "drain_timeout": 5},
        "identity_providers": providers,
        "authorization_servers": servers,
        "routes": [
            route("admin", "/echo/admin", "b", upstream, **admin_route),
            route("echo", "/echo", "a", upstream),
            route("api", "/", "b", nginx, host="api.test", preserve_host=True),
            route("site", "/", "a", nginx, preserve_host=True),
        ],
    }
    path = folder / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class Answer:
    status: int
    body: bytes


@dataclass
class Stack:
    server: GatewayServer
    trusts: dict[str, Trust]

    async def get(self, target: str, headers: dict[str, str], host: str = "gw.test") -> Answer:
        """One request sent byte-exact (a client library would normalise the target)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        lines = [f"GET {target} HTTP/1.1", f"Host: {host}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        if b"transfer-encoding: chunked" in head.lower():
            body = _unchunk(body)
        return Answer(int(head.split()[1]), body)

    def issuer_of(self, token: str) -> str | None:
        """Which authorization server (so which IdP's trust) issued ``token``."""
        for name, trust in self.trusts.items():
            if token in trust.auth.issued:
                return name
        return None


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


BEARER = re.compile(r"\[Bearer ([^\]]+)\]")


class Upstream(Protocol):
    url: str

    def access_lines(self) -> list[str]: ...


async def settled_lines(upstream: Upstream) -> list[str]:
    """The upstream's access log once what came before is in it. Tomcat and nginx write a
    request's line only after its answer went out, so a client may read the answer first:
    a request of our own (a barrier) is sent straight to the upstream, and the log is read
    when its line is there (bounded wait)."""
    barrier = f"barrier-{secrets.token_hex(6)}"
    host, _, port = upstream.url.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET /echo/public/x.txt?probe={barrier} HTTP/1.1\r\nHost: site\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    await asyncio.wait_for(reader.read(), 10)
    writer.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        lines = upstream.access_lines()
        if any(f"probe={barrier}" in line for line in lines) or loop.time() > deadline:
            return lines
        await asyncio.sleep(0.02)


@pytest.fixture
async def start_stack(
    tmp_path: Path, trusts: dict[str, Trust], nginx: NginxUpstream
) -> AsyncIterator[Any]:
    servers: list[GatewayServer] = []

    async def start(upstream: str, **admin_route: Any) -> Stack:
        path = gateway_config(
            tmp_path / f"gw{len(servers)}", trusts, upstream, nginx.url, **admin_route
        )
        server = GatewayServer(load_config(path), config_path=path)
        await server.start()
        servers.append(server)
        return Stack(server, trusts)

    yield start
    for server in servers:
        await server.close()
