"""A gateway configuration for parts running on loopback: the demo, the tests, the benchmarks.

One identity provider (``idp``), one authorization server (``as``) and one route (``api``),
written as a YAML file the way an operator would: the IdP certificate and the client secret
sit beside it, and the config refers to the secret with ``${file:client-secret}``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml


def write_loopback_config(
    folder: Path,
    *,
    certificate_pem: bytes,
    issuer: str,
    token_url: str,
    client_id: str,
    client_secret: str,
    audience: str,
    upstream: str,
    port: int = 0,
    admin_port: int = 0,
    server: Mapping[str, Any] | None = None,
    route: Mapping[str, Any] | None = None,
    **settings: Any,
) -> Path:
    """Write ``gateway.yaml`` (and its certificate and secret files) into ``folder``.

    ``server`` and ``route`` add to or replace keys of the one authorization server and the
    one route; any other keyword replaces a top-level key (``cache=...``, ``workers=...``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "idp.pem").write_bytes(certificate_pem)
    secret = folder / "client-secret"
    secret.write_text(client_secret)
    os.chmod(secret, 0o600)
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "lifecycle": {"shutdown_grace": 0, "drain_timeout": 5},
        "identity_providers": {"idp": {"issuer": issuer, "certificates": ["idp.pem"]}},
        "authorization_servers": {
            "as": {
                "token_url": token_url,
                "client_id": client_id,
                "client_secret": "${file:client-secret}",
                "audience": audience,
                **(server or {}),
            }
        },
        "routes": [
            {
                "name": "api",
                "path_prefix": "/",
                "upstream": upstream,
                "identity_provider": "idp",
                "authorization_server": "as",
                **(route or {}),
            }
        ],
    }
    config.update(settings)
    path = folder / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
