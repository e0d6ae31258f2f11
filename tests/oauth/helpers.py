"""Helpers for the token client tests: assertion values, server settings, PEM keys, a form
poster and a recording token endpoint."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.config import AuthorizationServer
from gateway.devkit.authorization_server import FakeAuthorizationServer
from gateway.oauth.client import TokenClient
from gateway.saml.assertion import Assertion

StartAs = Callable[..., Awaitable[FakeAuthorizationServer]]
MakeClient = Callable[..., TokenClient]

_ids = itertools.count(1)


def assertion(assertion_id: str | None = None, *, nonce: str = "") -> Assertion:
    """An already-verified assertion value; the exchange only needs its bytes and ID."""
    assertion_id = assertion_id or f"_a{next(_ids):06d}"
    raw = (
        '<?xml version="1.0"?><saml:Assertion xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion"'
        f' ID="{assertion_id}" Version="2.0"><saml:Issuer>https://idp.test</saml:Issuer>'
        f"<saml:Subject><saml:NameID>alice{nonce}</saml:NameID></saml:Subject></saml:Assertion>"
    ).encode()
    return Assertion(
        id=assertion_id,
        issuer="https://idp.test",
        subject="alice",
        audiences=("https://as.test",),
        recipient="https://as.test/token",
        not_on_or_after=datetime.now(UTC) + timedelta(minutes=5),
        digest=hashlib.sha256(raw).digest(),
        raw=raw,
    )


def profile(token_url: str, **overrides: Any) -> AuthorizationServer:
    data: dict[str, Any] = {
        "token_url": token_url,
        "audience": "https://as.test",
        "client_id": "gateway",
        "client_secret": "s3cret",
        "retries": {"attempts": 3, "backoff": 0.01, "max_backoff": 0.05, "deadline": 5},
        "timeouts": {"connect": 1, "total": 2},
    }
    data.update(overrides)
    return AuthorizationServer.model_validate(data)


async def post_form(
    url: str, form: dict[str, str], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, object]]:
    """POST ``form`` as a client would; the status and the JSON answer."""
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=form, headers=headers or {}) as response:
            return response.status, json.loads(await response.read())


def pem_private(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def pem_public(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass
class Recorded:
    method: str
    path_and_query: str
    headers: dict[str, str]
    body: bytes


class RecordingTokenEndpoint:
    """Any path on loopback: keeps each request as it arrived, answers a Bearer token."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self._runner: web.AppRunner | None = None
        self.origin = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append(Recorded(request.method, request.path_qs, dict(request.headers), body))
        answer = {
            "access_token": f"vendor-token-{len(self.requests)}",
            "token_type": "Bearer",
            "expires_in": 600,
        }
        if b"grant-type%3Atoken-exchange" in body:
            # RFC 8693 §2.2.1: a token exchange answer says what it issued.
            answer["issued_token_type"] = "urn:ietf:params:oauth:token-type:access_token"
        return web.json_response(answer)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.origin = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
