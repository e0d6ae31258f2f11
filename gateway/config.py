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
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from gateway.errors import ConfigError

GRANT_TYPE_SAML2_BEARER = "urn:ietf:params:oauth:grant-type:saml2-bearer"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not a URL: {redact_url_password(value)!r}")
    return value


def _existing_file(value: str) -> str:
    if not Path(value).is_file():
        raise ValueError(f"file not found: {value!r}")
    return value


def _url_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"must start with '/': {value!r}")
    return value


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

    @model_validator(mode="before")
    @classmethod
    def _issuer_alias(cls, data: Any) -> Any:
        if isinstance(data, dict) and "issuer" in data:
            data = dict(data)
            issuer = data.pop("issuer")
            data.setdefault("issuers", [issuer] if isinstance(issuer, str) else issuer)
        for key in ("certificates", "metadata"):
            if isinstance(data, dict) and isinstance(data.get(key), str):
                data = {**data, key: [data[key]]}
        return data

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


class AuthorizationServer(_Frozen):
    """An OAuth token endpoint that accepts the RFC 7522 SAML 2.0 bearer grant."""

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

    @field_validator("scope", mode="before")
    @classmethod
    def _split_scope(cls, value: Any) -> Any:
        return value.split() if isinstance(value, str) else value

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


class RedisSettings(_Frozen):
    url: str
    password: SecretStr | None = None
    ca_file: FilePath | None = None
    encryption_keys: Mapping[str, SecretStr] = Field(min_length=1)
    active_key: str
    timeout: Seconds = 0.25
    lock_ttl: Seconds = 10
    lock_wait: Seconds = 5
    required_for_readiness: bool = False
    key_prefix: str = "samlgw:"

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
        return value

    @field_serializer("url", when_used="json")
    def _url_without_password(self, value: str) -> str:
        # check-config prints model_dump(mode="json"): the URL password must not show there.
        return redact_url_password(value)

    @model_validator(mode="after")
    def _active_key_known(self) -> RedisSettings:
        if self.active_key not in self.encryption_keys:
            raise ValueError(f"active_key {self.active_key!r} is not in 'encryption_keys'")
        return self


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

    @model_validator(mode="after")
    def _references_exist(self) -> Config:
        problems = [] if self.routes else ["routes: at least one route is needed"]
        for i, route in enumerate(self.routes):
            if route.identity_provider not in self.identity_providers:
                known = ", ".join(sorted(self.identity_providers))
                problems.append(
                    f"routes[{i}].identity_provider: unknown identity provider "
                    f"{route.identity_provider!r} (known: {known})"
                )
            if route.authorization_server not in self.authorization_servers:
                known = ", ".join(sorted(self.authorization_servers))
                problems.append(
                    f"routes[{i}].authorization_server: unknown authorization server "
                    f"{route.authorization_server!r} (known: {known})"
                )
        if problems:
            raise ConfigError(problems)
        return self

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, with every secret masked."""
        return self.model_dump(mode="json")


# --- loading ---------------------------------------------------------------------------

_REFERENCE = re.compile(r"\$\{(?:(file):)?([^}]+)\}")
_PATH_KEYS = frozenset({"certificates", "metadata", "key_file", "cert_file", "ca_file"})


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _resolve(node: Any, loc: tuple[int | str, ...], base: Path, problems: list[str]) -> Any:
    """Resolve ``${ENV}`` / ``${file:path}`` references and make file paths absolute."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if not isinstance(key, str):
                problems.append(f"{_path(loc)}: keys must be strings, got {key!r}")
                continue
            value = _resolve(value, (*loc, key), base, problems)
            if key in _PATH_KEYS:
                value = _absolute_paths(value, base)
            out[key] = value
        return out
    if isinstance(node, list):
        return [_resolve(v, (*loc, i), base, problems) for i, v in enumerate(node)]
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
                    return ""
            if name not in os.environ:
                problems.append(f"{_path(loc)}: environment variable {name!r} is not set")
                return ""
            return os.environ[name]

        return _REFERENCE.sub(substitute, node)
    return node


def _absolute_paths(value: Any, base: Path) -> Any:
    if isinstance(value, str):
        return str(base / value) if not Path(value).is_absolute() else value
    if isinstance(value, list):
        return [_absolute_paths(v, base) for v in value]
    return value


def _message(error: Mapping[str, Any]) -> str:
    msg = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    if error["type"] == "extra_forbidden":
        msg = "unknown key"
    elif error["type"] == "missing":
        msg = "required key is missing"
    return msg


def parse_config(data: Any, base: Path, source: str = "") -> Config:
    """Validate already-parsed YAML data; raise ``ConfigError`` naming every bad key."""
    if not isinstance(data, dict):
        raise ConfigError(["(top level): expected a mapping of settings"], source)
    problems: list[str] = []
    resolved = _resolve(data, (), base, problems)
    if problems:
        raise ConfigError(problems, source)
    try:
        return Config.model_validate(resolved)
    except ValidationError as exc:
        raise ConfigError(
            [f"{_path(tuple(e['loc']))}: {_message(e)}" for e in exc.errors()], source
        ) from None
    except ConfigError as exc:
        raise ConfigError(exc.problems, source) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate one YAML file; every problem is reported at once."""
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
    return parse_config(data, file.resolve().parent, str(file))
