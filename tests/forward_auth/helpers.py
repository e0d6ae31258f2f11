"""Fronts in front of the gateway: reuse the integration suite's fixtures, plus a second IdP
for the layouts where two routes trust two identity providers."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from integration.helpers import (  # the signing IdP, authorization server and upstream
    AUDIENCE,
    ISSUER,
    Stack,
    idp,  # noqa: F401 - re-exported as a fixture here
    parts,  # noqa: F401 - re-exported as a fixture here
)

from gateway.devkit.idp import DemoIdP

PARTNER_ISSUER = "https://partner-idp.test/saml"


@pytest.fixture(scope="session")
def partner_idp() -> DemoIdP:
    return DemoIdP.generate(PARTNER_ISSUER)


def two_routes(
    folder: Path, partner: DemoIdP, upstream: str, *, public: str, admin: str
) -> dict[str, Any]:
    """Gateway settings with route ``public`` (prefix ``public``) trusting the suite's IdP
    and route ``admin`` (prefix ``admin``) trusting ``partner``, one authorization server."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "partner.pem").write_bytes(partner.certificate_pem)
    route = {"upstream": upstream, "authorization_server": "as"}
    return {
        "identity_providers": {
            "idp": {"issuer": ISSUER, "certificates": ["idp.pem"]},
            "partner": {"issuer": PARTNER_ISSUER, "certificates": ["partner.pem"]},
        },
        "routes": [
            {
                **route,
                **{"name": "public", "path_prefix": public, "identity_provider": "idp"},
                "realm": "test-api",
            },
            {
                **route,
                **{"name": "admin", "path_prefix": admin, "identity_provider": "partner"},
                "realm": "test-admin",
            },
        ],
    }


def signed_by(issuer: DemoIdP, stack: Stack, subject: str = "pat@partner.test") -> dict[str, str]:
    """An assertion header signed by ``issuer`` for the stack's authorization server."""
    raw = issuer.issue(
        subject, audience=AUDIENCE, recipient=stack.auth.token_url, now=datetime.now(UTC)
    )
    return {"X-SAML-Assertion": base64.b64encode(raw).decode()}
