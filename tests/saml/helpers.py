"""Constants shared by the SAML tests (a uniquely named module, unlike conftest)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from gateway.saml import TrustPolicy

ISSUER = "https://idp.example.test/saml"
AUDIENCE = "https://as.example.test/oauth2/default"
RECIPIENT = "https://as.example.test/oauth2/v1/token"
NOW = datetime.now(UTC).replace(microsecond=0)

PolicyFactory = Callable[..., TrustPolicy]
IssueFn = Callable[..., bytes]
