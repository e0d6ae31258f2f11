"""Fixtures for the RFC 7522 client: keys, key files, a fake AS on loopback, clients."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.config import AuthorizationServer
from gateway.devkit.authorization_server import FakeAuthorizationServer
from gateway.oauth.client import TokenClient

from .helpers import MakeClient, StartAs, pem_private


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def key_files(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> dict[str, Path]:
    files = {"RS256": tmp_path / "rsa.pem", "ES256": tmp_path / "ec.pem"}
    files["RS256"].write_bytes(pem_private(rsa_key))
    files["ES256"].write_bytes(pem_private(ec_key))
    return files


@pytest.fixture
async def start_as() -> AsyncIterator[StartAs]:
    servers: list[FakeAuthorizationServer] = []

    async def start(**kwargs: Any) -> FakeAuthorizationServer:
        server = FakeAuthorizationServer(**kwargs)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    clients: list[TokenClient] = []

    def make(servers: dict[str, AuthorizationServer], **kwargs: Any) -> TokenClient:
        client = TokenClient(servers, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()
