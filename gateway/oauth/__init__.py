"""Exchange a verified SAML assertion for an OAuth access token: the RFC 7522 bearer grant
(SAML 2.0, or 1.1 as Entra ID takes it) or an RFC 8693 token exchange.

The pure parts (request building, response parsing, client authentication) load eagerly;
``TokenClient`` pulls in aiohttp, so it loads on first use: the core modules that only need
``Token`` (the cache, the validator) stay free of network libraries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.oauth.client_auth import SigningKey, load_signing_key
from gateway.oauth.grant import TokenRequest, build_token_request, parse_token_response
from gateway.values import Token

if TYPE_CHECKING:
    from gateway.oauth.client import TokenClient

__all__ = [
    "SigningKey",
    "Token",
    "TokenClient",
    "TokenRequest",
    "build_token_request",
    "load_signing_key",
    "parse_token_response",
]


def __getattr__(name: str) -> Any:
    if name == "TokenClient":
        from gateway.oauth.client import TokenClient

        return TokenClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
