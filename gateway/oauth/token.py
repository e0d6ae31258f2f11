"""An access token as the authorization server issued it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Token:
    access_token: str = field(repr=False)  # never printed, never logged
    expires_in: float  # seconds, as the server said (or the configured default)
    scope: str | None = None
    token_type: str = "Bearer"  # noqa: S105 - a token type name, not a secret
