"""Redis over TLS like a real client: a real ``redis-server`` with ``tls-port`` and its default
``tls-auth-clients yes``, a throwaway CA made here, and the gateway's own store on top.

What is checked is what the server saw (the entry is readable over the server's plain port)
and what the log says when the server is refused (its cause, not just an exception's name).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.cache.entry import CachedToken
from gateway.cache.redis import RedisTokenStore, connect_redis
from gateway.config import RedisSettings
from gateway.devkit.redis_server import RedisServer, free_port, redis_server_binary
from gateway.errors import ConfigError
from gateway.preflight import preflight

SEALING_KEY = "tls-test-secret-0123456789abcdef"


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path  # trusted by nobody here: "wrong CA"
    server_cert: Path  # names 127.0.0.1 only (so "localhost" is a wrong name)
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate from the other CA
    stranger_key: Path


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer: str,
    *,
    ca: bool = False,
    san_ip: str | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False
        )
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    if san_ip is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(san_ip))]), False
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("redis-pki")

    def cert(c: x509.Certificate, name: str) -> Path:
        (folder / name).write_bytes(c.public_bytes(serialization.Encoding.PEM))
        return folder / name

    def key(k: ec.EllipticCurvePrivateKey, name: str) -> Path:
        (folder / name).write_bytes(
            k.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return folder / name

    ca_key, other_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    server_key, client_key, stranger_key = (ec.generate_private_key(ec.SECP256R1()) for _ in "abc")
    return Pki(
        ca=cert(_issue("Redis Test CA", ca_key, ca_key, "Redis Test CA", ca=True), "ca.pem"),
        other_ca=cert(_issue("Other CA", other_key, other_key, "Other CA", ca=True), "other.pem"),
        server_cert=cert(
            _issue("redis", server_key, ca_key, "Redis Test CA", san_ip="127.0.0.1"), "server.pem"
        ),
        server_key=key(server_key, "server.key"),
        client_cert=cert(_issue("gateway", client_key, ca_key, "Redis Test CA"), "client.pem"),
        client_key=key(client_key, "client.key"),
        stranger_cert=cert(_issue("stranger", stranger_key, other_key, "Other CA"), "s.pem"),
        stranger_key=key(stranger_key, "s.key"),
    )


@dataclass(frozen=True)
class TlsRedis:
    server: RedisServer
    tls_port: int


@pytest.fixture
def tls_redis(tmp_path: Path, pki: Pki) -> Iterator[TlsRedis]:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (make system-deps)")
    tls_port = free_port()
    # The plain port stays open on loopback for the runner's readiness check and for the
    # test to look at what the store wrote; the store itself only gets the TLS port.
    server = RedisServer(
        tmp_path / "redis",
        extra_args=(
            "--tls-port", str(tls_port),
            "--tls-cert-file", str(pki.server_cert),
            "--tls-key-file", str(pki.server_key),
            "--tls-ca-cert-file", str(pki.ca),
            "--tls-auth-clients", "yes",
        ),
    )  # fmt: skip
    server.start()
    try:
        yield TlsRedis(server, tls_port)
    finally:
        server.kill()


def _settings(url: str, **tls: Any) -> RedisSettings:
    values: dict[str, Any] = {
        "url": url,
        "encryption_keys": {"k1": SEALING_KEY},
        "active_key": "k1",
        "timeout": 2.0,
    }
    values.update({k: str(v) for k, v in tls.items()})
    return RedisSettings.model_validate(values)


async def _store_roundtrip(settings: RedisSettings, entry: CachedToken) -> tuple[bool, bool]:
    """(healthy after a ping, whether the entry it stored came back)."""
    store = RedisTokenStore(settings)
    try:
        healthy = await store.ping()
        await store.put(entry)
        return healthy, (await store.get(entry.cache_key, entry.assertion_id)) == entry
    finally:
        await store.close()


async def test_mutual_tls_stores_and_reads_through_the_tls_port(
    tls_redis: TlsRedis, pki: Pki, entry_factory: Callable[[], CachedToken]
) -> None:
    settings = _settings(
        f"rediss://127.0.0.1:{tls_redis.tls_port}/0",
        ca_file=pki.ca,
        cert_file=pki.client_cert,
        key_file=pki.client_key,
    )
    assert await _store_roundtrip(settings, entry_factory()) == (True, True)
    raw = aioredis.Redis.from_url(tls_redis.server.url)
    try:
        # what reached the server: one sealed entry under the store's prefix
        keys = await raw.keys("samlgw:t:*")
        assert len(keys) == 1
        assert b"at-secret-value" not in await raw.get(keys[0])
    finally:
        await raw.aclose()


Refusal = Callable[[TlsRedis, Pki], RedisSettings]

# The cause as OpenSSL words it (Debian's redis-server 7 and Python's ssl module). In TLS
# 1.3 the server judges the client's certificate after the client's handshake is done, and
# then sends its alert and closes: a busy client may see the reset before the alert.
_RESET = "Connection reset by peer"
REFUSALS: dict[str, tuple[Refusal, tuple[str, ...]]] = {
    # tls-auth-clients yes: no certificate, no service (TLS 1.3 reports it on the first read)
    "no client certificate": (
        lambda r, p: _settings(f"rediss://127.0.0.1:{r.tls_port}/0", ca_file=p.ca),
        ("TLSV13_ALERT_CERTIFICATE_REQUIRED", _RESET),
    ),
    "wrong CA": (
        lambda r, p: _settings(
            f"rediss://127.0.0.1:{r.tls_port}/0",
            ca_file=p.other_ca,
            cert_file=p.client_cert,
            key_file=p.client_key,
        ),
        ("CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate in",),
    ),
    "wrong name": (
        lambda r, p: _settings(
            f"rediss://localhost:{r.tls_port}/0",
            ca_file=p.ca,
            cert_file=p.client_cert,
            key_file=p.client_key,
        ),
        ("Hostname mismatch, certificate is not valid for 'localhost'",),
    ),
    "client certificate from another CA": (
        lambda r, p: _settings(
            f"rediss://127.0.0.1:{r.tls_port}/0",
            ca_file=p.ca,
            cert_file=p.stranger_cert,
            key_file=p.stranger_key,
        ),
        ("TLSV1_ALERT_UNKNOWN_CA", _RESET),
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
async def test_refused_tls_is_down_and_logged_with_its_cause(
    case: str,
    tls_redis: TlsRedis,
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
    entry_factory: Callable[[], CachedToken],
) -> None:
    make_settings, causes = REFUSALS[case]
    caplog.set_level(logging.WARNING, logger="gateway.cache.redis")
    healthy, served = await _store_roundtrip(make_settings(tls_redis, pki), entry_factory())
    assert (healthy, served) == (False, False)
    down = [r.getMessage() for r in caplog.records if "redis store is down" in r.getMessage()]
    assert len(down) == 1, down
    assert any(cause in down[0] for cause in causes), down[0]
    raw = aioredis.Redis.from_url(tls_redis.server.url)
    try:
        assert await raw.keys("samlgw:*") == []  # nothing reached the server
    finally:
        await raw.aclose()


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://127.0.0.1:26379/mymaster",
        "redis+cluster://127.0.0.1:7000",
    ],
)
async def test_ca_and_client_certificate_mean_the_same_for_every_url_form(
    url: str, pki: Pki
) -> None:
    tls = {"ca_file": pki.ca, "cert_file": pki.client_cert, "key_file": pki.client_key}
    reference = connect_redis(_settings("rediss://127.0.0.1:6380/0", **tls))
    client = connect_redis(_settings(url, **tls))
    try:
        if url.startswith("redis+cluster"):
            node_kwargs = client.nodes_manager.connection_kwargs  # type: ignore[union-attr]
        else:
            node_kwargs = client.connection_pool.connection_kwargs  # type: ignore[union-attr]
        expected = reference.connection_pool.connection_kwargs  # type: ignore[union-attr]
        for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs"):
            assert node_kwargs[key] == expected[key], key
        assert node_kwargs["ssl_cert_reqs"] == "required"
        assert node_kwargs["ssl_check_hostname"] is expected["ssl_check_hostname"] is True
        assert node_kwargs["ssl_ca_certs"] == str(pki.ca)
        assert node_kwargs["ssl_certfile"] == str(pki.client_cert)
    finally:
        await client.aclose()
        await reference.aclose()


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"url": "redis://10.0.0.1:6379/0", "ca_file": "ca"}, "ca_file"),
        ({"url": "unix:///run/redis.sock", "cert_file": "crt", "key_file": "key"}, "cert_file"),
        ({"url": "rediss://10.0.0.1:6380/0", "cert_file": "crt"}, "key_file"),
        ({"url": "rediss://10.0.0.1:6380/0", "key_file": "key"}, "cert_file"),
    ],
)
def test_tls_settings_that_would_be_ignored_are_config_errors(
    values: dict[str, str], key: str, pki: Pki
) -> None:
    from gateway.config import parse_config

    files = {"ca": pki.ca, "crt": pki.client_cert, "key": pki.client_key}
    redis = {k: (str(files[v]) if k.endswith("_file") else v) for k, v in values.items()}
    redis.update({"encryption_keys": {"k1": SEALING_KEY}, "active_key": "k1"})
    with pytest.raises(ConfigError) as caught:
        parse_config({"cache": {"backend": "redis", "redis": redis}}, pki.ca.parent, "t.yaml")
    assert any(p.startswith(f"cache.redis.{key}:") for p in caught.value.problems), (
        caught.value.problems
    )


def _config_with_redis(folder: Path, redis: dict[str, Any]) -> Path:
    idp_pem = Path(__file__).resolve().parents[2] / "config" / "certs" / "example-idp.pem"
    data = {
        "identity_providers": {"idp": {"issuer": "https://idp", "certificates": [str(idp_pem)]}},
        "authorization_servers": {
            "as": {
                "token_url": "https://as.example.com/token",
                "client_id": "c",
                "client_secret": "s",
                "audience": "https://as.example.com",
            }
        },
        "routes": [
            {
                "upstream": "http://127.0.0.1:9",
                "identity_provider": "idp",
                "authorization_server": "as",
            }
        ],
        "cache": {
            "backend": "redis",
            "redis": {"encryption_keys": {"k1": SEALING_KEY}, "active_key": "k1", **redis},
        },
    }
    path = folder / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_preflight_loads_the_tls_files_as_the_client_will(tmp_path: Path, pki: Pki) -> None:
    url = "rediss://127.0.0.1:6380/0"
    good = {"url": url, "ca_file": str(pki.ca)}
    good |= {"cert_file": str(pki.client_cert), "key_file": str(pki.client_key)}
    assert preflight(_config_with_redis(tmp_path, good)).cache.redis is not None
    mismatched = dict(good, key_file=str(pki.stranger_key))  # another certificate's key
    not_a_ca = dict(good, ca_file=str(pki.client_key))
    for settings, key in ((mismatched, "cert_file"), (not_a_ca, "ca_file")):
        with pytest.raises(ConfigError) as caught:
            preflight(_config_with_redis(tmp_path, settings))
        [problem] = caught.value.problems
        assert problem.startswith(f"cache.redis.{key}: "), problem
        assert "PRIVATE KEY" not in problem  # names the file's fault, never its content
