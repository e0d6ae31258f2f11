"""Secrets never leak: a broad run of traffic through a real gateway process logging at DEBUG,
then no token, no assertion (nor any 40-character slice of one's base64, nor its decoded
content: NameID, attribute values, the Issuer's and the Audience's elements as signed, any
saml: or ds: markup), no client secret, no client-authentication JWT and no private key may
appear in the logs, in /metrics or in any error response (body or headers).

Where a token is meant to go (the upstream's view, a forward-auth 200), it is not looked at.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from secrets import token_hex
from typing import Any

import aiohttp
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from faults.helpers import (
    AUDIENCE,
    CLIENT_ID,
    CLIENT_SECRET,
    ISSUER,
    Backstage,
    Gateway,
    Parts,
    free_port,
    gateway_yaml,
)

from gateway.devkit.authorization_server import FakeAuthorizationServer
from gateway.devkit.idp import DemoIdP

WINDOW = 40


@dataclass
class Secrets:
    assertions: list[bytes] = field(default_factory=list)  # decoded XML, as issued
    tokens: list[str] = field(default_factory=list)
    exact: list[str] = field(default_factory=list)  # secrets that must not appear at all


@dataclass
class Run:
    backstage: Backstage
    idp: DemoIdP
    parts: Parts
    jwt_as: FakeAuthorizationServer
    gateway: Gateway
    key_pem: bytes
    secrets: Secrets = field(default_factory=Secrets)
    exposed: list[str] = field(default_factory=list)  # error bodies and headers we were shown

    def assertion(self, recipient: str | None = None, **kw: Any) -> str:
        kw.setdefault("audience", AUDIENCE)
        kw.setdefault("now", datetime.now(UTC))
        # Distinctive content, so that finding it in a log can only mean it leaked.
        kw.setdefault("attributes", {"department": f"attr-{token_hex(8)}"})
        raw = self.idp.issue(
            kw.pop("subject", f"nameid-{token_hex(8)}@example.test"),
            recipient=recipient or self.parts.auth.token_url,
            **kw,
        )
        self.secrets.assertions.append(raw)
        return base64.b64encode(raw).decode()

    async def call(
        self,
        session: aiohttp.ClientSession,
        path: str,
        headers: dict[str, str] | None = None,
        *,
        token_expected: bool = False,
    ) -> int:
        async with session.get(self.gateway.url + path, headers=headers or {}) as response:
            body = await response.text(errors="replace")
            # Error answers, and forward-auth answers unless the token is their point.
            if response.status >= 400 or (path.startswith("/auth") and not token_expected):
                self.exposed.append(body)
                self.exposed.extend(f"{k}: {v}" for k, v in response.headers.items())
            return response.status


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    backstage = Backstage()
    idp = DemoIdP.generate(ISSUER)
    parts = Parts.start(backstage)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    jwt_as = FakeAuthorizationServer(
        client_id="gateway-jwt",
        client_secret=None,
        client_auth="private_key_jwt",
        public_key_pem=public_pem,
    )
    backstage.run(jwt_as.start())
    (tmp_path / "client-key.pem").write_bytes(key_pem)
    path = gateway_yaml(tmp_path, parts.auth.token_url, parts.upstream_url, idp)
    config = yaml.safe_load(path.read_text())
    config["authorization_servers"]["jwt"] = {
        "token_url": jwt_as.token_url,
        "client_id": "gateway-jwt",
        "client_auth": "private_key_jwt",
        "private_key_jwt": {"key_file": "client-key.pem"},
        "audience": AUDIENCE,
        "timeouts": {"connect": 1, "total": 2},
        "retries": {"attempts": 2, "backoff": 0.05, "max_backoff": 0.1, "deadline": 3},
    }
    base = dict(config["routes"][0])
    config["routes"] = [
        {
            **base,
            "name": "jwt",
            "path_prefix": "/jwt",
            "authorization_server": "jwt",
            "strip_prefix": True,
        },
        {
            **base,
            "name": "dead",
            "path_prefix": "/dead",
            "upstream": f"http://127.0.0.1:{free_port()}",
        },
        {
            **base,
            "name": "slow",
            "path_prefix": "/slow",
            "strip_prefix": True,
            "timeouts": {"read": 0.5},
        },
        base,
    ]
    config["forward_auth"] = {
        "enabled": True,
        "path": "/auth",
        "original_request_headers": {"uri": "X-Original-URI", "host": "Host"},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    with Gateway.running(path, "--log-level", "debug") as gateway:
        yield Run(backstage, idp, parts, jwt_as, gateway, key_pem)
    backstage.run(jwt_as.stop())
    parts.stop()
    backstage.close()


async def drive(run: Run) -> None:
    auth = run.parts.auth
    async with aiohttp.ClientSession() as session:
        # Hits and misses, through both client-authentication methods.
        main = {"X-SAML-Assertion": run.assertion(assertion_id="_known-id-0001")}
        for _ in range(3):
            assert await run.call(session, "/hello", main) == 200
        jwt = {"X-SAML-Assertion": run.assertion(recipient=run.jwt_as.token_url)}
        for _ in range(2):
            assert await run.call(session, "/jwt/hello", jwt) == 200
        scheme = {"Authorization": "SAML " + run.assertion()}
        assert await run.call(session, "/hello", scheme) == 200

        # Rejects: tampered, expired, wrong audience, replayed ID, not base64, missing.
        raw = bytearray(base64.b64decode(run.assertion()))
        raw[raw.find(b"nameid-")] ^= 0x20
        run.secrets.assertions.append(bytes(raw))
        tampered = {"X-SAML-Assertion": base64.b64encode(bytes(raw)).decode()}
        past = datetime.now(UTC) - timedelta(hours=2)
        rejects = [
            tampered,
            {"X-SAML-Assertion": run.assertion(now=past, lifetime=60)},
            {"X-SAML-Assertion": run.assertion(audience="https://other.test")},
            {
                "X-SAML-Assertion": run.assertion(
                    assertion_id="_known-id-0001", subject=f"eve-{token_hex(8)}@x.test"
                )
            },
            {"X-SAML-Assertion": "not*base64*" + run.assertion()[:200]},
            {},
        ]
        for headers in rejects:
            assert await run.call(session, "/hello", headers) in (400, 401)

        # The authorization server misbehaves in every way it can.
        for mode, status in [
            ("invalid_grant", 401),
            ("server_error", 502),
            ("invalid_client", 502),
            ("garbage", 502),
            ("html", 502),
            ("rate_limited", 503),
            ("no_token", 502),
        ]:
            auth.mode = mode
            headers = {"X-SAML-Assertion": run.assertion()}
            assert await run.call(session, "/hello", headers) == status, mode
        auth.mode = "ok"

        # Upstream failures, with a valid cached token in hand.
        assert await run.call(session, "/dead/x", main) == 502
        assert await run.call(session, "/slow/slow/3", main) == 504
        assert await run.call(session, "/unauthorized", main) == 401  # purges the token
        assert await run.call(session, "/hello", main) == 200  # exchanged afresh

        # Forward-auth: a grant (its token header is the point, so it is not inspected)
        # and refusals.
        grant = {**main, "X-Original-URI": "/hello"}
        assert await run.call(session, "/auth", grant, token_expected=True) == 200
        bad = {"X-SAML-Assertion": tampered["X-SAML-Assertion"], "X-Original-URI": "/x"}
        assert await run.call(session, "/auth", bad) == 401
        assert await run.call(session, "/auth", {"X-Original-URI": "/x"}) == 401

        # A malformed request whose offending line is the assertion header: aiohttp refuses
        # it before the gateway sees it, and its log line must not quote that line. (Its
        # 400 answer quotes it back to the sender: aiohttp's doing, see the report.)
        reader, writer = await asyncio.open_connection("127.0.0.1", run.gateway.port)
        value = run.assertion().encode()
        writer.write(b"GET / HTTP/1.1\r\nHost: gw\r\nX-SAML-Assertion: " + value[:99])
        writer.write(b"\x00" + value[99:] + b"\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.0 400")
        writer.close()

        async with session.get(run.gateway.admin + "/metrics") as response:
            run.exposed.append(await response.text())


def windows(text: str, size: int) -> set[str]:
    return {text[i : i + size] for i in range(max(0, len(text) - size + 1))}


# What an assertion says, as decoded XML: these texts are never logged in any form.
_CONTENT = (
    re.compile(rb"<saml:NameID[^>]*>([^<]+)<"),
    re.compile(rb"<saml:AttributeValue[^>]*>([^<]+)<"),
)
# Issuer and audience values may be logged as values (the access log names the issuer),
# never as the signed elements: ">value<" is how canonicalized XML shows them.
_SIGNED_ELEMENTS = (
    re.compile(rb"<saml:Issuer[^>]*>([^<]+)<"),
    re.compile(rb"<saml:Audience[^>]*>([^<]+)<"),
)
_MARKUP = ("<saml:", "<ds:", "<samlp:")


def decoded_content(raw: bytes) -> list[str]:
    """The texts of ``raw`` that must not appear in a log, as they would appear there."""
    texts = [m.decode() for pattern in _CONTENT for m in pattern.findall(raw)]
    texts += [f">{m.decode()}<" for pattern in _SIGNED_ELEMENTS for m in pattern.findall(raw)]
    return texts


def leaks(haystack: str, run: Run) -> list[str]:
    """Names of the secrets found in ``haystack``."""
    found: list[str] = []
    seen = windows(haystack, WINDOW)
    found.extend(f"XML markup {mark}" for mark in _MARKUP if mark in haystack)
    for i, raw in enumerate(run.secrets.assertions):
        found.extend(
            f"assertion {i} content {text[:16]}"
            for text in decoded_content(raw)
            if text in haystack
        )
        for name, encoded in (
            ("base64", base64.b64encode(raw).decode()),
            ("base64url", base64.urlsafe_b64encode(raw).decode().rstrip("=")),
        ):
            if windows(encoded, WINDOW) & seen:
                found.append(f"assertion {i} ({name})")
        for value in re.findall(rb"<ds:SignatureValue>([^<]+)<", raw):
            if value.decode().replace("\n", "")[:WINDOW] in haystack.replace("\\n", ""):
                found.append(f"assertion {i} signature value")
    for token in run.secrets.tokens:
        if token in haystack:
            found.append("an access token")
    for secret in run.secrets.exact:
        if secret in haystack:
            found.append(f"secret {secret[:6]}...")
    return found


async def test_no_secret_in_logs_metrics_or_error_answers(run: Run) -> None:
    await drive(run)
    await asyncio.sleep(0.3)  # let the last log lines reach the file
    secrets = run.secrets
    secrets.tokens = list(run.parts.auth.issued) + list(run.jwt_as.issued)
    basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    key_lines = [line for line in run.key_pem.decode().splitlines() if "-----" not in line]
    jwt = run.jwt_as.last_form.get("client_assertion", "")
    secrets.exact = [CLIENT_SECRET, basic, *key_lines, *jwt.split(".")[1:]]
    assert len(secrets.tokens) >= 4 and jwt, "the run did not exercise both token endpoints"
    # Every assertion sent has a NameID, an attribute value, an Issuer and an Audience to
    # look for.
    assert all(len(decoded_content(raw)) == 4 for raw in secrets.assertions)

    logs = run.gateway.logs()
    # The run was logged, at debug level, request by request.
    assert logs.count('"logger":"gateway.access"') >= 25
    assert '"reason":"replay"' in logs and '"reason":"signature"' in logs

    assert leaks(logs, run) == []
    for exposed in run.exposed:
        assert leaks(exposed, run) == [], exposed[:300]


_LOG_PROBE = """
import logging, sys
from gateway.logs import setup_logging
setup_logging("json", sys.argv[1])
for name in ("gateway", "signxml", "signxml.processor", "lxml", "aiohttp.client",
             "aiohttp.server", "aiohttp.internal", "aiohttp.web", "redis.connection", "urllib3"):
    for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR):
        logging.getLogger(name).log(level, "probe %s %s", name, logging.getLevelName(level))
"""


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error"])
def test_document_loggers_stay_at_warning_whatever_the_level(level: str) -> None:
    """What the real ``setup_logging`` lets through: the gateway's own loggers follow the
    level, the libraries that log document content never go below WARNING."""
    probe = subprocess.run(
        [sys.executable, "-c", _LOG_PROBE, level],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    printed = {
        (line["msg"].split()[1], line["level"])
        for line in map(json.loads, probe.stderr.split("\n")[:-1])
    }
    order = ["debug", "info", "warning", "error"]
    wanted = order[order.index(level) :]
    assert {lvl for name, lvl in printed if name == "gateway"} == set(wanted)
    floor = order[max(order.index(level), order.index("warning")) :]
    for name in (
        "signxml",
        "signxml.processor",
        "lxml",
        "aiohttp.client",
        "aiohttp.server",
        "aiohttp.internal",
        "aiohttp.web",
        "redis.connection",
        "urllib3",
    ):
        assert {lvl for n, lvl in printed if n == name} == set(floor), name
