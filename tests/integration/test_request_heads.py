"""Every request head on a connection is bounded, pipelined or not (a real gateway process).

Before: the bound counted only bytes that arrived while no request was in the handler, so a
second head sent behind a slow first request was never counted; a head of several MB was
parsed, kept in memory and forwarded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from faults.helpers import raw_exchange

from gateway.devkit.idp import DemoIdP

from .wire import Stack, recorded_gateway

PAD_LINE = 60_000  # each header line within the per-line limit (sized for an assertion)
PAD_LINES = 95  # together far over the whole-head limit (one such line plus 64 KiB)


@pytest.fixture(scope="module")
def stack(idp: DemoIdP, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with recorded_gateway(idp, tmp_path_factory.mktemp("heads"), [{"name": "api"}]) as running:
        yield running


def head(stack: Stack, target: str, padding: int = 0) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: gw.test"]
    lines += [f"{name}: {value}" for name, value in stack.headers.items()]
    lines += [f"X-Pad-{i}: " + "a" * PAD_LINE for i in range(padding)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def send_pipelined(stack: Stack, first: bytes, second: bytes) -> tuple[bool, bytes]:
    """``first``, then (while it is in the handler) ``second`` on the same connection;
    whether the gateway closed the connection, and what it answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.gateway.port)
    answer = b""
    try:
        writer.write(first)
        await writer.drain()
        # The first request is in the handler once the upstream holds it.
        deadline = time.monotonic() + 10
        while not stack.requests_to("/hold"):
            assert time.monotonic() < deadline, "the first request never reached the upstream"
            await asyncio.sleep(0.02)
        for start in range(0, len(second), 64 * 1024):
            writer.write(second[start : start + 64 * 1024])
            await writer.drain()
        async with asyncio.timeout(20):  # a timeout here means the head was kept: a failure
            answer = await reader.read()
        closed = True
    except ConnectionError:  # the cut may come at any write
        closed = True
    except TimeoutError:
        closed = False
    finally:
        writer.close()
    return closed, answer


async def test_a_pipelined_oversize_head_is_refused_and_never_forwarded(stack: Stack) -> None:
    hold = stack.backstage.call(lambda: stack.upstream.holds.setdefault("/hold", asyncio.Event()))
    try:
        second = head(stack, "/second", padding=PAD_LINES)
        assert len(second) > 5 * 1024 * 1024
        closed, answer = await send_pipelined(stack, head(stack, "/hold"), second)
        assert closed
        assert b"/second" not in answer and b"HTTP/1.1 200" not in answer
    finally:
        stack.backstage.call(hold.set)
    # The held first request completes upstream; the head behind it never follows it there.
    await asyncio.sleep(2)  # a bounded wait for something that must not happen
    assert stack.requests_to("/second") == []
    assert len(stack.requests_to("/hold")) == 1


async def test_pipelined_heads_within_the_limit_are_all_served(stack: Stack) -> None:
    """The bound is per head: many ordinary requests in one write are no oversize head."""
    data = b"".join(head(stack, f"/many/{i}") for i in range(40))
    data += head(stack, "/many/last").replace(
        b"Host: gw.test", b"Host: gw.test\r\nConnection: close"
    )
    answers = raw_exchange(stack.gateway.port, data, timeout=30)
    assert answers.count(b"HTTP/1.1 200 OK") == 41
    assert all(len(stack.requests_to(f"/many/{i}")) == 1 for i in range(40))


def test_a_large_head_within_the_limit_behind_a_request_is_served(stack: Stack) -> None:
    """Just under the bound (one assertion-sized line plus 64 KiB), pipelined: served."""
    second = head(stack, "/large", padding=1).replace(
        b"Host: gw.test", b"Host: gw.test\r\nConnection: close"
    )
    answers = raw_exchange(stack.gateway.port, head(stack, "/small") + second, timeout=30)
    assert answers.count(b"HTTP/1.1 200 OK") == 2
    [got] = stack.requests_to("/large")
    assert got.header("X-Pad-0") == ["a" * PAD_LINE]
