"""The token request and response, as pure functions (no I/O, ``now`` passed in).

Rules this module owns:
- The request is a form POST of the server's grant:
  - ``saml2-bearer`` (RFC 7522) and ``saml1-bearer`` (Entra ID's
    ``urn:ietf:params:oauth:grant-type:saml1_1-bearer``, built the same way):
    ``grant_type``, ``assertion`` (base64url without padding by default, RFC 7522 §2.1;
    plain base64 when a server wants it), ``scope`` (space-delimited);
  - ``token-exchange`` (RFC 8693 §2.1): ``grant_type``, ``subject_token`` (the assertion,
    base64url without padding, §3), ``subject_token_type`` (``…:saml2`` or ``…:saml1``,
    from the assertion's version), then those of ``requested_token_type``, ``audience``,
    ``resource`` (once per URI) and ``scope`` that are configured;
  and after it the server's ``extra_params`` and exactly one way of client authentication
  (with Basic, ``client_id`` may also be in the form, ``client_id_in_body``: it names, not
  proves), and the server's static ``headers``.
- ``extra_params`` may not set a field this module owns (a grant's field or any
  credential): credentials are never sent two ways at once.
- A grant carries only the SAML versions it names (the config checks this per route; a
  request that would break it is refused before anything is sent).
- A response is a token only if it is a JSON object with a non-empty ``access_token`` that is
  safe to put in a header and a ``token_type`` of Bearer (any case). ``expires_in`` may be a
  number, a numeric string or missing (then the server's ``default_expires_in``). For a
  token exchange, ``issued_token_type`` (required, RFC 8693 §2.2.1) must be the type asked
  for (an access token when none was asked), and ``token_type`` ``N_A`` (not an access
  token) is refused: the gateway sends the token on as Bearer.
- Error answers map onto the gateway's errors: ``invalid_grant`` is the caller's assertion
  (401); a client or configuration problem is ours (502); rate limiting and
  ``temporarily_unavailable`` ask us to back off (503, ``Retry-After`` kept); 5xx is
  ``as_server_error``, the one reason the client retries. RFC 8693 §2.2.2 answers are
  RFC 6749 ones, plus ``invalid_target`` (the audience or resource we asked for: ours).
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from types import MappingProxyType
from typing import Any
from urllib.parse import urlencode

from gateway.config import (
    GRANT_SAML_VERSIONS,
    GRANT_TYPE_SAML1_BEARER,
    GRANT_TYPE_SAML2_BEARER,
    GRANT_TYPE_TOKEN_EXCHANGE,
    TOKEN_TYPE_ACCESS_TOKEN,
    TOKEN_TYPE_SAML1,
    TOKEN_TYPE_SAML2,
    AuthorizationServer,
)
from gateway.errors import ConfigError, InvalidAssertion, ServerFault, Unavailable, UpstreamError
from gateway.oauth.client_auth import (
    CLIENT_ASSERTION_TYPE,
    SigningKey,
    b64url,
    basic_authorization,
    client_assertion,
)
from gateway.values import Token

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"

# Fields the gateway sets itself; ``extra_params`` must not override them.
RESERVED_FIELDS = frozenset(
    {
        "grant_type",
        "assertion",
        "scope",
        "subject_token",
        "subject_token_type",
        "requested_token_type",
        "audience",
        "resource",
        "actor_token",
        "actor_token_type",
        "client_id",
        "client_secret",
        "client_assertion",
        "client_assertion_type",
    }
)

# OAuth error codes that mean our registration or configuration is wrong (RFC 6749 §5.2).
CLIENT_ERRORS = frozenset(
    {
        "invalid_client",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "invalid_request",
        "invalid_target",  # RFC 8693 §2.2.2: the audience or resource we asked for
    }
)

GRANT_TYPES = {
    "saml2-bearer": GRANT_TYPE_SAML2_BEARER,
    "saml1-bearer": GRANT_TYPE_SAML1_BEARER,
    "token-exchange": GRANT_TYPE_TOKEN_EXCHANGE,
}
SUBJECT_TOKEN_TYPES = {"2.0": TOKEN_TYPE_SAML2, "1.1": TOKEN_TYPE_SAML1}

# The reason the client retries on (with backoff, within the deadline).
SERVER_ERROR = "as_server_error"
BAD_RESPONSE = "as_bad_response"
TOO_LARGE = "as_response_too_large"
REJECTED = "as_rejected"
GRANT_MISMATCH = "as_grant_mismatch"

# RFC 6750 §2.1 allows a narrower alphabet, but real tokens (JWTs, opaque strings) stay within
# visible ASCII; anything else could split or forge a header when we forward it.
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")
_PRINTABLE = re.compile(r"[^\x20-\x7e]")


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """One token request, ready to send. Fields and headers carry secrets: never printed."""

    url: str
    fields: tuple[tuple[str, str], ...] = field(repr=False)
    headers: Mapping[str, str] = field(repr=False)

    @property
    def body(self) -> bytes:
        return urlencode(self.fields).encode("ascii")

    def value(self, name: str) -> str | None:
        """The value of one form field (None when absent); handy for checks and tests."""
        return next((value for key, value in self.fields if key == name), None)


def encode_assertion(raw: bytes, encoding: str) -> str:
    """The ``assertion`` form value: base64url without padding (RFC 7522 §2.1) or base64."""
    if encoding == "base64":
        return base64.b64encode(raw).decode("ascii")
    return b64url(raw)


def server_problems(name: str, server: AuthorizationServer) -> list[str]:
    """Problems with a server's settings that the config model cannot see on its own."""
    where = f"authorization_servers.{name}"
    problems = [
        f"{where}.extra_params.{key}: {key!r} is set by the gateway and cannot be overridden"
        for key in server.extra_params
        if key in RESERVED_FIELDS
    ]
    if server.client_auth != "private_key_jwt" and server.private_key_jwt is not None:
        problems.append(
            f"{where}.private_key_jwt: set, but client_auth is {server.client_auth!r}; "
            "credentials are sent one way only"
        )
    if server.client_auth in ("private_key_jwt", "none") and server.client_secret is not None:
        problems.append(
            f"{where}.client_secret: set, but client_auth is {server.client_auth!r}; "
            "credentials are sent one way only"
        )
    return problems


