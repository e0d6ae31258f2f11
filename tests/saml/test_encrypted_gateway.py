"""End to end through a real gateway process: an encrypted assertion reaches the authorization
server decrypted and signed, and refused ones never reach it at all."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
import yaml
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from gateway.devkit.authorization_server import FakeAuthorizationServer
from gateway.devkit.idp import DemoIdP, encrypt_assertion
from gateway.devkit.loopback import write_loopback_config
from gateway.devkit.upstream import UpstreamApp

ISSUER = "https://idp.test/saml"
AUDIENCE = "https://as.test/oauth2"
CLIENT_ID = "gateway"
CLIENT_SECRET = "encrypted-e2e-secret-0123456789abcdef"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def idp() -> DemoIdP:
    return DemoIdP.generate(ISSUER)


@pytest.fixture(scope="module")
def sp() -> DemoIdP:
    """The gateway's encryption key pair."""
    return DemoIdP.generate("https://gateway.test")


@pytest.fixture
async def auth() -> AsyncIterator[FakeAuthorizationServer]:
    server = FakeAuthorizationServer(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    app = UpstreamApp()
    yield await app.start()
    await app.stop()


@pytest.fixture
def gateway(
    tmp_path: Path, idp: DemoIdP, sp: DemoIdP, auth: FakeAuthorizationServer, upstream: str
) -> Iterator[tuple[str, Path]]:
    """``saml-gateway run`` as a process, the IdP given the gateway's decryption key."""
    key = tmp_path / "sp-decryption-key.pem"
    key.write_bytes(sp.private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    port, admin = _free_port(), _free_port()
    path = write_loopback_config(
        tmp_path,
        certificate_pem=idp.certificate_pem,
        issuer=ISSUER,
        token_url=auth.token_url,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        audience=AUDIENCE,
        upstream=upstream,
        port=port,
        admin_port=admin,
    )
    data = yaml.safe_load(path.read_text())
    data["identity_providers"]["idp"]["decryption_keys"] = ["${file:sp-decryption-key.pem}"]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    log = tmp_path / "gateway.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(path), "--log-format", "json"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ},
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited early:\n{log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", admin), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gateway did not start:\n{log.read_text()}") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _header(raw: bytes) -> dict[str, str]:
    return {"X-SAML-Assertion": base64.b64encode(raw).decode()}


def _sent_assertion(auth: FakeAuthorizationServer) -> bytes:
    encoded = auth.last_form["assertion"]
    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))


async def test_the_authorization_server_gets_the_decrypted_signed_assertion(
    gateway: tuple[str, Path], idp: DemoIdP, sp: DemoIdP, auth: FakeAuthorizationServer
) -> None:
    url, log = gateway
    inner = idp.issue(
        "alice@example.test", audience=AUDIENCE, recipient=auth.token_url, now=datetime.now(UTC)
    )
    raw = encrypt_assertion(inner, sp.certificate_pem)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/echo", headers=_header(raw)) as response:
            assert response.status == 200
            body = await response.json()
        # a second request with the same encrypted bytes is a cache hit: one exchange
        async with session.get(f"{url}/echo", headers=_header(raw)) as response:
            assert response.status == 200
    assert auth.calls == 1
    assert _sent_assertion(auth) == inner  # byte for byte what the IdP signed
    headers = {name.lower(): value for name, value in body["headers"]}
    assert headers["authorization"] == f"Bearer {auth.issued[0]}"
    assert "x-saml-assertion" not in headers
    text = log.read_text()
    assert "alice@example.test" not in text and "PRIVATE KEY" not in text


@pytest.mark.parametrize("refusal", ["wrong-key", "rsa-1_5", "cbc", "unsigned"])
async def test_refused_encrypted_assertions_never_reach_the_authorization_server(
    gateway: tuple[str, Path],
    idp: DemoIdP,
    sp: DemoIdP,
    auth: FakeAuthorizationServer,
    refusal: str,
) -> None:
    url, log = gateway
    now = datetime.now(UTC)
    if refusal == "unsigned":
        from lxml import etree

        unsigned = idp.build_assertion(
            "mallory@example.test",
            audience=AUDIENCE,
            recipient=auth.token_url,
            now=now,
            placeholder=False,
        )
        raw = encrypt_assertion(etree.tostring(unsigned), sp.certificate_pem)
        reason = "signature"
    else:
        inner = idp.issue(
            "mallory@example.test", audience=AUDIENCE, recipient=auth.token_url, now=now
        )
        certificate = (
            DemoIdP.generate("x").certificate_pem if refusal == "wrong-key" else sp.certificate_pem
        )
        options = {"rsa-1_5": {"transport": "rsa-1_5"}, "cbc": {"content": "aes256-cbc"}}
        raw = encrypt_assertion(inner, certificate, **options.get(refusal, {}))  # type: ignore[arg-type]
        reason = "decryption"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/echo", headers=_header(raw)) as response:
            assert response.status == 401
            answer = await response.json()
    assert answer["error_description"] == "the SAML assertion was not accepted"
    assert "request_id" in answer and reason not in str(answer)
    assert auth.calls == 0
    deadline = time.monotonic() + 10
    while f'"{reason}"' not in (text := log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)  # access lines are written from a thread, moments after the answer
    assert f'"{reason}"' in text
    assert "mallory" not in text
