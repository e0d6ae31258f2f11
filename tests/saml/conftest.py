"""Fixtures for the SAML validator: real keys made at test time, a fixed clock."""

from __future__ import annotations

from datetime import timedelta

import pytest

from gateway.devkit.idp import DemoIdP
from gateway.saml import PinnedKey, TrustPolicy

from .helpers import AUDIENCE, ISSUER, NOW, RECIPIENT, IssueFn, PolicyFactory


@pytest.fixture(scope="session")
def idp() -> DemoIdP:
    return DemoIdP.generate(ISSUER, "rsa")


@pytest.fixture(scope="session")
def ec_idp() -> DemoIdP:
    return DemoIdP.generate(ISSUER, "ec")


@pytest.fixture(scope="session")
def attacker() -> DemoIdP:
    """Another key whose certificate copies the genuine subject name and issuer."""
    return DemoIdP.generate(ISSUER, "rsa")


@pytest.fixture
def make_policy(idp: DemoIdP) -> PolicyFactory:
    def make(*idps: DemoIdP, **overrides: object) -> TrustPolicy:
        keys = tuple(PinnedKey.from_certificate(i.certificate, "test") for i in idps or (idp,))
        fields: dict[str, object] = {
            "keys": keys,
            "issuers": frozenset({ISSUER}),
            "audience": AUDIENCE,
            "recipients": frozenset({RECIPIENT, "https://alias.example.test/token"}),
            "clock_skew": timedelta(seconds=120),
        }
        fields.update(overrides)
        return TrustPolicy(**fields)  # type: ignore[arg-type]

    return make


@pytest.fixture
def policy(make_policy: PolicyFactory) -> TrustPolicy:
    return make_policy()


@pytest.fixture
def issue(idp: DemoIdP) -> IssueFn:
    """``idp.issue`` with the test audience, recipient and clock filled in."""

    def make(subject: str = "alice@example.test", **kwargs: object) -> bytes:
        kwargs.setdefault("audience", AUDIENCE)
        kwargs.setdefault("recipient", RECIPIENT)
        kwargs.setdefault("now", NOW)
        return idp.issue(subject, **kwargs)  # type: ignore[arg-type]

    return make
