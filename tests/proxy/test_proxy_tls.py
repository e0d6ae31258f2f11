"""Upstream TLS: a private CA bundle, a client certificate (mTLS), verification on by default.

A CA, a server certificate for 127.0.0.1 and a client certificate are made at test time.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.config import ProxySettings, UpstreamTls
from gateway.devkit.upstream import UpstreamApp
from gateway.errors import ConfigError
from gateway.proxy.forward import Forwarder
from gateway.proxy.tls import tls_context
from gateway.proxy.upstream import RoutePlans

from .helpers import StartGateway, make_route


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    *,
    ca: bool = False,
    san_ip: str | None = None,
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    if san_ip is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(san_ip))]), False
        )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue("Test CA", ca_key, ca_key, _name("Test CA"), ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _issue(
        "upstream",
        server_key,
        ca_key,
        ca_cert.subject,
        san_ip="127.0.0.1",
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = _issue(
        "gateway", client_key, ca_key, ca_cert.subject, usage=ExtendedKeyUsageOID.CLIENT_AUTH
    )

    def pem(cert: x509.Certificate, name: str) -> Path:
        path = folder / name
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    return Pki(
        ca=pem(ca_cert, "ca.pem"),
        server_cert=pem(server_cert, "server.pem"),
        server_key=_write_key(server_key, folder / "server.key"),
        client_cert=pem(client_cert, "client.pem"),
        client_key=_write_key(client_key, folder / "client.key"),
    )


@pytest.fixture
async def tls_upstream(pki: Pki) -> AsyncIterator[UpstreamApp]:
    """An upstream on TLS that demands a client certificate from our CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.verify_mode = ssl.CERT_REQUIRED
    app = UpstreamApp(ssl_context=context)
    await app.start()
    yield app
    await app.stop()


def mtls(pki: Pki, **settings: object) -> UpstreamTls:
    values: dict[str, object] = {
        "ca_file": str(pki.ca),
        "cert_file": str(pki.client_cert),
        "key_file": str(pki.client_key),
    }
    values.update(settings)
    return UpstreamTls.model_validate(values)


async def test_mtls_with_private_ca(
    pki: Pki,
    tls_upstream: UpstreamApp,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
) -> None:
    assert tls_upstream.base_url.startswith("https://127.0.0.1:")
    gw = await start_gateway([make_route(tls_upstream.base_url, tls=mtls(pki))])
    async with client.get(gw.url + "/echo/tls") as resp:
        assert resp.status == 200
        echo = await resp.json()
    assert echo["raw_path"] == "/echo/tls"
    assert ["Authorization", "Bearer tok-123"] in echo["headers"]


async def test_verification_is_on_by_default(
    tls_upstream: UpstreamApp, start_gateway: StartGateway, client: aiohttp.ClientSession
) -> None:
    # no CA bundle: the system store does not know the test CA, so the upstream is refused
    gw = await start_gateway([make_route(tls_upstream.base_url)])
    async with client.get(gw.url + "/hello") as resp:
        assert resp.status == 502
    assert gw.errors[-1].reason == "upstream_tls"
    assert tls_upstream.requests == 0


async def test_missing_client_certificate_is_502(
    pki: Pki,
    tls_upstream: UpstreamApp,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
) -> None:
    tls = UpstreamTls(ca_file=str(pki.ca))
    gw = await start_gateway([make_route(tls_upstream.base_url, tls=tls)])
    async with client.get(gw.url + "/hello") as resp:
        assert resp.status == 502
    assert tls_upstream.requests == 0


async def test_verify_off_still_presents_the_client_certificate(
    pki: Pki,
    tls_upstream: UpstreamApp,
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
) -> None:
    tls = mtls(pki, ca_file=None, verify=False)
    gw = await start_gateway([make_route(tls_upstream.base_url, tls=tls)])
    async with client.get(gw.url + "/hello") as resp:
        assert resp.status == 200


def test_one_context_per_distinct_tls_setting(pki: Pki) -> None:
    routes = [
        make_route("https://127.0.0.1:1", path_prefix="/a", tls=mtls(pki)),
        make_route("https://127.0.0.1:2", path_prefix="/b", tls=mtls(pki)),
        make_route("https://127.0.0.1:3", path_prefix="/c", tls=UpstreamTls(ca_file=str(pki.ca))),
        make_route("http://127.0.0.1:4", path_prefix="/d", tls=UpstreamTls(verify=False)),
    ]
    plans = RoutePlans(routes)
    contexts = {id(plans.plan(route).ssl) for route in routes[:3]}
    assert len(contexts) == 2


def test_unusable_tls_files_fail_at_startup(pki: Pki) -> None:
    # a certificate where the key should be: caught when the forwarder is built
    tls = UpstreamTls(cert_file=str(pki.client_cert), key_file=str(pki.ca))
    with pytest.raises(ConfigError, match=r"routes\[0\]\.tls"):
        Forwarder(ProxySettings(), [make_route("https://127.0.0.1:1", tls=tls)])
    with pytest.raises(ConfigError):
        tls_context(tls)
