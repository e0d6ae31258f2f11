"""forward_auth.front / original_request_headers: the gateway must know who speaks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.forward_auth import PRESETS, sources

CERT = Path(__file__).resolve().parents[2] / "config" / "certs" / "example-idp.pem"


def config(forward_auth: dict[str, Any], base: Path) -> Any:
    (base / "idp.pem").write_text(CERT.read_text())
    return parse_config(
        {
            "identity_providers": {"idp": {"issuer": "https://idp", "certificates": ["idp.pem"]}},
            "authorization_servers": {
                "as": {
                    "token_url": "https://as/token",
                    "client_id": "c",
                    "client_secret": "s",
                    "audience": "https://as",
                }
            },
            "routes": [
                {
                    "upstream": "http://127.0.0.1:9000",
                    "identity_provider": "idp",
                    "authorization_server": "as",
                }
            ],
            "forward_auth": forward_auth,
        },
        base,
    )


def problems(forward_auth: dict[str, Any], base: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config(forward_auth, base)
    return info.value.problems


def test_enabled_without_a_front_is_a_startup_error(tmp_path: Path) -> None:
    (problem,) = problems({"enabled": True}, tmp_path)
    assert problem.startswith("forward_auth: 'front' is required when enabled")


def test_front_and_explicit_headers_exclude_each_other(tmp_path: Path) -> None:
    explicit = {"uri": "X-Original-URI", "host": "X-Forwarded-Host"}
    settings = {"enabled": True, "front": "nginx", "original_request_headers": explicit}
    assert problems(settings, tmp_path) == [
        "forward_auth: set 'front' or 'original_request_headers', not both"
    ]


def test_unknown_front_and_bad_header_names_name_their_key(tmp_path: Path) -> None:
    (problem,) = problems({"enabled": True, "front": "haproxy"}, tmp_path)
    assert problem.startswith("forward_auth.front: ")
    bad = {"uri": "X Original", "host": "Host"}
    assert problems({"enabled": True, "original_request_headers": bad}, tmp_path) == [
        "forward_auth.original_request_headers.uri: expected a header name or ':path', "
        "got 'X Original'"
    ]
    (missing,) = problems({"enabled": True, "original_request_headers": {"uri": ":path"}}, tmp_path)
    assert missing == "forward_auth.original_request_headers.host: required key is missing"


def test_disabled_needs_no_front(tmp_path: Path) -> None:
    assert config({"enabled": False}, tmp_path).forward_auth.front is None


@pytest.mark.parametrize("front", sorted(PRESETS))
def test_each_front_has_a_preset(tmp_path: Path, front: str) -> None:
    settings = config({"enabled": True, "front": front}, tmp_path).forward_auth
    assert sources(settings) == PRESETS[front]  # type: ignore[index]
