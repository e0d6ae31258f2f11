"""A real upstream HTTP server for tests, benchmarks and the demo: echoes, streams, misbehaves.

Endpoints (any host, loopback by default):
    /echo...            any method and path → JSON: method, raw_path, query, headers, body_length
    /bytes/{n}          n bytes streamed in 64 KiB chunks (deterministic pattern)
    /upload             consumes a streamed body → JSON: length, sha256
    /gzip               a pre-gzipped JSON body with ``Content-Encoding: gzip``
    /status/{code}      an empty answer with that status
    /redirect           302 to /echo/redirected
    /slow/{seconds}     answers after a delay
    /ws                 WebSocket echo; the text ``close:<code>`` makes it close with that code,
                        ``drop`` makes it vanish without a close frame
    /unauthorized       401 with ``WWW-Authenticate: Bearer error="invalid_token"``
    /hello              a tiny text answer, for benchmarks
    /truncated          promises 1 MiB, sends 64 KiB, then drops the connection

It keeps what tests look at: the last request's headers, a request count, and how far the
current upload and download have got (to prove that a proxy streams instead of buffering).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import ssl
from typing import Final

from aiohttp import WSMsgType, web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict, CIMultiDictProxy

CHUNK: Final = 64 * 1024
_PATTERN: Final = bytes(range(256)) * (CHUNK // 256)
GZIP_PLAIN: Final = json.dumps({"compressed": True, "padding": "x" * 2000}).encode()
# mtime=0 keeps the compressed bytes identical from run to run
GZIP_BODY: Final = gzip.compress(GZIP_PLAIN, mtime=0)
_MAX_SLOW: Final = 60.0


def pattern_bytes(n: int) -> bytes:
    """The exact bytes ``/bytes/{n}`` sends (for comparison in tests)."""
    whole, rest = divmod(n, CHUNK)
    return _PATTERN * whole + _PATTERN[:rest]


class UpstreamApp:
    """The upstream; ``start()`` returns its base URL (``http://127.0.0.1:<port>``)."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl = ssl_context
        self._runner: web.AppRunner | None = None
        self.base_url = ""  # set by start()
        self.requests = 0
        self.last_headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
        self.last_raw_path = ""
        self.upload_received = 0  # bytes of the current /upload read so far
        self.upload_started = asyncio.Event()
        self.downloads_finished = 0  # /bytes responses written completely
        self.ws_closed_codes: list[int | None] = []

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application(middlewares=[self._record], client_max_size=1024**3)
        app.router.add_route("*", "/echo{tail:.*}", self._echo)
        app.router.add_get("/bytes/{n:\\d+}", self._bytes)
        app.router.add_route("*", "/upload", self._upload)
        app.router.add_get("/gzip", self._gzip)
        app.router.add_route("*", "/status/{code:\\d{3}}", self._status)
        app.router.add_get("/redirect", self._redirect)
        app.router.add_get("/slow/{seconds}", self._slow)
        app.router.add_get("/ws", self._ws)
        app.router.add_route("*", "/unauthorized", self._unauthorized)
        app.router.add_get("/hello", self._hello)
        app.router.add_get("/truncated", self._truncated)
        # handler_cancellation: a client that gives up (a proxy's timeout) ends the handler,
        # so /slow does not hold the server open at shutdown.
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=self._ssl)
        await site.start()
        bound_port = self._runner.addresses[0][1]  # the real port when port 0 was asked for
        scheme = "https" if self._ssl is not None else "http"
        self.base_url = f"{scheme}://{host}:{bound_port}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests += 1
        self.last_headers = request.headers
        self.last_raw_path = request.raw_path
        return await handler(request)

    async def _echo(self, request: web.Request) -> web.Response:
        length = 0
        async for chunk in request.content.iter_any():
            length += len(chunk)
        body = {
            "method": request.method,
            "raw_path": request.raw_path,
            "query": request.query_string,
            "headers": [[name, value] for name, value in request.headers.items()],
            "body_length": length,
        }
        return web.json_response(body)

    async def _bytes(self, request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = n
        await response.prepare(request)
        if request.method == "HEAD":  # aiohttp would put written bytes on the wire regardless
            await response.write_eof()
            return response
        whole, rest = divmod(n, CHUNK)
        for _ in range(whole):
            await response.write(_PATTERN)
        if rest:
            await response.write(_PATTERN[:rest])
        await response.write_eof()
        self.downloads_finished += 1
        return response

    async def _upload(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        self.upload_received = 0
        async for chunk in request.content.iter_any():
            self.upload_received += len(chunk)
            digest.update(chunk)
            self.upload_started.set()
        return web.json_response({"length": self.upload_received, "sha256": digest.hexdigest()})

    async def _gzip(self, request: web.Request) -> web.Response:
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
        return web.Response(body=GZIP_BODY, headers=headers)

    async def _status(self, request: web.Request) -> web.Response:
        status = int(request.match_info["code"])
        headers = {"ETag": '"v1"'} if status == 304 else {}
        return web.Response(status=status, headers=headers)

    async def _redirect(self, request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "/echo/redirected"})

    async def _slow(self, request: web.Request) -> web.Response:
        try:
            seconds = min(float(request.match_info["seconds"]), _MAX_SLOW)
        except ValueError:
            raise web.HTTPBadRequest(text="seconds must be a number") from None
        await asyncio.sleep(seconds)
        return web.Response(text="slow")

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("chat",))
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                if msg.data == "drop" and request.transport is not None:
                    request.transport.close()  # gone without a close frame
                    break
                if msg.data.startswith("close:"):
                    await ws.close(code=int(msg.data.removeprefix("close:")), message=b"bye")
                    break
                await ws.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        self.ws_closed_codes.append(ws.close_code)
        return ws

    async def _unauthorized(self, request: web.Request) -> web.Response:
        challenge = 'Bearer realm="upstream", error="invalid_token"'
        return web.Response(status=401, headers={"WWW-Authenticate": challenge})

    async def _hello(self, request: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def _truncated(self, request: web.Request) -> web.StreamResponse:
        # ?length=N announces N bytes (default 16 chunks) and sends about half of them.
        announced = int(request.query.get("length", 16 * CHUNK))
        response = web.StreamResponse()
        response.content_length = announced
        await response.prepare(request)
        await response.write(_PATTERN[: max(1, announced // 2)])
        if request.transport is not None:
            request.transport.close()
        return response
