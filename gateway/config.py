"""Configuration: one YAML file, loaded once into frozen, typed objects.

Rules this module owns:
- Unknown keys are errors, and every error names its key path and what was expected
  (``routes[0].upstream: not a URL: 'htp:/x'``).
- Secrets are never inline in examples: any string may be ``${ENV_VAR}`` or
  ``${file:path}``, resolved at load (relative paths are relative to the config file).
- Secret values are ``SecretStr``: they print as ``**********`` (``check-config``).
- Paths to certificates, metadata and keys are resolved against the config file's folder.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from gateway.errors import ConfigError

# Grant and token type identifiers (RFC 7522, Entra ID's SAML 1.1 grant, RFC 8693 §3):
# names, not secrets, whatever the linter's S105 guesses from "TOKEN".
GRANT_TYPE_SAML2_BEARER = "urn:ietf:params:oauth:grant-type:saml2-bearer"
GRANT_TYPE_SAML1_BEARER = "urn:ietf:params:oauth:grant-type:saml1_1-bearer"
GRANT_TYPE_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105
TOKEN_TYPE_SAML2 = "urn:ietf:params:oauth:token-type:saml2"  # noqa: S105
TOKEN_TYPE_SAML1 = "urn:ietf:params:oauth:token-type:saml1"  # noqa: S105
TOKEN_TYPE_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not a URL: {redact_url_password(value)!r}")
    return value


def is_pem_text(value: str) -> bool:
    """A key given inline (through ``${ENV}`` or ``${file:}``) rather than as a path."""
    return value.lstrip().startswith("-----BEGIN ")


def _version_text(value: Any) -> Any:
    return f"{value:.1f}" if isinstance(value, float) else value


def _existing_file(value: str) -> str:
    if not Path(value).is_file():
        raise ValueError(f"file not found: {value!r}")
    return value


def _url_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"must start with '/': {value!r}")
    return value


def is_loopback_host(host: str) -> bool:
    """A host name that can only mean this machine (RFC 6761 ``localhost``, 127/8, ``::1``)."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _at(key: str, message: str) -> str:
    """A problem about ``key`` under the key being validated (a mapping's entry, say):
    ``parse_config`` appends it to the error's path."""
    return f"@{key}: {message}"


def _at_sibling(key: str, message: str) -> str:
    """A problem that a rule checked on one key reports about another key of the same model
    (the rule sits on the last of the keys it reads, so ``info.data`` holds the others)."""
    return f"@^{key}: {message}"


HttpUrl = Annotated[str, AfterValidator(_http_url)]
UrlPath = Annotated[str, AfterValidator(_url_path)]
FilePath = Annotated[str, AfterValidator(_existing_file)]
Seconds = Annotated[float, Field(gt=0)]


class Listener(_Frozen):
    host: str = "0.0.0.0"  # noqa: S104 - the proxy listener is meant to be reachable
    port: int = Field(8080, ge=0, le=65535)


