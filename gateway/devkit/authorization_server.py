"""A fake authorization server on loopback, for tests and ``saml-gateway demo``.

It speaks the grants it is told to (``grant_types``): RFC 7522's SAML 2.0 bearer grant,
Entra ID's SAML 1.1 bearer grant, RFC 8693 token exchange with a SAML subject token. It
checks what a real token endpoint checks: the grant type, that the assertion's version is
the one the grant names, the assertion's encoding (base64url without padding where RFC 7522
and RFC 8693 §3 say base64url), for a token exchange a present ``subject_token`` of the
right ``subject_token_type`` and a known ``requested_token_type``, client authentication
(each of the four methods, and never two at once), optionally that an assertion ID is used
once and that the audience asked for is one it serves (else ``invalid_target``).

Its ``mode`` makes it misbehave on purpose: answer an OAuth error, fail with 500, hang,
answer slowly, answer garbage or an HTML page, rate-limit.

It reads the assertion's root ``ID`` with a regular expression on the decoded bytes on
purpose: it is a fake, and only ``gateway.saml.xml`` parses XML in this code base.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import secrets
import time
from collections.abc import Collection
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from gateway.config import (
    GRANT_TYPE_SAML1_BEARER,
    GRANT_TYPE_SAML2_BEARER,
    GRANT_TYPE_TOKEN_EXCHANGE,
    TOKEN_TYPE_ACCESS_TOKEN,
    TOKEN_TYPE_JWT,
    TOKEN_TYPE_SAML1,
    TOKEN_TYPE_SAML2,
)

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_PATH = "/oauth2/token"  # noqa: S105 - a URL path, not a password

MODES = frozenset(
    {
        "ok",
        "invalid_grant",
        "invalid_client",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "invalid_request",
        "server_error",
        "hang",
        "garbage",
        "html",
        "no_token",
        "oversized",
        "rate_limited",
        "temporarily_unavailable",
        "slow",
    }
)
_OAUTH_ERRORS = frozenset(
    {
        "invalid_grant",
        "invalid_client",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "invalid_request",
    }
)
_HANG_LIMIT = 60.0  # a hanging answer still ends, so no test can wait forever
_FIRST_TAG = re.compile(rb"<(?![?!])[^>]*>")
_ID_ATTRIBUTE = re.compile(rb"""\sID\s*=\s*["']([^"']*)["']""")
_SAML1_ID_ATTRIBUTE = re.compile(rb"""\sAssertionID\s*=\s*["']([^"']*)["']""")
_SAML1_VERSION = re.compile(rb"""\sMajorVersion\s*=\s*["']1["']""")
_REPEATABLE = frozenset({"resource", "audience"})  # RFC 8693 §2.1 allows several
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_B64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


class _Refused(Exception):
    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status, self.error, self.description = status, error, description


class FakeAuthorizationServer:
    def __init__(
        self,
        *,
        client_id: str | None = "gateway",
        client_secret: str | None = "s3cret",  # noqa: S107 - the fake's well-known test secret
        client_auth: str = "client_secret_basic",
        public_key_pem: bytes | None = None,
        expires_in: object = 3600,
        one_time_use: bool = False,
        assertion_encoding: str = "base64url",
        token_type: str = "Bearer",  # noqa: S107 - a token type, not a password
        retry_after: str | None = "7",
        grant_types: Collection[str] = (GRANT_TYPE_SAML2_BEARER,),
        audiences: Collection[str] | None = None,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.client_auth = client_auth
        self.public_key = (
            serialization.load_pem_public_key(public_key_pem) if public_key_pem else None
        )
        self.expires_in = expires_in  # None: the field is left out of the answer
        self.one_time_use = one_time_use
        self.assertion_encoding = assertion_encoding
        self.token_type = token_type
        self.retry_after = retry_after
        self.grant_types = frozenset(grant_types)
        self.audiences = audiences  # None: any RFC 8693 audience is served
        # A token exchange answers this issued_token_type (None: the one asked for; "": none).
        self.issued_token_type: str | None = None
        self.mode = "ok"
        self.delay = 0.0  # seconds, for mode "slow"
        self.fail_next = 0  # answer this many calls with 500, then recover
        self.calls = 0
        self.issued: list[str] = []
        self.assertion_ids: list[str] = []
        self.refusals: list[str] = []  # why requests were refused, newest last
        self.last_form: dict[str, str] = {}
        self.last_fields: list[tuple[str, str]] = []
        self.last_body = b""  # the token request's body as it arrived
        self.last_headers: dict[str, str] = {}
        self._used_ids: set[str] = set()
        self._used_jtis: set[str] = set()
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self.token_url = ""

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0: a free port); returns the token URL."""
        app = web.Application()
        app.router.add_post(TOKEN_PATH, self._token)
        self._stopping = asyncio.Event()
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0][1]
        self.token_url = f"http://{host}:{bound}{TOKEN_PATH}"
        return self.token_url

    async def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # --- the token endpoint --------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        self.last_headers = dict(request.headers)
        if self.fail_next > 0:
            self.fail_next -= 1
            return _error(500, "server_error", "failing on request")
        fault = await self._fault()
        if fault is not None:
            return fault
        try:
            form = await self._form(request)
            self._check_client(request, form)
            assertion_id, issued_type = self._check_grant(form)
        except _Refused as refused:
            self.refusals.append(f"{refused.error}: {refused.description}")
            return _error(refused.status, refused.error, refused.description)
        access_token = secrets.token_urlsafe(32)
        self.issued.append(access_token)
        self._used_ids.add(assertion_id)
        answer: dict[str, Any] = {"access_token": access_token, "token_type": self.token_type}
        if issued_type:
            answer["issued_token_type"] = issued_type
        if self.expires_in is not None:
            answer["expires_in"] = self.expires_in
        if "scope" in form:
            answer["scope"] = form["scope"]
        return web.json_response(answer, headers={"Cache-Control": "no-store"})

    async def _fault(self) -> web.StreamResponse | None:
        mode = self.mode
        if mode == "slow":
            if await self._pause(self.delay):
                return _error(503, "temporarily_unavailable", "stopping")
        elif mode == "hang":
            await self._pause(_HANG_LIMIT)
            return _error(500, "server_error", "hung")
        elif mode == "server_error":
            return _error(500, "server_error", "internal error")
        elif mode in _OAUTH_ERRORS:
            return _error(401 if mode == "invalid_client" else 400, mode, f"mode {mode}")
        elif mode == "rate_limited":
            return web.json_response(
                {"error": "slow_down"}, status=429, headers=self._retry_after_header()
            )
        elif mode == "temporarily_unavailable":
            return web.json_response(
                {"error": "temporarily_unavailable"}, status=503, headers=self._retry_after_header()
            )
        elif mode == "garbage":
            return web.Response(body=b"\x00{not json at all", content_type="application/json")
        elif mode == "html":
            return web.Response(text="<html><body>Sign in</body></html>", content_type="text/html")
        elif mode == "no_token":
            return web.json_response({"token_type": "Bearer", "expires_in": 3600})
        elif mode == "oversized":
            return web.json_response({"access_token": "x" * (2 << 20), "token_type": "Bearer"})
        return None

    async def _pause(self, seconds: float) -> bool:
        """Wait ``seconds``, or less if the server stops meanwhile (then True)."""
        if self._stopping is None:
            return True
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    def _retry_after_header(self) -> dict[str, str]:
        return {"Retry-After": self.retry_after} if self.retry_after is not None else {}

    async def _form(self, request: web.Request) -> dict[str, str]:
        if request.content_type != "application/x-www-form-urlencoded":
            raise _Refused(400, "invalid_request", f"content type {request.content_type}")
        self.last_body = await request.read()
        try:
            fields = parse_qsl(
                self.last_body.decode("ascii"), keep_blank_values=True, strict_parsing=True
            )
        except (UnicodeDecodeError, ValueError):
            raise _Refused(400, "invalid_request", "body is not a form") from None
        form: dict[str, str] = {}
        for key, value in fields:
            if key in form and key not in _REPEATABLE:
                raise _Refused(400, "invalid_request", f"field {key!r} repeated")
            form.setdefault(key, value)
        self.last_form = form
        self.last_fields = fields
        return form

    def _check_grant(self, form: dict[str, str]) -> tuple[str, str | None]:
        """The assertion's ID, and for a token exchange the issued_token_type to answer."""
        grant_type = form.get("grant_type")
        if grant_type not in self.grant_types:
            raise _Refused(400, "unsupported_grant_type", str(grant_type))
        if grant_type == GRANT_TYPE_TOKEN_EXCHANGE:
            return self._check_token_exchange(form)
        raw = self._decode(form.get("assertion", ""), self.assertion_encoding, "invalid_grant")
        saml1 = grant_type == GRANT_TYPE_SAML1_BEARER
        # Entra ID takes only AD FS's SAML 1.1 on its grant; RFC 7522 is SAML 2.0 only.
        if self._is_saml1(raw) != saml1:
            wanted = "1.1" if saml1 else "2.0"
            raise _Refused(400, "invalid_grant", f"assertion is not SAML {wanted}")
        return self._use(raw, saml1, "invalid_grant"), None

    def _check_token_exchange(self, form: dict[str, str]) -> tuple[str, str]:
        # RFC 8693 §2.2.2: a missing or unacceptable subject_token is invalid_request.
        if "subject_token" not in form:
            raise _Refused(400, "invalid_request", "subject_token missing")
        token_type = form.get("subject_token_type")
        if token_type not in (TOKEN_TYPE_SAML2, TOKEN_TYPE_SAML1):
            raise _Refused(400, "invalid_request", f"subject_token_type {token_type!r}")
        raw = self._decode(form["subject_token"], "base64url", "invalid_request")
        saml1 = self._is_saml1(raw)
        if saml1 != (token_type == TOKEN_TYPE_SAML1):
            raise _Refused(400, "invalid_request", "subject_token is not of subject_token_type")
        requested = form.get("requested_token_type", TOKEN_TYPE_ACCESS_TOKEN)
        if requested not in (TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT):
            raise _Refused(400, "invalid_request", f"requested_token_type {requested!r}")
        audiences = [value for key, value in self.last_fields if key == "audience"]
        if self.audiences is not None and any(a not in self.audiences for a in audiences):
            raise _Refused(400, "invalid_target", "audience not served here")
        assertion_id = self._use(raw, saml1, "invalid_request")
        return assertion_id, requested if self.issued_token_type is None else self.issued_token_type

    def _decode(self, encoded: str, encoding: str, error: str) -> bytes:
        pattern = _B64URL if encoding == "base64url" else _B64
        if not pattern.fullmatch(encoded):
            # base64url here is RFC 7522's: no padding, no '+' or '/'.
            raise _Refused(400, error, f"assertion is not {encoding}")
        try:
            if encoding == "base64url":
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise _Refused(400, error, "assertion does not decode") from None

    @staticmethod
    def _is_saml1(raw: bytes) -> bool:
        tag = _FIRST_TAG.search(raw)
        return tag is not None and _SAML1_VERSION.search(tag.group(0)) is not None

    def _use(self, raw: bytes, saml1: bool, error: str) -> str:
        tag = _FIRST_TAG.search(raw)
        pattern = _SAML1_ID_ATTRIBUTE if saml1 else _ID_ATTRIBUTE
        found = pattern.search(tag.group(0)) if tag else None
        if found is None:
            raise _Refused(400, error, "assertion has no root ID")
        assertion_id = found.group(1).decode("utf-8", "replace")
        self.assertion_ids.append(assertion_id)
        if self.one_time_use and assertion_id in self._used_ids:
            raise _Refused(400, "invalid_grant", "assertion ID already used")
        return assertion_id

    # --- client authentication -----------------------------------------------------------

    def _check_client(self, request: web.Request, form: dict[str, str]) -> None:
        header = request.headers.get("Authorization")
        ways = [
            name
            for name, present in (
                ("Authorization header", header is not None),
                ("client_secret", "client_secret" in form),
                ("client_assertion", "client_assertion" in form),
            )
            if present
        ]
        if len(ways) > 1:
            raise _Refused(400, "invalid_request", "client authenticated more than one way")
        if self.client_auth == "client_secret_basic":
            self._check_basic(header, form)
        elif self.client_auth == "client_secret_post":
            if ways != ["client_secret"]:
                raise _Refused(401, "invalid_client", "expected client_secret_post")
            self._check_secret(form.get("client_id"), form["client_secret"])
        elif self.client_auth == "private_key_jwt":
            if ways != ["client_assertion"]:
                raise _Refused(401, "invalid_client", "expected private_key_jwt")
            self._check_jwt(form)
        else:
            if ways:
                raise _Refused(401, "invalid_client", "public client sent credentials")
            if self.client_id and form.get("client_id") != self.client_id:
                raise _Refused(401, "invalid_client", "unknown client_id")

    def _check_basic(self, header: str | None, form: dict[str, str]) -> None:
        if header is None or not header.startswith("Basic "):
            raise _Refused(401, "invalid_client", "expected client_secret_basic")
        try:
            decoded = base64.b64decode(header[6:], validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise _Refused(401, "invalid_client", "Basic credentials do not decode") from None
        user, sep, password = decoded.partition(":")
        if not sep:
            raise _Refused(401, "invalid_client", "Basic credentials without ':'")
        client_id = unquote_plus(user)
        if "client_id" in form and form["client_id"] != client_id:
            raise _Refused(400, "invalid_request", "client_id differs between header and body")
        self._check_secret(client_id, unquote_plus(password))

    def _check_secret(self, client_id: str | None, secret: str) -> None:
        if client_id != self.client_id or not secrets.compare_digest(
            secret.encode(), (self.client_secret or "").encode()
        ):
            raise _Refused(401, "invalid_client", "wrong client id or secret")

    def _check_jwt(self, form: dict[str, str]) -> None:
        if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
            raise _Refused(401, "invalid_client", "wrong client_assertion_type")
        parts = form["client_assertion"].split(".")
        if len(parts) != 3 or self.public_key is None:
            raise _Refused(401, "invalid_client", "malformed JWT or no public key")
        try:
            header = json.loads(_unb64url(parts[0]))
            claims = json.loads(_unb64url(parts[1]))
            signature = _unb64url(parts[2])
        except (ValueError, binascii.Error):
            raise _Refused(401, "invalid_client", "JWT does not decode") from None
        signed = f"{parts[0]}.{parts[1]}".encode("ascii")
        try:
            self._verify(header.get("alg"), signed, signature)
        except (InvalidSignature, ValueError):
            raise _Refused(401, "invalid_client", "JWT signature does not verify") from None
        now = time.time()
        client_id = self.client_id
        if claims.get("iss") != client_id or claims.get("sub") != client_id:
            raise _Refused(401, "invalid_client", "JWT iss/sub is not the client id")
        if "client_id" in form and form["client_id"] != client_id:
            raise _Refused(401, "invalid_client", "client_id differs from the JWT")
        if claims.get("aud") != self.token_url:
            raise _Refused(401, "invalid_client", "JWT aud is not the token URL")
        expires = claims.get("exp")
        if not isinstance(expires, int | float) or not now < expires <= now + 300:
            raise _Refused(401, "invalid_client", "JWT exp missing, past or too far")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or jti in self._used_jtis:
            raise _Refused(401, "invalid_client", "JWT jti missing or reused")
        self._used_jtis.add(jti)

    def _verify(self, algorithm: object, signed: bytes, signature: bytes) -> None:
        key = self.public_key
        if algorithm == "RS256" and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
        elif algorithm == "ES256" and isinstance(key, ec.EllipticCurvePublicKey):
            if len(signature) != 64:
                raise ValueError("ES256 signature must be 64 bytes")
            der = encode_dss_signature(
                int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            )
            key.verify(der, signed, ec.ECDSA(hashes.SHA256()))
        else:
            raise ValueError(f"algorithm {algorithm!r} does not fit the registered key")


def _unb64url(segment: str) -> bytes:
    if not _B64URL.fullmatch(segment):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _error(status: int, error: str, description: str) -> web.Response:
    headers = {"Cache-Control": "no-store"}
    if status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="fake-as"'
    return web.json_response(
        {"error": error, "error_description": description}, status=status, headers=headers
    )