def grant_fields(
    server: AuthorizationServer, assertion: bytes, saml_version: str
) -> list[tuple[str, str]]:
    """The fields of ``server``'s grant for ``assertion``, a SAML ``saml_version`` document."""
    if saml_version not in GRANT_SAML_VERSIONS[server.grant]:
        # The config refuses such a route; this keeps a wrong call from reaching the server.
        raise UpstreamError(
            GRANT_MISMATCH, f"grant {server.grant} cannot carry a SAML {saml_version} assertion"
        )
    grant_type = GRANT_TYPES[server.grant]
    if server.grant != "token-exchange":
        fields = [
            ("grant_type", grant_type),
            ("assertion", encode_assertion(assertion, server.assertion_encoding)),
        ]
        if server.scope:
            fields.append(("scope", " ".join(server.scope)))
        return fields
    fields = [
        ("grant_type", grant_type),
        ("subject_token", b64url(assertion)),
        ("subject_token_type", SUBJECT_TOKEN_TYPES[saml_version]),
    ]
    settings = server.token_exchange
    if settings is not None:
        if settings.requested_token_type:
            fields.append(("requested_token_type", settings.requested_token_type))
        if settings.audience:
            fields.append(("audience", settings.audience))
        fields += [("resource", uri) for uri in settings.resource]
        if settings.scope:
            fields.append(("scope", " ".join(settings.scope)))
    return fields


def build_token_request(
    server: AuthorizationServer,
    assertion: bytes,
    *,
    now: float,
    jti: str,
    signing_key: SigningKey | None = None,
    saml_version: str = "2.0",
) -> TokenRequest:
    """The request of ``server``'s grant for ``assertion`` (the decoded document).

    ``jti`` makes the ``private_key_jwt`` client assertion unique; ``signing_key`` is the key
    loaded once for that method and is ignored by the others.
    """
    fields = grant_fields(server, assertion, saml_version)
    fields.extend((k, v) for k, v in server.extra_params.items() if k not in RESERVED_FIELDS)
    # The server's static headers first: the config refuses the names set below.
    headers = {name: value.get_secret_value() for name, value in server.headers.items()}
    headers.update({"Content-Type": FORM_CONTENT_TYPE, "Accept": "application/json"})

    client_id = server.client_id or ""
    secret = server.client_secret.get_secret_value() if server.client_secret else ""
    if server.client_auth == "client_secret_basic":
        headers["Authorization"] = basic_authorization(
            client_id, secret, server.basic_auth_encoding
        )
        if server.client_id_in_body:
            fields.append(("client_id", client_id))
    elif server.client_auth == "client_secret_post":
        fields += [("client_id", client_id), ("client_secret", secret)]
    elif server.client_auth == "private_key_jwt":
        settings = server.private_key_jwt
        if signing_key is None or settings is None:
            raise ConfigError(["private_key_jwt: no signing key was loaded for this server"])
        jwt = client_assertion(
            signing_key,
            client_id=client_id,
            audience=server.token_url,
            now=now,
            jti=jti,
            lifetime=settings.lifetime,
        )
        fields += [
            ("client_id", client_id),
            ("client_assertion_type", CLIENT_ASSERTION_TYPE),
            ("client_assertion", jwt),
        ]
    elif client_id:
        # "none": a public client still names itself (RFC 6749 §3.2.1).
        fields.append(("client_id", client_id))
    return TokenRequest(server.token_url, tuple(fields), MappingProxyType(headers))


