"""Bodies cross the gateway byte-exact both ways: nothing decompressed, re-encoded or cut.

A real gateway process between a real client and an upstream that records the bytes it got
(``wire.RecordingUpstream``); every check is on what reached the other side: the sha256 of
the payload and the headers that describe it.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import zlib
from collections.abc import AsyncIterator, Callable, Iterator

import aiohttp
import pytest
from faults.helpers import client_session, raw_exchange

from gateway.devkit.idp import DemoIdP

from .wire import Stack, chunked, parse_response, recorded_gateway

MB = 1024 * 1024
SMALL_LIMIT = 64 * 1024  # max_body_size of the /small route


def _brotli() -> Callable[[bytes], bytes] | None:
    try:
        import brotli
    except ImportError:
        return None
    return functools.partial(brotli.compress, quality=5)


BROTLI = _brotli()
ENCODERS: dict[str, Callable[[bytes], bytes] | None] = {
    "gzip": functools.partial(gzip.compress, mtime=0),
    "deflate": zlib.compress,  # HTTP's deflate is the zlib format
    "br": BROTLI,
}


@functools.cache
def plain(kind: str, size: int) -> bytes:
    if kind == "random":
        return os.urandom(size)
    return (b"compressible " * (size // 13 + 1))[:size]


@functools.cache
def encoded(encoding: str, kind: str, size: int) -> bytes:
    encoder = ENCODERS[encoding]
    if encoder is None:
        pytest.skip("no brotli encoder installed (pip install brotli)")
    return encoder(plain(kind, size))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def stack(idp: DemoIdP, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    routes = [
        {"name": "small", "path_prefix": "/small", "max_body_size": SMALL_LIMIT},
        {"name": "bodies", "path_prefix": "/", "max_body_size": 32 * MB},
    ]
    with recorded_gateway(idp, tmp_path_factory.mktemp("bodies"), routes) as running:
        yield running


async def pieces(body: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def upload(
    stack: Stack, target: str, body: bytes, encoding: str, framing: str
) -> tuple[int, bytes]:
    headers = {
        **stack.headers,
        "Content-Encoding": encoding,
        "Content-Type": "application/octet-stream",
    }
    # bytes go with a Content-Length (in a BytesIO, which aiohttp sends without blocking);
    # an async iterable goes chunked
    data = io.BytesIO(body) if framing == "fixed" else pieces(body)
    async with client_session() as session:
        async with session.post(stack.gateway.url + target, headers=headers, data=data) as r:
            return r.status, await r.read()


SIZES = {"small": 3000, "20MB": 20 * MB}


@pytest.mark.parametrize("framing", ["fixed", "chunked"])
@pytest.mark.parametrize("kind", ["random", "compressible"])
@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("encoding", sorted(ENCODERS))
async def test_compressed_upload_reaches_the_upstream_byte_exact(
    stack: Stack, encoding: str, size: str, kind: str, framing: str
) -> None:
    body = encoded(encoding, kind, SIZES[size])
    target = f"/up/{encoding}/{size}/{kind}/{framing}"
    status, answer = await upload(stack, target, body, encoding, framing)
    assert (status, answer) == (200, b"ok")
    [got] = stack.requests_to(target)
    assert got.complete
    assert (len(got.body), got.sha256) == (len(body), sha(body))
    assert got.header("Content-Encoding") == [encoding]
    assert got.header("Content-Type") == ["application/octet-stream"]
    if framing == "fixed":
        assert got.header("Content-Length") == [str(len(body))]
        assert not got.chunked
    else:
        assert got.header("Content-Length") == []
        assert got.chunked


@pytest.mark.parametrize("framing", ["fixed", "chunked"])
async def test_body_over_the_limit_on_the_wire_is_413_and_never_reaches_the_upstream(
    stack: Stack, framing: str
) -> None:
    body = encoded("gzip", "random", 2 * SMALL_LIMIT)  # random data does not shrink
    assert len(body) > SMALL_LIMIT
    target = f"/small/over/{framing}"
    status, _ = await upload(stack, target, body, "gzip", framing)
    assert status == 413
    received = stack.requests_to(target)
    if framing == "fixed":
        assert received == []  # refused on its Content-Length, before any upstream work
    else:
        # Streamed as it arrives; the upstream request is abandoned before its last chunk,
        # so the upstream never takes a cut body for a whole one.
        assert all(not r.complete for r in received)


@pytest.mark.parametrize("framing", ["fixed", "chunked"])
@pytest.mark.parametrize("encoding", sorted(ENCODERS))
async def test_body_under_the_limit_that_inflates_past_it_passes_untouched(
    stack: Stack, encoding: str, framing: str
) -> None:
    body = encoded(encoding, "compressible", 11 * MB)
    assert len(body) < SMALL_LIMIT < 11 * MB
    target = f"/small/inflate/{encoding}/{framing}"
    status, _ = await upload(stack, target, body, encoding, framing)
    assert status == 200
    [got] = stack.requests_to(target)
    assert got.complete and got.sha256 == sha(body)
    assert got.header("Content-Encoding") == [encoding]


# --- responses -------------------------------------------------------------------------


def _response(encoding: str, payload: bytes, framing: str) -> bytes:
    head = (
        "HTTP/1.1 200 OK\r\n"
        "Content-Type: application/json; charset=iso-8859-1\r\n"
        f"Content-Encoding: {encoding}\r\n"
    )
    if framing == "fixed":
        return (head + f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
    return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + chunked(payload, 10_000)


RESPONSE_SIZES = {"small": 2000, "large": 3 * MB}  # read whole / streamed by the gateway


@pytest.mark.parametrize("framing", ["fixed", "chunked"])
@pytest.mark.parametrize("kind", ["random", "compressible"])
@pytest.mark.parametrize("size", sorted(RESPONSE_SIZES))
@pytest.mark.parametrize("encoding", sorted(ENCODERS))
def test_compressed_response_reaches_the_client_byte_exact(
    stack: Stack, encoding: str, size: str, kind: str, framing: str
) -> None:
    payload = encoded(encoding, kind, RESPONSE_SIZES[size])
    target = f"/down/{encoding}/{size}/{kind}/{framing}"
    raw = _response(encoding, payload, framing)
    stack.backstage.call(lambda: stack.upstream.responses.__setitem__(target, raw))
    assertion = "".join(f"{k}: {v}\r\n" for k, v in stack.headers.items())
    request = (
        f"GET {target} HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n"
        f"Accept-Encoding: identity\r\n{assertion}\r\n"
    )
    answer = parse_response(raw_exchange(stack.gateway.port, request.encode(), timeout=30))
    assert answer.status == 200
    assert (len(answer.body), sha(answer.body)) == (len(payload), sha(payload))
    assert answer.header("Content-Encoding") == [encoding]
    assert answer.header("Content-Type") == ["application/json; charset=iso-8859-1"]
    if framing == "fixed":
        assert answer.header("Content-Length") == [str(len(payload))]
    else:
        assert answer.chunked  # an unknown length stays streamed
    # the client's Accept-Encoding is the upstream's business, passed on unchanged
    [got] = stack.requests_to(target)
    assert got.header("Accept-Encoding") == ["identity"]


async def test_client_aiohttp_sees_the_same_bytes(stack: Stack) -> None:
    """The same through an ordinary client with decompression off (a sanity check of the
    raw-socket reading above)."""
    payload = encoded("gzip", "compressible", 100_000)
    target = "/down/sanity"
    raw = _response("gzip", payload, "fixed")
    stack.backstage.call(lambda: stack.upstream.responses.__setitem__(target, raw))
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.get(stack.gateway.url + target, headers=stack.headers) as r:
            assert r.status == 200
            assert sha(await r.read()) == sha(payload)


# --- what cannot cross unchanged is refused, never altered ------------------------------


def ask(stack: Stack, target: str, extra: bytes = b"", body: bytes = b"") -> bytes:
    """One raw request through the gateway (with the accepted assertion); the raw answer."""
    assertion = "".join(f"{k}: {v}\r\n" for k, v in stack.headers.items()).encode()
    head = f"POST {target} HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n".encode()
    return raw_exchange(stack.gateway.port, head + assertion + extra + b"\r\n" + body)


def test_unlabelled_response_gets_no_content_type(stack: Stack) -> None:
    """aiohttp would label it application/octet-stream: browsers then download what they
    would have sniffed and shown."""
    for size in (10, 200_000):  # read whole / streamed
        target = f"/down/untyped/{size}"
        raw = f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode() + b"x" * size
        stack.backstage.call(lambda t=target, r=raw: stack.upstream.responses.__setitem__(t, r))
        answer = parse_response(ask(stack, target, b"Content-Length: 0\r\n"))
        assert (answer.status, len(answer.body)) == (200, size)
        assert answer.header("Content-Type") == []
        assert answer.header("Server") == []  # nor a Server the upstream did not send


def test_close_delimited_compressed_response_is_relayed_whole(stack: Stack) -> None:
    payload = encoded("gzip", "random", 300_000)
    target = "/down/close-delimited"
    raw = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nConnection: close\r\n\r\n" + payload
    stack.backstage.call(lambda: stack.upstream.responses.__setitem__(target, raw))
    answer = parse_response(ask(stack, target, b"Content-Length: 0\r\n"))
    assert answer.status == 200 and answer.chunked  # re-framed, the payload untouched
    assert sha(answer.body) == sha(payload)
    assert answer.header("Content-Encoding") == ["gzip"]


def test_request_with_a_transfer_coding_other_than_chunked_is_501(stack: Stack) -> None:
    """The gzip transfer coding would be lost with the chunked framing: the upstream would
    get gzip bytes labelled as nothing."""
    target = "/up/transfer-coding"
    framed = chunked(gzip.compress(b"hello", mtime=0), 8)
    answer = ask(stack, target, b"Transfer-Encoding: gzip, chunked\r\n", framed)
    assert parse_response(answer).status == 501
    assert stack.requests_to(target) == []


def test_request_with_a_folded_header_is_refused(stack: Stack) -> None:
    target = "/up/folded"
    answer = ask(stack, target, b"X-Folded: a\r\n  b\r\nContent-Length: 0\r\n")
    assert parse_response(answer).status == 400
    assert stack.requests_to(target) == []


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nX-Name: caf\xe9\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    ],
    ids=["latin-1-header", "gzip-transfer-coding"],
)
def test_response_that_cannot_be_relayed_as_sent_is_502(stack: Stack, raw: bytes) -> None:
    """Before: the header lost its non-UTF-8 byte, the transfer coding reached the client
    undone and unlabelled."""
    target = f"/down/unrelayable/{hashlib.sha256(raw).hexdigest()[:8]}"
    stack.backstage.call(lambda: stack.upstream.responses.__setitem__(target, raw))
    assert parse_response(ask(stack, target, b"Content-Length: 0\r\n")).status == 502
