"""Fixtures for the token cache tests (plain helpers live in helpers.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.devkit.authorization_server import FakeAuthorizationServer


@pytest.fixture
async def fake_as() -> AsyncIterator[FakeAuthorizationServer]:
    """A fake AS that refuses a second use of an assertion ID (so a 2nd exchange shows)."""
    server = FakeAuthorizationServer(one_time_use=True)
    await server.start()
    yield server
    await server.stop()