class AdminListener(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(9901, ge=0, le=65535)
    enabled: bool = True


class HeaderSource(_Frozen):
    """A header that may carry the assertion; ``scheme`` for ``Authorization: SAML <b64>``."""

    name: str
    scheme: str | None = None


def _default_headers() -> tuple[HeaderSource, ...]:
    return (
        HeaderSource(name="X-SAML-Assertion"),
        HeaderSource(name="Authorization", scheme="SAML"),
    )


class AssertionSettings(_Frozen):
    headers: tuple[HeaderSource, ...] = Field(default_factory=_default_headers, min_length=1)
    max_size: int = Field(64 * 1024, gt=0, description="encoded bytes, checked before decoding")
    clock_skew: float = Field(120, ge=0)


class IdentityProvider(_Frozen):
    """An IdP we trust: its issuer(s) and its signing certificates (several for rollover)."""

    issuers: tuple[str, ...] = Field(min_length=1)
    certificates: tuple[FilePath, ...] = ()
    metadata: tuple[FilePath, ...] = ()
    allow_sha1: bool = False
    min_rsa_key_bits: int = Field(2048, ge=512)
    # SAML 1.1 (AD FS, WS-Trust) is accepted only where an operator opts in.
    saml_versions: tuple[Literal["1.1", "2.0"], ...] = Field(("2.0",), min_length=1)
    # Private keys for saml:EncryptedAssertion (several for rollover): each a PEM file path or
    # the PEM text itself (``${file:key.pem}``, ``${ENV}``); secret, so never printed.
    decryption_keys: tuple[SecretStr, ...] = ()
    # AES-CBC content encryption is open to padding-oracle attacks; GCM is the default.
    allow_cbc_encryption: bool = False

    @model_validator(mode="before")
    @classmethod
    def _issuer_alias(cls, data: Any) -> Any:
        if isinstance(data, dict) and "issuer" in data:
            data = dict(data)
            issuer = data.pop("issuer")
            data.setdefault("issuers", [issuer] if isinstance(issuer, str) else issuer)
        for key in ("certificates", "metadata", "saml_versions", "decryption_keys"):
            if isinstance(data, dict) and isinstance(data.get(key), str):
                data = {**data, key: [data[key]]}
        if isinstance(data, dict) and isinstance(data.get("saml_versions"), list):
            # YAML reads an unquoted 2.0 as a number: take it as the version it spells.
            versions = data["saml_versions"]
            data = {**data, "saml_versions": [_version_text(v) for v in versions]}
        return data

    @field_validator("saml_versions")
    @classmethod
    def _versions_once(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("lists a version twice")
        return value

    @field_validator("decryption_keys")
    @classmethod
    def _readable_keys(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        # The value is never quoted: it may be the key itself.
        problems = [
            f"[{i}]: neither PEM text nor an existing file"
            for i, key in enumerate(value)
            if not is_pem_text(key.get_secret_value())
            and not Path(key.get_secret_value()).is_file()
        ]
        if problems:
            raise ValueError("\n".join(problems))
        return value

    @model_validator(mode="after")
    def _needs_keys(self) -> IdentityProvider:
        if not self.certificates and not self.metadata:
            raise ValueError(
                "needs 'certificates' (PEM files) and/or 'metadata' (IdP metadata XML)"
            )
        return self


ClientAuth = Literal["client_secret_basic", "client_secret_post", "private_key_jwt", "none"]


class PrivateKeyJwt(_Frozen):
    key_file: FilePath
    algorithm: Literal["RS256", "ES256"] = "RS256"
    key_id: str | None = None
    lifetime: Seconds = 60


class AsTimeouts(_Frozen):
    connect: Seconds = 3
    total: Seconds = 10


class Retries(_Frozen):
    attempts: int = Field(3, ge=1, le=10)
    backoff: Seconds = 0.2
    max_backoff: Seconds = 2
    deadline: Seconds = 15


# Headers the gateway sets on a token request itself, and hop-by-hop ones (RFC 9110 §7.6.1).
GATEWAY_HEADERS = frozenset(
    {
        "authorization",
        "content-type",
        "content-length",
        "accept",
        "host",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
    }
)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2
_HEADER_VALUE = re.compile(r"[\x20-\x7e]*")


Grant = Literal["saml2-bearer", "saml1-bearer", "token-exchange"]
# The SAML versions each grant can carry: the bearer grants name their version in the
# grant_type, RFC 8693 names it in subject_token_type.
GRANT_SAML_VERSIONS: Mapping[str, tuple[str, ...]] = {
    "saml2-bearer": ("2.0",),
    "saml1-bearer": ("1.1",),
    "token-exchange": ("1.1", "2.0"),
}


def _absolute_uri(value: str) -> str:
    # RFC 8693 §2.1: a resource is an absolute URI without a fragment.
    parts = urlsplit(value)
    if not parts.scheme or not (parts.netloc or parts.path) or "#" in value:
        raise ValueError(f"not an absolute URI without a fragment: {value!r}")
    return value


class TokenExchange(_Frozen):
    """The RFC 8693 request parameters of a ``grant: token-exchange`` server."""

    requested_token_type: (
        Literal[
            "urn:ietf:params:oauth:token-type:access_token", "urn:ietf:params:oauth:token-type:jwt"
        ]
        | None
    ) = None
    audience: str | None = None
    resource: tuple[Annotated[str, AfterValidator(_absolute_uri)], ...] = ()
    scope: tuple[str, ...] = ()

    @field_validator("scope", "resource", mode="before")
    @classmethod
    def _one_or_several(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            return value.split() if info.field_name == "scope" else [value]
        return value


class AuthorizationServer(_Frozen):
    """An OAuth token endpoint that takes a SAML assertion: the RFC 7522 bearer grant (SAML
    2.0 or, as Entra ID does, 1.1) or an RFC 8693 token exchange."""

    token_url: HttpUrl
    client_id: str | None = None
    client_auth: ClientAuth = "client_secret_basic"
    client_secret: SecretStr | None = None
    private_key_jwt: PrivateKeyJwt | None = None
    scope: tuple[str, ...] = ()
    extra_params: Mapping[str, str] = Field(default_factory=dict)
    # What the assertion must say to be meant for this server:
    audience: str
    recipient: HttpUrl | None = Field(None, description="defaults to token_url")
    recipient_aliases: tuple[str, ...] = ()
    assertion_encoding: Literal["base64url", "base64"] = "base64url"
    timeouts: AsTimeouts = AsTimeouts()
    retries: Retries = Retries()
    default_expires_in: Seconds = 3600
    max_response_bytes: int = Field(64 * 1024, gt=0)
    # Plain http:// to a host other than this one sends the client secret and the assertion
    # in clear (RFC 6749 §3.2 requires TLS); only a lab may want that.
    allow_insecure_http: bool = Field(False, validate_default=True)
    # How client_secret_basic encodes the pair: "form" (RFC 6749 §2.3.1, the default) or
    # "raw" (SAP NetWeaver ABAP, whose documentation never says it decodes the pair).
    basic_auth_encoding: Literal["form", "raw"] = "form"
    # client_id also in the form, next to Basic (SAP NetWeaver's own client sample does this,
    # and SOAUTH2 can require it to match the assertion's client_id attribute).
    client_id_in_body: bool = False
    # Static extra headers on the token request (X-CF-ENCODED-CREDENTIALS for UAA/XSUAA).
    headers: Mapping[str, SecretStr] = Field(default_factory=dict)
    grant: Grant = "saml2-bearer"
    token_exchange: TokenExchange | None = None

    @field_validator("scope", mode="before")
    @classmethod
    def _split_scope(cls, value: Any) -> Any:
        return value.split() if isinstance(value, str) else value

    # Each rule below reads only the keys declared before its own (``info.data``), so it is
    # checked even when another key of this server is wrong: one report lists both.
    @field_validator("allow_insecure_http")
    @classmethod
    def _no_clear_text(cls, allowed: bool, info: ValidationInfo) -> bool:
        parts = urlsplit(info.data.get("token_url") or "")
        if parts.scheme == "http" and not allowed and not is_loopback_host(parts.hostname or ""):
            raise ValueError(
                _at_sibling(
                    "token_url",
                    f"http:// to {parts.hostname!r} would send the client credentials and the "
                    "assertion in clear text; use https:// (allow_insecure_http: true is for "
                    "labs)",
                )
            )
        return allowed

    @field_validator("basic_auth_encoding")
    @classmethod
    def _encoding_fits(cls, value: str, info: ValidationInfo) -> str:
        client_auth = info.data.get("client_auth")
        if value == "raw" and client_auth not in (None, "client_secret_basic"):
            raise ValueError(f"only applies to client_secret_basic, not {client_auth!r}")
        if value == "raw" and ":" in (info.data.get("client_id") or ""):
            # RFC 7617 §2: the user-id ends at the first colon; only "form" can carry one.
            raise ValueError("'raw' cannot carry the ':' in client_id; use 'form'")
        return value

    @field_validator("client_id_in_body")
    @classmethod
    def _only_next_to_basic(cls, value: bool, info: ValidationInfo) -> bool:
        client_auth = info.data.get("client_auth")
        if value and client_auth not in (None, "client_secret_basic"):
            raise ValueError(f"only applies to client_secret_basic, not {client_auth!r}")
        return value

    @field_validator("headers")
    @classmethod
    def _headers_are_ours_to_add(cls, value: Mapping[str, SecretStr]) -> Mapping[str, SecretStr]:
        problems = []
        for name, text in value.items():
            if not _TOKEN.fullmatch(name):
                problems.append(_at(name, "not a valid header name"))
            elif name.lower() in GATEWAY_HEADERS:
                problems.append(_at(name, "the gateway sets this header itself"))
            elif not _HEADER_VALUE.fullmatch(text.get_secret_value()):
                # A CR or LF would let a value add headers of its own.
                problems.append(_at(name, "value must be visible ASCII and spaces"))
        if problems:
            raise ValueError("\n".join(problems))
        return value

    @model_validator(mode="after")
    def _auth_is_complete(self) -> AuthorizationServer:
        if self.client_auth != "none" and not self.client_id:
            raise ValueError(f"client_auth {self.client_auth!r} needs 'client_id'")
        if self.client_auth in ("client_secret_basic", "client_secret_post"):
            if self.client_secret is None:
                raise ValueError(f"client_auth {self.client_auth!r} needs 'client_secret'")
        if self.client_auth == "private_key_jwt" and self.private_key_jwt is None:
            raise ValueError("client_auth 'private_key_jwt' needs 'private_key_jwt.key_file'")
        return self

    @model_validator(mode="after")
    def _grant_fits(self) -> AuthorizationServer:
        problems = []
        if self.grant != "token-exchange" and self.token_exchange is not None:
            problems.append(_at("token_exchange", f"set, but grant is {self.grant!r}"))
        if self.grant == "token-exchange":
            if self.scope:
                # One place for the scope: the RFC 8693 parameters live together.
                problems.append(_at("scope", "with grant token-exchange, use token_exchange.scope"))
            if self.assertion_encoding != "base64url":
                # RFC 8693 §3: a SAML subject_token is base64url; there is no other spelling.
                problems.append(
                    _at("assertion_encoding", "grant token-exchange sends base64url only")
                )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def recipients(self) -> tuple[str, ...]:
        """Every Recipient the assertion's bearer confirmation may name."""
        return (self.recipient or self.token_url, *self.recipient_aliases)


class RouteTimeouts(_Frozen):
    connect: Seconds = 5
    read: Seconds = 60
    total: Seconds = 300
    # A WebSocket is bounded by these alone (HTTP timeouts and reloads do not end it):
    # closed (1001) after this long without a message either way / this long in all.
    websocket_idle: Seconds | None = None
    websocket_lifetime: Seconds | None = None


class UpstreamTls(_Frozen):
    verify: bool = True
    ca_file: FilePath | None = None
    cert_file: FilePath | None = None
    key_file: FilePath | None = None

    @model_validator(mode="after")
    def _pair(self) -> UpstreamTls:
        if self.key_file and not self.cert_file:
            raise ValueError("'key_file' needs 'cert_file'")
        return self


class Route(_Frozen):
    name: str | None = Field(None, description="label in logs and metrics; defaults to path_prefix")
    path_prefix: UrlPath = "/"
    host: str | None = None
    upstream: HttpUrl
    identity_provider: str
    authorization_server: str
    strip_prefix: bool = False
    preserve_host: bool = False
    timeouts: RouteTimeouts = RouteTimeouts()
    max_body_size: int = Field(10 * 1024 * 1024, ge=0)
    tls: UpstreamTls = UpstreamTls()
    realm: str | None = None
    # Spellings a strict upstream and a liberal one read as different paths (see
    # gateway/routing.py): refused unless the route's upstream is known to read them alike.
    allow_path_parameters: bool = False
    allow_encoded_slashes: bool = False

    @property
    def label(self) -> str:
        return self.name or self.path_prefix


_MASK = "**********"  # how SecretStr prints, so every secret in check-config looks alike


def redact_url_password(url: str) -> str:
    """``url`` with the password of its userinfo masked, everything else kept.

    The authority ends at the first ``/``, ``?`` or ``#`` and the userinfo at its last ``@``,
    split by hand: multi-host forms (``redis+sentinel://u:p@h1:26379,h2:26379/m``) are not
    one host:port that urllib.parse would vouch for.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i != -1), default=len(rest))
    userinfo, at, hosts = rest[:end].rpartition("@")
    user, colon, password = userinfo.partition(":")
    if not at or not colon or not password:
        return url
    return f"{scheme}://{user}:{_MASK}@{hosts}{rest[end:]}"


MIN_SEALING_SECRET_CHARS = 16


def url_password(url: str) -> str:
    """The password in ``url``'s userinfo, percent-decoded as a client sends it; ``""`` when
    there is none. Split as ``redact_url_password`` splits, so multi-host forms work too."""
    rest = url.partition("://")[2]
    end = min((i for i in (rest.find(c) for c in "/?#") if i != -1), default=len(rest))
    userinfo, at, _ = rest[:end].rpartition("@")
    return unquote(userinfo.partition(":")[2]) if at else ""


def redis_hosts(url: str) -> tuple[list[str], list[str]]:
    """The host names a Redis URL names, and what is wrong with its shape (the rules that
    ``gateway.cache.redis.connect_redis`` applies when it builds the client)."""
    parts = urlsplit(url)
    shown = redact_url_password(url)
    if parts.scheme == "unix":
        return [], []
    if parts.scheme in ("redis", "rediss"):
        try:
            host, port = parts.hostname, parts.port
        except ValueError:
            return [], [f"bad port in {shown!r}"]
        database = parts.path.strip("/")
        if not host:
            return [], [f"no host in {shown!r}"]
        if database and not database.isdigit():
            return [host], [f"the database must be a number, got {database!r}"]
        return [host], [] if port != 0 else [f"bad port in {shown!r}"]
    rest = url.partition("://")[2]
    end = min((i for i in (rest.find(c) for c in "/?#") if i != -1), default=len(rest))
    netloc, path = rest[:end].rpartition("@")[2], [p for p in parts.path.split("/") if p]
    hosts, problems = [], []
    for item in netloc.split(","):
        if item.startswith("["):
            host, _, port_text = item[1:].partition("]")
            port_text = port_text.removeprefix(":")
        else:
            host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
        if not host:
            problems.append(f"empty host in {shown!r}")
        elif port_text and not (port_text.isdigit() and 0 < int(port_text) < 65536):
            problems.append(f"bad port in {shown!r}")
        else:
            hosts.append(host)
    if parts.scheme == "redis+sentinel":
        if not 1 <= len(path) <= 2:
            problems.append(
                f"expected redis+sentinel://host:port[,host:port]/service_name[/db], got {shown!r}"
            )
        elif len(path) == 2 and not path[1].isdigit():
            problems.append(f"the database must be a number, got {path[1]!r}")
    elif path:  # redis+cluster
        problems.append("a cluster URL has no path (no database)")
    return hosts, problems


class RedisSettings(_Frozen):
    url: str
    password: SecretStr | None = None
    ca_file: FilePath | None = None
    # A client certificate for a Redis that asks for one (its default `tls-auth-clients yes`).
    cert_file: FilePath | None = None
    key_file: FilePath | None = Field(None, validate_default=True)
    encryption_keys: Mapping[str, SecretStr] = Field(min_length=1)
    active_key: str
    timeout: Seconds = 0.25
    lock_ttl: Seconds = 10
    lock_wait: Seconds = 5
    required_for_readiness: bool = False
    key_prefix: str = "samlgw:"
    # A password sent without TLS to a host other than this one travels in clear.
    allow_insecure: bool = Field(False, validate_default=True)

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if urlsplit(value).scheme not in (
            "redis",
            "rediss",
            "unix",
            "redis+sentinel",
            "redis+cluster",
        ):
            raise ValueError(f"not a Redis URL: {redact_url_password(value)!r}")
        problems = redis_hosts(value)[1]
        if problems:
            raise ValueError("\n".join(problems))
        return value

    @field_validator("key_file")
    @classmethod
    def _tls_files_fit_the_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        # On the last TLS key, so it reads the URL and the other two (a key that failed its
        # own check is absent from info.data and judged by nothing here).
        if "cert_file" in info.data:
            if info.data["cert_file"] is not None and value is None:
                raise ValueError("needed with cert_file (the client certificate's private key)")
            if info.data["cert_file"] is None and value is not None:
                raise ValueError(_at_sibling("cert_file", "needed with key_file (mutual TLS)"))
        url = info.data.get("url")
        scheme = urlsplit(url).scheme if url is not None else None
        if scheme in ("redis", "unix"):
            # TLS files beside a clear-text URL would be ignored while the traffic goes in
            # clear, so the file is refused rather than half obeyed.
            given = dict(info.data, key_file=value)
            for key in ("ca_file", "cert_file", "key_file"):
                if given.get(key) is not None:
                    raise ValueError(
                        _at_sibling(key, f"TLS settings need rediss://, not {scheme}://")
                    )
        return value

    @field_serializer("url", when_used="json")
    def _url_without_password(self, value: str) -> str:
        # check-config prints model_dump(mode="json"): the URL password must not show there.
        return redact_url_password(value)

    @field_validator("encryption_keys")
    @classmethod
    def _usable_sealing_keys(cls, value: Mapping[str, SecretStr]) -> Mapping[str, SecretStr]:
        # The rules of gateway.cache.redis.EntrySealer, here so check-config finds them.
        problems = []
        for key_id, secret in value.items():
            if not 0 < len(key_id.encode()) <= 255:
                problems.append(_at(key_id, "key IDs are 1 to 255 bytes"))
            elif len(secret.get_secret_value()) < MIN_SEALING_SECRET_CHARS:
                problems.append(
                    _at(
                        key_id,
                        f"secret is too short ({MIN_SEALING_SECRET_CHARS}+ characters; "
                        "e.g. `openssl rand -base64 32`)",
                    )
                )
        if problems:
            raise ValueError("\n".join(problems))
        return value

    @field_validator("active_key")
    @classmethod
    def _active_key_known(cls, value: str, info: ValidationInfo) -> str:
        keys = info.data.get("encryption_keys")  # absent when it is itself wrong
        if keys is not None and value not in keys:
            raise ValueError(f"{value!r} is not in 'encryption_keys'")
        return value

    @field_validator("allow_insecure")
    @classmethod
    def _no_clear_text_password(cls, allowed: bool, info: ValidationInfo) -> bool:
        # On the last key it reads, so it is checked even when another key is wrong.
        url = info.data.get("url")
        if allowed or url is None:
            return allowed
        scheme = urlsplit(url).scheme
        remote = [h for h in redis_hosts(url)[0] if not is_loopback_host(h)]
        if scheme in ("rediss", "unix") or not remote:
            return allowed
        # Sentinels are always spoken to in clear; the master and cluster nodes over TLS
        # when ca_file is set.
        tls = scheme != "redis" and (
            info.data.get("ca_file") is not None or info.data.get("cert_file") is not None
        )
        in_url = bool(url_password(url))
        in_clear = (in_url and (scheme == "redis+sentinel" or not tls)) or (
            info.data.get("password") is not None and not tls
        )
        if in_clear:
            raise ValueError(
                _at_sibling(
                    "url",
                    f"a password would travel to {remote[0]!r} without TLS; use rediss:// (or "
                    "ca_file with sentinel and cluster URLs), or set allow_insecure: true",
                )
            )
        return allowed


class CacheSettings(_Frozen):
    backend: Literal["memory", "redis"] = "memory"
    max_entries: int = Field(100_000, gt=0)
    refresh_margin: float = Field(30, ge=0)
    jitter: float = Field(5, ge=0)
    negative_ttl: float = Field(30, ge=0)
    cap_to_assertion: bool = False
    redis: RedisSettings | None = None

    @model_validator(mode="after")
    def _redis_needs_settings(self) -> CacheSettings:
        if self.backend == "redis" and self.redis is None:
            raise ValueError("backend 'redis' needs a 'redis' section")
        return self


def _network(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"not an IP address or CIDR network: {value!r}") from None
    return value


class ProxySettings(_Frozen):
    trusted_proxies: tuple[Annotated[str, AfterValidator(_network)], ...] = ()
    max_header_size: int = Field(64 * 1024, ge=8190)
    max_headers: int = Field(100, gt=0)
    # After an upstream 401 invalid_token, exchange that assertion again at most this often:
    # otherwise every request of a client the upstream refuses costs an exchange.
    reexchange_interval: float = Field(30, ge=0)


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _header_or(pseudo: str | None) -> AfterValidator:
    """A header name, or the one pseudo-header name given (the auth request's own part)."""

    def check(value: str) -> str:
        if value == pseudo or _HEADER_NAME.fullmatch(value):
            return value
        expected = f"a header name or {pseudo!r}" if pseudo else "a header name"
        raise ValueError(f"expected {expected}, got {value!r}")

    return AfterValidator(check)


class OriginalRequestHeaders(_Frozen):
    """Where the front puts the original request; only headers it sets itself (overwriting a
    client's copy) may be named. ``:method`` is the auth request's own method, ``:path`` its
    path below ``forward_auth.path`` (Envoy's ``path_prefix``)."""

    method: Annotated[str, _header_or(":method")] = ":method"
    uri: Annotated[str, _header_or(":path")]
    host: Annotated[str, _header_or(None)]


Front = Literal["nginx", "traefik", "caddy", "envoy"]


class ForwardAuth(_Frozen):
    enabled: bool = False
    path: UrlPath = "/auth"
    listen: Listener | None = None
    token_header: str = "Authorization"  # noqa: S105 - a header name, not a secret
    front: Front | None = None
    original_request_headers: OriginalRequestHeaders | None = None

    @model_validator(mode="after")
    def _one_source_of_the_original_request(self) -> ForwardAuth:
        # A client's copy of a header the front does not overwrite would choose the route.
        if self.front is not None and self.original_request_headers is not None:
            raise ValueError("set 'front' or 'original_request_headers', not both")
        if self.enabled and self.front is None and self.original_request_headers is None:
            raise ValueError(
                "'front' is required when enabled: nginx, traefik, caddy or envoy (the proxy "
                "that asks), or 'original_request_headers' naming the headers it sets"
            )
        return self


class Lifecycle(_Frozen):
    shutdown_grace: float = Field(5, ge=0)
    drain_timeout: float = Field(30, ge=0)


class LogSettings(_Frozen):
    format: Literal["json", "text"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"


class TracingSettings(_Frozen):
    """OpenTelemetry traces over OTLP/HTTP (the ``otel`` extra); read once at start."""

    enabled: bool = False
    endpoint: HttpUrl = "http://127.0.0.1:4318/v1/traces"
    service_name: str = Field("saml-oauth-gateway", min_length=1)
    sample_ratio: float = Field(1.0, ge=0, le=1)
    headers: Mapping[str, SecretStr] = Field(default_factory=dict)  # e.g. a collector's API key


class TelemetrySettings(_Frozen):
    tracing: TracingSettings = TracingSettings()


class Config(_Frozen):
    listen: Listener = Listener()
    admin: AdminListener = AdminListener()
    workers: int = Field(1, ge=1, le=64)
    log: LogSettings = LogSettings()
    lifecycle: Lifecycle = Lifecycle()
    assertion: AssertionSettings = AssertionSettings()
    identity_providers: Mapping[str, IdentityProvider] = Field(min_length=1)
    authorization_servers: Mapping[str, AuthorizationServer] = Field(min_length=1)
    routes: tuple[Route, ...]
    cache: CacheSettings = CacheSettings()
    proxy: ProxySettings = ProxySettings()
    forward_auth: ForwardAuth = ForwardAuth()
    telemetry: TelemetrySettings = TelemetrySettings()

    @model_validator(mode="after")
    def _references_exist(self) -> Config:
        routes = [(r.identity_provider, r.authorization_server) for r in self.routes]
        problems = reference_problems(routes, self.identity_providers, self.authorization_servers)
        if not problems:
            problems = grant_problems(
                self.routes, self.identity_providers, self.authorization_servers
            )
        if problems:
            raise ConfigError(problems)
        return self

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, with every secret masked."""
        return self.model_dump(mode="json")


def reference_problems(
    routes: Sequence[tuple[object, object]],
    identity_providers: Mapping[str, object] | None,
    authorization_servers: Mapping[str, object] | None,
) -> list[str]:
    """Routes naming an identity provider or authorization server that is not defined.

    Also run on the raw data when other keys fail validation (``None``: that section is
    itself broken, so its names are not checked)."""
    problems = [] if routes else ["routes: at least one route is needed"]
    for i, (idp, server) in enumerate(routes):
        for key, name, known, kind in (
            ("identity_provider", idp, identity_providers, "identity provider"),
            ("authorization_server", server, authorization_servers, "authorization server"),
        ):
            if known is not None and isinstance(name, str) and name not in known:
                listed = ", ".join(sorted(known))
                problems.append(f"routes[{i}].{key}: unknown {kind} {name!r} (known: {listed})")
    return problems


def grant_problems(
    routes: Sequence[Route],
    identity_providers: Mapping[str, IdentityProvider],
    authorization_servers: Mapping[str, AuthorizationServer],
) -> list[str]:
    """Servers whose grant cannot carry the SAML versions their routes' IdPs accept."""
    problems = []
    for i, route in enumerate(routes):
        server = authorization_servers[route.authorization_server]
        idp = identity_providers[route.identity_provider]
        # saml_versions is the identity provider's opt-in; without it, SAML 2.0 only.
        versions: tuple[str, ...] = getattr(idp, "saml_versions", ("2.0",))
        carried = GRANT_SAML_VERSIONS[server.grant]
        missing = [version for version in versions if version not in carried]
        if missing:
            problems.append(
                f"authorization_servers.{route.authorization_server}.grant: {server.grant!r} "
                f"cannot carry SAML {', '.join(missing)}, which identity provider "
                f"{route.identity_provider!r} of routes[{i}] accepts "
                f"(identity_providers.{route.identity_provider}.saml_versions); grants that "
                f"can: {_grants_for(versions)}"
            )
    return problems


def _grants_for(versions: Sequence[str]) -> str:
    fitting = [g for g, carried in GRANT_SAML_VERSIONS.items() if set(versions) <= set(carried)]
    return ", ".join(fitting)


# --- loading ---------------------------------------------------------------------------

_REFERENCE = re.compile(r"\$\{(?:(file):)?([^}]+)\}")
_PATH_KEYS = frozenset(
    {"certificates", "metadata", "key_file", "cert_file", "ca_file", "decryption_keys"}
)


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _resolve(
    node: Any,
    loc: tuple[int | str, ...],
    base: Path,
    problems: list[str],
    unresolved: set[tuple[int | str, ...]] | None = None,
) -> Any:
    """Resolve ``${ENV}`` / ``${file:path}`` references and make file paths absolute.

    A reference that cannot be resolved is a problem, is left as written and its key goes
    into ``unresolved``, so validation goes on and reports the file's other problems too.
    """
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if not isinstance(key, str):
                problems.append(f"{_path(loc)}: keys must be strings, got {key!r}")
                continue
            value = _resolve(value, (*loc, key), base, problems, unresolved)
            if key in _PATH_KEYS:
                value = _absolute_paths(value, base)
            out[key] = value
        return out
    if isinstance(node, list):
        return [_resolve(v, (*loc, i), base, problems, unresolved) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:

        def substitute(match: re.Match[str]) -> str:
            is_file, name = match.group(1), match.group(2).strip()
            if is_file:
                path = Path(name) if Path(name).is_absolute() else base / name
                try:
                    return path.read_text().strip()
                except OSError as exc:
                    problems.append(
                        f"{_path(loc)}: cannot read secret file {name!r}: {exc.strerror}"
                    )
            elif name in os.environ:
                return os.environ[name]
            else:
                problems.append(f"{_path(loc)}: environment variable {name!r} is not set")
            if unresolved is not None:
                unresolved.add(loc)
            return match.group(0)

        return _REFERENCE.sub(substitute, node)
    return node


def _absolute_paths(value: Any, base: Path) -> Any:
    if isinstance(value, str) and is_pem_text(value):  # a key given inline is no path
        return value
    if isinstance(value, str):
        return str(base / value) if not Path(value).is_absolute() else value
    if isinstance(value, list):
        return [_absolute_paths(v, base) for v in value]
    return value


def _messages(error: Mapping[str, Any]) -> list[tuple[tuple[int | str, ...], str]]:
    """(key path, message) pairs of one pydantic error; a validator may report several,
    one a line, each ``@key: message`` naming a key under the error's own path."""
    loc = tuple(error["loc"])
    if error["type"] == "extra_forbidden":
        return [(loc, "unknown key")]
    if error["type"] == "missing":
        return [(loc, "required key is missing")]
    msg = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    out: list[tuple[tuple[int | str, ...], str]] = []
    for line in msg.split("\n"):
        key, colon, rest = line.removeprefix("@^").removeprefix("@").partition(": ")
        if line.startswith("@^") and colon:
            out.append(((*loc[:-1], key), rest))
        elif line.startswith("@") and colon:
            out.append(((*loc, key), rest))
        else:
            out.append((loc, line))
    return out


def _within(loc: tuple[int | str, ...], roots: set[tuple[int | str, ...]]) -> bool:
    return any(loc[: len(root)] == root for root in roots)


def parse_config(data: Any, base: Path, source: str = "") -> Config:
    """Validate already-parsed YAML data; raise ``ConfigError`` naming every bad key.

    Every problem is found in one pass: unset references, every key that fails validation
    and routes naming what is not defined. A key whose reference could not be resolved is
    reported once, for the reference (its placeholder value would only fail again).
    """
    if not isinstance(data, dict):
        raise ConfigError(["(top level): expected a mapping of settings"], source)
    problems: list[str] = []
    unresolved: set[tuple[int | str, ...]] = set()
    resolved = _resolve(data, (), base, problems, unresolved)
    try:
        config = Config.model_validate(resolved)
    except ValidationError as exc:
        problems += _problems(exc, unresolved)
        problems += _raw_reference_problems(resolved)
    except ConfigError as exc:
        problems += exc.problems
    else:
        if not problems:
            return config
    raise ConfigError(problems, source)


def _problems(exc: ValidationError, ignored: set[tuple[int | str, ...]]) -> list[str]:
    """The problems of a validation error, but those at or under an ``ignored`` path."""
    return [
        f"{_path(loc)}: {msg}"
        for error in exc.errors()
        for loc, msg in _messages(error)
        if not _within(loc, ignored)
    ]


def _raw_reference_problems(data: Mapping[str, Any]) -> list[str]:
    """``reference_problems`` on data that did not validate, as far as it can be read."""
    routes = data.get("routes")
    if not isinstance(routes, list):
        return []  # validation said what is wrong with it

    def names(key: str) -> Mapping[str, object] | None:
        section = data.get(key)
        return section if isinstance(section, dict) and section else None

    pairs = [
        (r.get("identity_provider"), r.get("authorization_server"))
        if isinstance(r, dict)
        else (None, None)
        for r in routes
    ]
    return reference_problems(pairs, names("identity_providers"), names("authorization_servers"))


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate one YAML file; every problem is reported at once."""
    data, base = read_config_file(path)
    return parse_config(data, base, str(path))


def read_config_file(path: str | os.PathLike[str]) -> tuple[Any, Path]:
    """The YAML data of a config file and the folder its relative paths start from."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read config file: {exc.strerror}"], str(file)) from None
    except UnicodeDecodeError as exc:
        # Never quote the bytes: a config file may hold inline secrets.
        raise ConfigError([f"not UTF-8 text (byte {exc.start})"], str(file)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # Only where and what: the YAML error's own text quotes the line, secrets included.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError([f"not valid YAML{where}: {problem}"], str(file)) from None
    return data, file.resolve().parent


@dataclass(frozen=True)
class ConfigParts:
    """The sections of a config that validate on their own, from a file that does not
    validate as a whole: what the checks that read files can still look at."""

    identity_providers: dict[str, IdentityProvider] = field(default_factory=dict)
    authorization_servers: dict[str, AuthorizationServer] = field(default_factory=dict)
    routes: dict[int, Route] = field(default_factory=dict)  # by index in the file
    redis: RedisSettings | None = None

    @classmethod
    def of(cls, config: Config) -> ConfigParts:
        return cls(
            dict(config.identity_providers),
            dict(config.authorization_servers),
            dict(enumerate(config.routes)),
            config.cache.redis,
        )

    @classmethod
    def salvage(cls, data: Any, base: Path) -> ConfigParts:
        if not isinstance(data, dict):
            return cls()
        resolved = _resolve(data, (), base, [], set())
        routes = resolved.get("routes")
        return cls(
            _valid(IdentityProvider, resolved.get("identity_providers")),
            _valid(AuthorizationServer, resolved.get("authorization_servers")),
            _valid(Route, dict(enumerate(routes)) if isinstance(routes, list) else None),
            _valid(CacheSettings, {"cache": resolved.get("cache")}).get("cache", _NO_CACHE).redis,
        )


_NO_CACHE = CacheSettings()


_Model = TypeVar("_Model", bound=BaseModel)


def _valid(model: type[_Model], section: Any) -> dict[Any, _Model]:
    if not isinstance(section, dict):
        return {}
    out = {}
    for key, value in section.items():
        try:
            out[key] = model.model_validate(value)
        except (ValidationError, ConfigError):
            continue  # its problems are reported by parse_config
    return out
