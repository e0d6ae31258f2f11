"""An upstream that records what reached it on the wire, byte for byte, and answers with
prepared raw responses (a module of its own so several test files can use it).

It parses just enough HTTP/1.1 to find where a request ends (``Content-Length`` or chunked
framing) and decodes nothing else: the body it records is the payload exactly as the
gateway sent it, still compressed when the client compressed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faults.helpers import Backstage, Gateway, gateway_yaml, header_for, issue

from gateway.devkit.authorization_server import FakeAuthorizationServer
from gateway.devkit.idp import DemoIdP

from .helpers import CLIENT_ID, CLIENT_SECRET

_LIMIT = 8 * 1024 * 1024  # longest head or chunk-size line the recorder accepts
_OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class Received:
    """One request as the upstream saw it."""

    head: bytes  # request line and header lines, as sent
    body: bytes = b""  # the payload: de-chunked when chunked, nothing else undone
    complete: bool = False  # the whole body arrived (False: the connection was cut first)

    @property
    def request_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")

    @property
    def target(self) -> str:
        return self.request_line.split(" ")[1]

    @property
    def headers(self) -> list[tuple[str, str]]:
        lines = self.head.rstrip(b"\r\n").split(b"\r\n")[1:]
        pairs = [line.decode("latin-1").partition(":") for line in lines]
        return [(name, value.strip()) for name, _, value in pairs]

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    @property
    def chunked(self) -> bool:
        return any("chunked" in v.lower() for v in self.header("Transfer-Encoding"))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


@dataclass
class RecordingUpstream:
    """Records every request; ``responses`` maps a request target to raw response bytes;
    a request to a target in ``holds`` is answered only once that event is set."""

    responses: dict[str, bytes] = field(default_factory=dict)
    holds: dict[str, asyncio.Event] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=_LIMIT)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.url

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()

    def clear(self) -> None:
        self.received.clear()
        self.connections = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                    return
                request = Received(head)
                self.received.append(request)
                try:
                    await self._read_body(request, reader)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                    return  # cut mid-body: recorded as incomplete
                hold = self.holds.get(request.target)
                if hold is not None:
                    await hold.wait()
                response = self.responses.get(request.target, _OK)
                writer.write(response)
                await writer.drain()
                if b"\r\nconnection: close\r\n" in response.split(b"\r\n\r\n")[0].lower() + b"\r\n":
                    return  # a close-delimited body ends here
        finally:
            self._writers.discard(writer)
            if not writer.transport.is_closing():
                writer.close()

    @staticmethod
    async def _read_body(request: Received, reader: asyncio.StreamReader) -> None:
        if request.chunked:
            parts: list[bytes] = []
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailer fields
                        pass
                    break
                parts.append(await reader.readexactly(size))
                request.body = b"".join(parts)
                if await reader.readexactly(2) != b"\r\n":
                    raise asyncio.IncompleteReadError(b"", 2)  # broken framing
            request.body = b"".join(parts)
        else:
            lengths = request.header("Content-Length")
            length = int(lengths[0]) if lengths else 0
            request.body = await reader.readexactly(length)
        request.complete = True


def chunked(body: bytes, size: int) -> bytes:
    """``body`` in chunked framing, ``size`` bytes a chunk."""
    out = bytearray()
    for start in range(0, len(body), size):
        piece = body[start : start + size]
        out += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    return bytes(out + b"0\r\n\r\n")


def dechunk(framed: bytes) -> bytes:
    """The payload of a chunked body (``framed`` must hold the whole of it)."""
    out = bytearray()
    rest = framed
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            return bytes(out)
        out += rest[:size]
        if rest[size : size + 2] != b"\r\n":
            raise ValueError("broken chunked framing")
        rest = rest[size + 2 :]


@dataclass(frozen=True)
class RawResponse:
    """One response read off a socket: the head as sent and the payload, de-chunked."""

    status: int
    head: bytes
    body: bytes

    def header(self, name: str) -> list[str]:
        lines = self.head.split(b"\r\n")[1:]
        pairs = [line.decode("latin-1").partition(":") for line in lines if line]
        return [value.strip() for key, _, value in pairs if key.lower() == name.lower()]

    @property
    def chunked(self) -> bool:
        return any("chunked" in v.lower() for v in self.header("Transfer-Encoding"))


def parse_response(answer: bytes) -> RawResponse:
    """The one response of a ``Connection: close`` exchange."""
    head, _, payload = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    response = RawResponse(status, head, b"")
    if response.chunked:
        return RawResponse(status, head, dechunk(payload))
    lengths = response.header("Content-Length")
    if lengths and len(payload) != int(lengths[0]):
        raise ValueError(f"{len(payload)} body bytes, {lengths[0]} announced")
    return RawResponse(status, head, payload)


# --- a gateway process in front of a recording upstream --------------------------------------


@dataclass
class Stack:
    gateway: Gateway
    upstream: RecordingUpstream
    backstage: Backstage  # runs the upstream and the authorization server
    auth: FakeAuthorizationServer
    headers: dict[str, str]  # an accepted assertion

    def requests_to(self, target: str) -> list[Received]:
        received = self.upstream.received
        return self.backstage.call(lambda: [r for r in received if r.target == target])


@contextlib.contextmanager
def recorded_gateway(
    idp: DemoIdP, folder: Path, routes: list[dict[str, Any]], **settings: Any
) -> Iterator[Stack]:
    """A real gateway process whose ``routes`` (given their names, prefixes and limits here)
    all lead to one recording upstream; ``settings`` replace top-level config keys."""
    backstage = Backstage()
    auth = FakeAuthorizationServer(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    backstage.run(auth.start())
    upstream = RecordingUpstream()
    url = backstage.run(upstream.start())
    common = {
        "upstream": url,
        "identity_provider": "idp",
        "authorization_server": "as",
        "timeouts": {"connect": 2, "read": 20, "total": 60},
    }
    full = [{**common, **route} for route in routes]
    path = gateway_yaml(folder, auth.token_url, url, idp, routes=full, **settings)
    try:
        with Gateway.running(path) as gateway:
            headers = header_for(issue(idp, auth.token_url))
            yield Stack(gateway, upstream, backstage, auth, headers)
    finally:
        backstage.run(upstream.stop())
        backstage.run(auth.stop())
        backstage.close()
