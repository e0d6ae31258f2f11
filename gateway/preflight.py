"""One check of a configuration file, shared by ``check-config`` and ``run``.

Rules this module owns:
- What ``run`` would refuse, ``check-config`` refuses: the pure rules live next to their
  models in ``gateway.config`` (URLs, Redis sealing keys, clear-text credentials, client
  authentication combinations, route references); the rules that read files (IdP
  certificates and metadata, client signing keys, upstream TLS files) are the very code
  the running gateway uses, called here once per section.
- Every problem in the file is reported in one pass, each with its key path: a section
  that fails validation does not hide the file checks of the sections that pass.
"""

from __future__ import annotations

import os
import ssl

from gateway.config import (
    AssertionSettings,
    AuthorizationServer,
    Config,
    ConfigParts,
    RedisSettings,
    parse_config,
    read_config_file,
)
from gateway.errors import ConfigError
from gateway.oauth.client import TokenClient
from gateway.proxy.tls import tls_context
from gateway.saml.keys import build_trust_policy

# A trust policy is built from an IdP and a server; only the IdP's keys are checked here.
_ANY_SERVER = AuthorizationServer(
    token_url="https://127.0.0.1/",  # noqa: S106 - a URL, not a password
    audience="-",
    client_auth="none",
)


def preflight(path: str | os.PathLike[str]) -> Config:
    """The configuration in ``path``; raises ``ConfigError`` listing every problem in it."""
    source = str(path)
    data, base = read_config_file(path)  # unreadable or not YAML: nothing more to check
    problems: list[str] = []
    try:
        config: Config | None = parse_config(data, base, source)
    except ConfigError as exc:
        problems += exc.problems
        config = None
    parts = ConfigParts.of(config) if config is not None else ConfigParts.salvage(data, base)
    problems += file_problems(parts)
    if problems or config is None:
        raise ConfigError(problems, source)
    return config


def file_problems(parts: ConfigParts) -> list[str]:
    """What the files a configuration names would make the running gateway refuse."""
    problems: list[str] = []
    for name, idp in parts.identity_providers.items():
        try:
            build_trust_policy(idp, _ANY_SERVER, AssertionSettings(), idp_name=name)
        except ConfigError as exc:
            problems += exc.problems
    try:
        # Loads every private_key_jwt key and checks each profile; opens no connection.
        TokenClient(parts.authorization_servers)
    except ConfigError as exc:
        problems += exc.problems
    for i, route in sorted(parts.routes.items()):
        if route.upstream.lower().startswith("https:"):
            try:
                tls_context(route.tls, f"routes[{i}].tls")
            except ConfigError as exc:
                problems += exc.problems
    if parts.redis is not None:
        problems += redis_tls_problems(parts.redis)
    return problems


def redis_tls_problems(redis: RedisSettings) -> list[str]:
    """The Redis TLS files as the client will load them: a CA bundle that holds no
    certificate, or a client certificate and key that are not a pair, fail here and not at
    the first connection (where the store would only log them and run without Redis)."""
    context = ssl.create_default_context()
    problems = []
    if redis.ca_file is not None:
        try:
            context.load_verify_locations(cafile=redis.ca_file)
        except ssl.SSLError as exc:
            problems.append(f"cache.redis.ca_file: not a PEM CA bundle ({exc.reason or exc})")
    if redis.cert_file is not None and redis.key_file is not None:
        try:
            context.load_cert_chain(redis.cert_file, redis.key_file)
        except ssl.SSLError as exc:
            problems.append(
                "cache.redis.cert_file: the certificate and key_file do not load as a pair "
                f"({exc.reason or exc})"
            )
    return problems