def parse_token_response(
    server: AuthorizationServer,
    status: int,
    body: bytes,
    *,
    content_type: str = "",
    retry_after: str | None = None,
) -> Token:
    """The token in a token-endpoint answer, or the gateway error that answer means."""
    if len(body) > server.max_response_bytes:
        raise UpstreamError(TOO_LARGE, f"response over {server.max_response_bytes} bytes")
    document = _json_object(body)
    fields: Mapping[str, Any] = document if document is not None else {}
    error = fields.get("error")
    if status == 429:
        raise Unavailable("rate_limited", f"HTTP 429 {_code(error)}", headers=_retry(retry_after))
    # Some servers answer errors with 200; an error code without a token is an error.
    if isinstance(error, str) and (status >= 400 or "access_token" not in fields):
        _raise_oauth_error(error, fields, status, retry_after)
    if status >= 500:
        raise ServerFault(SERVER_ERROR, f"HTTP {status}")
    if status in (401, 403):
        # RFC 6749 §5.2: a 401 without a usable body is still a client-authentication failure.
        raise UpstreamError("invalid_client", f"HTTP {status} without an OAuth error body")
    if status != 200:
        raise UpstreamError(REJECTED, f"HTTP {status} {_describe(content_type, document)}")
    if document is None:
        raise UpstreamError(BAD_RESPONSE, f"HTTP 200 {_describe(content_type, document)}")
    token = _token(document, server.default_expires_in)
    if server.grant == "token-exchange":
        _check_issued_type(server, document)
    return token


def _check_issued_type(server: AuthorizationServer, document: Mapping[str, Any]) -> None:
    """RFC 8693 §2.2.1: the answer says what it issued; it must be what was asked for."""
    settings = server.token_exchange
    wanted = (settings.requested_token_type if settings else None) or TOKEN_TYPE_ACCESS_TOKEN
    issued = document.get("issued_token_type")
    if issued != wanted:
        shown = _printable(issued, 80) if isinstance(issued, str) else "missing"
        raise UpstreamError(BAD_RESPONSE, f"issued_token_type is {shown}, asked for {wanted}")


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _describe(content_type: str, document: dict[str, Any] | None) -> str:
    if document is not None:
        return "(JSON without an access token)"
    kind = content_type.split(";")[0].strip().lower() or "no content type"
    return f"(not a JSON object: {_printable(kind, 60)})"


def _code(error: object) -> str:
    return _printable(error, 60) if isinstance(error, str) else ""


def _raise_oauth_error(
    error: str, document: Mapping[str, Any], status: int, retry_after: str | None
) -> None:
    description = document.get("error_description")
    detail = _printable(description, 200) if isinstance(description, str) else ""
    if error == "invalid_grant":
        raise InvalidAssertion("invalid_grant", detail)
    if error == "temporarily_unavailable":
        raise Unavailable(error, detail, headers=_retry(retry_after))
    if error in CLIENT_ERRORS:
        raise UpstreamError(error, detail)
    if error == "server_error" or status >= 500:
        raise ServerFault(SERVER_ERROR, f"HTTP {status} {_code(error)} {detail}".strip())
    raise UpstreamError(REJECTED, f"HTTP {status} {_code(error)} {detail}".strip())


def _retry(value: str | None) -> Mapping[str, str] | None:
    """Keep a well-formed ``Retry-After`` (seconds or HTTP-date) to pass on to the client."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit() and len(value) <= 10:
        return {"Retry-After": value}
    if len(value) <= 40 and not _PRINTABLE.search(value):
        try:
            parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        return {"Retry-After": value}
    return None


def _token(document: Mapping[str, Any], default_expires_in: float) -> Token:
    access_token = document.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise UpstreamError(BAD_RESPONSE, "JSON without an access token")
    if not _HEADER_SAFE.fullmatch(access_token):
        raise UpstreamError(BAD_RESPONSE, "access_token has characters unsafe in a header")
    token_type = document.get("token_type")
    if token_type == "N_A":  # noqa: S105 - RFC 8693's "not applicable", not a secret
        # RFC 8693 §2.2.1: the issued token is not an access token, so not one to send on.
        raise UpstreamError(BAD_RESPONSE, "token_type N_A: the issued token is no access token")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        shown = _printable(token_type, 30) if isinstance(token_type, str) else "missing"
        raise UpstreamError(BAD_RESPONSE, f"token_type is not Bearer: {shown}")
    scope = document.get("scope")
    return Token(
        access_token=access_token,
        expires_in=_expires_in(document.get("expires_in", None), default_expires_in),
        scope=scope if isinstance(scope, str) else None,
    )


_LONGEST_LIFETIME = 86_400.0


def _expires_in(value: object, default: float) -> float:
    if value is None:
        return float(default)
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:  # an integer beyond any float
            seconds = None
    elif isinstance(value, str):
        try:
            seconds = float(value.strip())
        except ValueError:
            seconds = None
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        shown = _printable(value, 30) if isinstance(value, str) else type(value).__name__
        raise UpstreamError(BAD_RESPONSE, f"expires_in is not a number of seconds: {shown}")
    # No token is kept longer than a day, whatever the server says (and a huge number must
    # not overflow the cache's or Redis's arithmetic).
    return min(seconds, _LONGEST_LIFETIME)


def _printable(value: object, limit: int) -> str:
    """Text from the server, made safe for one log line and cut short."""
    return _PRINTABLE.sub("?", str(value))[:limit]
