"""The replay rules through the real gateway on loopback: what the fake authorization server
was asked (its call count) and what the client and the upstream got."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.devkit.idp import DemoIdP
from gateway.forward_auth import grant_headers

from .helpers import Parts, Stack, echoed_headers, start_stack

StackFactory = Callable[..., Any]


@pytest.fixture
async def make_stack(tmp_path: Path, idp: DemoIdP, parts: Parts) -> AsyncIterator[StackFactory]:
    stacks: list[Stack] = []

    async def make(**overrides: Any) -> Stack:
        stack = await start_stack(tmp_path, idp, parts, **overrides)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        await stack.session.close()
        await stack.server.close()


def variants(raw: bytes) -> list[dict[str, str]]:
    """Six byte variants of one signed assertion, as headers: each still validates."""
    declaration = b'<?xml version="1.0" encoding="UTF-8"?>'
    encodings = [
        raw,
        raw + b"\n",
        raw + b" \t\n ",
        declaration + raw,
        declaration + b"\n" + raw + b"\n",
        b"<?xml version='1.0'?>\r\n" + raw,
    ]
    return [{"X-SAML-Assertion": base64.b64encode(e).decode()} for e in encodings]


async def get(stack: Stack, path: str, headers: dict[str, str]) -> tuple[int, str | None]:
    """(status, the bearer token the upstream saw, if it echoed one)."""
    async with stack.session.get(f"{stack.url}{path}", headers=headers) as response:
        if response.status == 200 and path.startswith("/echo"):
            seen = echoed_headers(await response.json())
            return 200, seen["authorization"].removeprefix("Bearer ")
        await response.read()
        return response.status, None


async def test_six_byte_variants_cost_one_exchange(make_stack: StackFactory) -> None:
    stack = await make_stack()
    raw = stack.raw_assertion()
    results = [await get(stack, "/echo/x", headers) for headers in variants(raw)]
    assert results == [(200, stack.auth.issued[0])] * 6
    assert stack.auth.calls == 1


async def test_six_byte_variants_after_invalid_grant_cost_one_call(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    stack.auth.mode = "invalid_grant"
    raw = stack.raw_assertion()
    statuses = [(await get(stack, "/hello", headers))[0] for headers in variants(raw)]
    assert statuses == [401] * 6
    assert stack.auth.calls == 1
    assert await stack.metric("gateway_validation_failures_total", reason="invalid_grant") == 6


async def _until_no_longer_served() -> None:
    """The fake AS answers ``expires_in: 1``, of which the gateway serves half."""
    await asyncio.sleep(1.0)


async def test_a_variant_after_the_token_expired_is_not_exchanged_again(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    stack.auth.expires_in = 1  # served half of it: 0.5 s; the assertion is valid for 5 min
    raw = stack.raw_assertion(lifetime=300)
    first, variant = variants(raw)[0], variants(raw)[1]
    assert (await get(stack, "/hello", first))[0] == 200
    await _until_no_longer_served()
    assert (await get(stack, "/hello", variant))[0] == 401
    assert (await get(stack, "/hello", first))[0] == 401
    assert stack.auth.calls == 1  # the authorization server never saw the ID twice
    assert await stack.metric("gateway_validation_failures_total", reason="spent") == 2


async def test_another_signed_assertion_with_a_bound_id_is_a_replay(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    stack.auth.expires_in = 1
    first = stack.assertion("alice@example.test", assertion_id="_bound-id", lifetime=300)
    other = stack.assertion("mallory@example.test", assertion_id="_bound-id", lifetime=300)
    assert (await get(stack, "/hello", first))[0] == 200
    assert (await get(stack, "/hello", other))[0] == 401  # while the token is served
    await _until_no_longer_served()
    assert (await get(stack, "/hello", other))[0] == 401  # and after
    assert stack.auth.calls == 1
    assert await stack.metric("gateway_validation_failures_total", reason="replay") == 2


def _during_skew(stack: Stack) -> dict[str, str]:
    """An assertion whose NotOnOrAfter passed a minute ago: inside the 120 s clock skew."""
    issued = datetime.now(UTC) - timedelta(seconds=360)
    return stack.assertion(now=issued, lifetime=300)


async def test_cap_to_assertion_during_the_skew_exchanges_once(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(cache={"cap_to_assertion": True})
    headers = _during_skew(stack)
    results = [await get(stack, "/echo/x", headers) for _ in range(10)]
    assert results == [(200, stack.auth.issued[0])] * 10
    assert stack.auth.calls == 1


async def test_forward_auth_never_grants_with_max_age_zero(make_stack: StackFactory) -> None:
    stack = await make_stack(
        cache={"cap_to_assertion": True},
        forward_auth={"enabled": True, "path": "/_auth", "front": "nginx"},
    )
    # what config/forward-auth/nginx.conf has nginx send
    nginx = {"X-Original-URI": "/hello", "X-Original-Method": "GET", "X-Forwarded-Host": "gw"}
    headers = {**_during_skew(stack), **nginx}
    for _ in range(3):
        async with stack.session.get(f"{stack.url}/_auth", headers=headers) as r:
            assert r.status == 200
            max_age = int(r.headers["Cache-Control"].removeprefix("max-age="))
        # capped where validation stops accepting the assertion: about a minute from now
        assert 0 < max_age <= 60
    assert stack.auth.calls == 1


def test_under_a_second_left_the_grant_is_not_storable() -> None:
    assert grant_headers("Authorization", "t", 0.9)["Cache-Control"] == "no-store"
    assert grant_headers("Authorization", "t", 0)["Cache-Control"] == "no-store"
    assert grant_headers("Authorization", "t", 1.5)["Cache-Control"] == "max-age=1"
