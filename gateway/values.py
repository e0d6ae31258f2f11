"""Plain values the layers share (as h11's events and httpcore's models): the oauth client
returns them, the cache keeps them, the pipeline forwards them. Nothing here imports from
``gateway``, so every layer may import this module without climbing the stack."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Token:
    """An access token as the authorization server issued it."""

    access_token: str = field(repr=False)  # never printed, never logged
    expires_in: float  # seconds, as the server said (or the configured default)
    scope: str | None = None
    token_type: str = "Bearer"  # noqa: S105 - a token type name, not a secret
