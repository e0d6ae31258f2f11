"""WebSocket through the gateway: the upstream handshake is the gateway's, frames pass as sent.

Rules this module owns:
- Only a well-formed handshake is relayed as one; a malformed one is the plain GET it is.
- The gateway's handshake with the upstream is its own: the client's key, version and
  extension offers belong to the client's handshake with us; the subprotocols offered are
  passed on and the upstream's choice is the client's answer.
- An upstream that answers the upgrade with an ordinary response is ``UpgradeRefused``:
  that answer is relayed as HTTP (``forward``), not here.
- Messages pass both ways until one side closes; its close code reaches the other side
  (a code that may not appear in a close frame becomes 1000, a lost connection 1001/1014).
  The route's ``websocket_idle`` and ``websocket_lifetime`` are the only bounds: past
  either, both sides are closed with 1001.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from multidict import CIMultiDict, MultiMapping

from gateway.errors import UpstreamError
from gateway.proxy.upstream import UpstreamCall, upstream_failure

CLOSE_TIMEOUT: Final = 5.0  # how long a close handshake may take on either side
_MAX_MESSAGE: Final = 16 * 1024 * 1024
_HANDSHAKE_HEADERS: Final = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-accept",
        "sec-websocket-protocol",
    }
)
# Close codes that may appear in a close frame (RFC 6455 §7.4); 1005/1006/1015 may not.
_SENDABLE_CLOSE: Final = frozenset({*range(1000, 1004), *range(1007, 1015), *range(3000, 5000)})

_Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


class UpgradeRefused(Exception):
    """The upstream answered the upgrade with an ordinary response (status 200 or more)."""

    def __init__(self, status: int, headers: MultiMapping[str], elapsed: float) -> None:
        super().__init__(status)
        self.status = status
        self.headers = headers
        self.elapsed = elapsed


def wants_websocket(request: web.BaseRequest) -> bool:
    """Whether ``request`` is a well-formed WebSocket handshake (relayed as one)."""
    if request.method != "GET":
        return False
    upgrade = request.headers.get("Upgrade", "").lower()
    if not upgrade:
        return False
    connection = {t.strip().lower() for t in request.headers.get("Connection", "").split(",")}
    if "websocket" not in upgrade or "upgrade" not in connection:
        return False
    return web.WebSocketResponse().can_prepare(request).ok


async def relay_websocket(
    call: UpstreamCall, open_sockets: set[aiohttp.ClientWebSocketResponse]
) -> tuple[web.WebSocketResponse, float]:
    """Open the upstream socket, answer the client's handshake, relay until either closes.

    Returns the client's socket (closed by then) and the seconds the upstream handshake
    took. ``open_sockets`` holds the upstream socket while it is open, so a closing
    gateway can close it. Raises ``UpgradeRefused``, or a ``GatewayError`` when the
    handshake fails on either side.
    """
    started = time.monotonic()
    upstream_ws = await _connect(call, started)
    elapsed = time.monotonic() - started

    open_sockets.add(upstream_ws)
    try:
        chosen = (upstream_ws.protocol,) if upstream_ws.protocol else ()
        client_ws = web.WebSocketResponse(
            protocols=chosen,
            autoclose=True,
            autoping=True,
            max_msg_size=_MAX_MESSAGE,
            timeout=CLOSE_TIMEOUT,
        )
        client_ws.headers.update(call.answer_headers)
        try:
            await client_ws.prepare(call.request)
        except (ConnectionError, web.HTTPException):
            await upstream_ws.close(code=WSCloseCode.GOING_AWAY)
            raise UpstreamError("client_websocket_handshake", "client went away") from None
        plan = call.plan
        await _MessageRelay(
            client_ws, upstream_ws, plan.websocket_idle, plan.websocket_lifetime
        ).run()
    finally:
        open_sockets.discard(upstream_ws)
        await upstream_ws.close()
    return client_ws, elapsed


async def _connect(call: UpstreamCall, started: float) -> aiohttp.ClientWebSocketResponse:
    """The gateway's own handshake with the upstream, offering the client's subprotocols."""
    headers = call.headers
    for name in list(headers.keys()):
        if name.lower() in _HANDSHAKE_HEADERS:
            del headers[name]
    offered = tuple(
        protocol.strip()
        for value in call.request.headers.getall("Sec-WebSocket-Protocol", [])
        for protocol in value.split(",")
        if protocol.strip()
    )
    try:
        async with asyncio.timeout(call.plan.handshake_timeout):
            return await call.session.ws_connect(
                call.url,
                headers=headers,
                protocols=offered,
                ssl=call.plan.ssl,
                autoclose=True,
                autoping=True,
                max_msg_size=_MAX_MESSAGE,
                timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT),
            )
    except aiohttp.WSServerHandshakeError as exc:
        elapsed = time.monotonic() - started
        if exc.status < 200:
            raise UpstreamError("upstream_websocket_handshake", exc.message) from None
        refused_headers = exc.headers if exc.headers is not None else CIMultiDict[str]()
        raise UpgradeRefused(exc.status, refused_headers, elapsed) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise upstream_failure(exc) from None


def _close_code(code: int | None, fallback: int) -> int:
    return code if code is not None and code in _SENDABLE_CLOSE else fallback


class _MessageRelay:
    """The two directions of one client/upstream socket pair, and the route's bounds on it."""

    def __init__(
        self,
        client: web.WebSocketResponse,
        upstream: aiohttp.ClientWebSocketResponse,
        idle: float | None,
        lifetime: float | None,
    ) -> None:
        self._client = client
        self._upstream = upstream
        self._idle = idle
        self._lifetime = lifetime
        self._loop = asyncio.get_running_loop()
        self._last_message = self._loop.time()

    async def run(self) -> None:
        """Relay messages both ways until one side closes; pass its close code on."""
        client, upstream = self._client, self._upstream
        tasks = [
            asyncio.create_task(self._pump(client, upstream, WSCloseCode.GOING_AWAY)),
            asyncio.create_task(self._pump(upstream, client, WSCloseCode.BAD_GATEWAY)),
        ]
        if self._idle is not None or self._lifetime is not None:
            tasks.append(asyncio.create_task(self._watch()))
        try:
            _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if pending:  # the other side is being closed; let its pump see that
                await asyncio.wait(tasks[:2], timeout=CLOSE_TIMEOUT)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()

    async def _pump(self, source: _Socket, sink: _Socket, lost_code: int) -> None:
        try:
            while True:
                msg = await source.receive()
                self._last_message = self._loop.time()
                if msg.type is WSMsgType.TEXT:
                    await sink.send_str(msg.data)
                elif msg.type is WSMsgType.BINARY:
                    await sink.send_bytes(msg.data)
                elif msg.type is WSMsgType.CLOSE:
                    reason = (msg.extra or "").encode()[:123]  # a close reason fits 123 bytes
                    await sink.close(code=_close_code(msg.data, WSCloseCode.OK), message=reason)
                    return
                elif msg.type is WSMsgType.CLOSING:
                    return  # the other pump is closing this side
                else:  # CLOSED or ERROR: the connection is gone without a close frame
                    await sink.close(code=lost_code)
                    return
        except (aiohttp.ClientError, OSError, RuntimeError):
            # RuntimeError: aiohttp refuses to send on a socket that is already closing.
            await sink.close(code=lost_code)

    async def _watch(self) -> None:
        """Close both sides once the socket has idled or lived past its route's bound."""
        loop, idle, lifetime = self._loop, self._idle, self._lifetime
        end = loop.time() + lifetime if lifetime is not None else None
        while True:
            idle_end = self._last_message + idle if idle is not None else None
            due = [t for t in (end, idle_end) if t is not None]
            wait = min(due) - loop.time()
            if wait <= 0:
                break
            await asyncio.sleep(wait)
        lived = end is not None and loop.time() >= end
        reason = b"websocket lifetime reached" if lived else b"websocket idle"
        await asyncio.gather(
            self._client.close(code=WSCloseCode.GOING_AWAY, message=reason),
            self._upstream.close(code=WSCloseCode.GOING_AWAY, message=reason),
            return_exceptions=True,
        )
