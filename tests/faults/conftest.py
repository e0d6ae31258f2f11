"""Fixtures shared by the fault tests: a background loop for the gateway's counterparts and
a signing IdP. The gateway itself always runs as a real process (see ``helpers``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.devkit.idp import DemoIdP

from .helpers import ISSUER, Backstage


@pytest.fixture(scope="module")
def backstage() -> Iterator[Backstage]:
    stage = Backstage()
    yield stage
    stage.close()


@pytest.fixture(scope="module")
def idp() -> DemoIdP:
    return DemoIdP.generate(ISSUER)
